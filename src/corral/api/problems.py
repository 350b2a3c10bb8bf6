"""RFC 9457 problem details: Corral's errors on the wire, and back.

Each error class has a stable `type` (a URN that never changes once published)
and an HTTP status. The server turns an exception into a problem body; the SDK
turns a problem body back into the same exception class, facts included.
"""

from __future__ import annotations

from typing import Any

from corral import errors

PROBLEM_MEDIA_TYPE = "application/problem+json"
_PREFIX = "urn:corral:problem:"

# Most specific first: the first class an error is an instance of names its problem.
PROBLEMS: tuple[tuple[type[errors.CorralError], str, int, str], ...] = (
    (errors.TemplateError, "template-invalid", 422, "The template is not valid"),
    (errors.NotFoundError, "not-found", 404, "Not found"),
    (errors.InvalidStateError, "invalid-state", 409, "The sandbox state does not allow this"),
    (errors.FileTooLargeError, "file-too-large", 413, "The file is over the size limit"),
    (errors.UnsupportedError, "unsupported", 422, "Not supported by this backend or runtime"),
    (errors.IsolationPolicyError, "isolation-policy", 422, "Isolation level not allowed"),
    (errors.ConflictError, "conflict", 409, "Conflict"),
    (errors.QuotaExceededError, "quota-exceeded", 429, "Quota exceeded"),
    (errors.AuthenticationError, "unauthenticated", 401, "A valid API key is required"),
    (errors.PermissionDeniedError, "forbidden", 403, "This key may not do that"),
    (errors.UserError, "bad-request", 400, "Bad request"),
    (errors.BackendUnavailableError, "backend-unavailable", 503, "The backend is not available"),
    (errors.ImageBuildError, "image-build-failed", 500, "Building the image failed"),
    (errors.SandboxStartError, "sandbox-start-failed", 500, "Starting the sandbox failed"),
    (errors.ExecError, "exec-failed", 500, "The runtime could not run the command"),
    (errors.StoreError, "store-unavailable", 503, "The state database is not available"),
    (errors.ServerUnavailableError, "server-unavailable", 503, "The server is not available"),
    (errors.InfrastructureError, "infrastructure", 500, "The host failed"),
    (errors.CorralError, "internal", 500, "Internal error"),
)  # fmt: skip
# Request bodies or parameters that fail validation (FastAPI's own check).
VALIDATION_TYPE = _PREFIX + "validation"
_BY_TYPE = {_PREFIX + slug: cls for cls, slug, _, _ in PROBLEMS}
_FACTS = ("sandbox_id", "backend", "hint", "stderr_tail")


def problem_type(slug: str) -> str:
    return _PREFIX + slug


def to_problem(error: errors.CorralError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, problem body) for `error`."""
    for cls, slug, status, title in PROBLEMS:
        if isinstance(error, cls):
            body: dict[str, Any] = {
                "type": _PREFIX + slug,
                "title": title,
                "status": status,
                "detail": error.message,
            }
            body.update({k: getattr(error, k) for k in _FACTS if getattr(error, k)})
            if isinstance(error, errors.TemplateError):
                body["file"] = error.file
                if error.field:
                    body["field"] = error.field
            return status, body
    raise AssertionError("CorralError is the last entry")  # pragma: no cover


def from_problem(status: int, body: Any) -> errors.CorralError:
    """The exception a problem body stands for (unknown types map by status class)."""
    if not isinstance(body, dict):
        body = {}
    detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
    cls = _BY_TYPE.get(str(body.get("type", "")))
    if body.get("type") == VALIDATION_TYPE:
        cls = errors.UserError
        detail = _validation_detail(body) or detail
    if cls is None:
        cls = errors.UserError if 400 <= status < 500 else errors.InfrastructureError
    facts = {k: body[k] for k in _FACTS if isinstance(body.get(k), str)}
    if cls is errors.TemplateError:
        # TemplateError's detail already names file and field; keep it verbatim.
        error = errors.TemplateError.__new__(errors.TemplateError)
        errors.CorralError.__init__(error, detail, **facts)
        error.file = str(body.get("file", "<remote>"))
        error.field = body.get("field") if isinstance(body.get("field"), str) else None
        return error
    return cls(detail, **facts)


def _validation_detail(body: dict[str, Any]) -> str:
    issues = body.get("errors")
    if not isinstance(issues, list):
        return ""
    parts = []
    for issue in issues[:5]:
        if isinstance(issue, dict):
            where = ".".join(str(p) for p in issue.get("loc", []))
            parts.append(f"{where}: {issue.get('msg', '')}")
    return "; ".join(parts)

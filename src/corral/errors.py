"""Corral's exception tree: one root, user mistakes kept apart from host failures.

    CorralError
    ├── UserError                   the caller can fix it (bad input, wrong state, limits)
    │   ├── TemplateError           a template file is malformed (file, field, fix)
    │   ├── NotFoundError           sandbox / template / image unknown
    │   ├── InvalidStateError       an illegal lifecycle transition
    │   ├── FileTooLargeError       a copy over the size limit
    │   ├── UnsupportedError        the backend or runtime cannot do this here
    │   ├── IsolationPolicyError    the template does not allow that isolation level
    │   ├── ConflictError           the name is taken (or a similar clash)
    │   ├── QuotaExceededError      the tenant is at one of its quotas
    │   ├── AuthenticationError     no API key, or an unknown one
    │   └── PermissionDeniedError   the key may not do this (e.g. admin-only views)
    └── InfrastructureError         the host or a runtime failed
        ├── BackendUnavailableError a backend, runtime or extra is missing
        ├── ImageBuildError         realizing a template failed
        ├── SandboxStartError       create/start failed (nothing is left behind)
        ├── ExecError               the runtime could not run a command
        ├── StoreError              the state database failed
        └── ServerUnavailableError  the Corral server cannot be reached (SDK, remote CLI)

Every error carries operational facts (`sandbox_id`, `backend`, `hint`, the
tail of the runtime's stderr) so a message says what happened and what to do.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "ConflictError",
    "CorralError",
    "ExecError",
    "FileTooLargeError",
    "ImageBuildError",
    "InfrastructureError",
    "InvalidStateError",
    "IsolationPolicyError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "SandboxStartError",
    "ServerUnavailableError",
    "StoreError",
    "TemplateError",
    "UnsupportedError",
    "UserError",
]


class CorralError(Exception):
    """Root of every error Corral raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        sandbox_id: str | None = None,
        backend: str | None = None,
        hint: str | None = None,
        stderr_tail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sandbox_id = sandbox_id
        self.backend = backend
        self.hint = hint
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        parts = [self.message]
        where = ", ".join(
            f"{k}={v}" for k, v in (("sandbox", self.sandbox_id), ("backend", self.backend)) if v
        )
        if where:
            parts[0] += f" [{where}]"
        if self.stderr_tail:
            parts.append(f"runtime said: {self.stderr_tail.strip()}")
        if self.hint:
            parts.append(f"fix: {self.hint}")
        return "\n".join(parts)


class UserError(CorralError):
    """The request cannot be served as given; changing the input fixes it."""


class TemplateError(UserError):
    """A template is malformed. Names the file, the field and the fix."""

    def __init__(self, message: str, *, file: str, field: str | None = None, hint: str) -> None:
        location = file if field is None else f"{file}: field '{field}'"
        super().__init__(f"{location}: {message}", hint=hint)
        self.file = file
        self.field = field


class NotFoundError(UserError):
    """No sandbox, template or image of that name (for this caller)."""


class InvalidStateError(UserError):
    """The sandbox's state does not allow the operation (e.g. exec when stopped)."""


class FileTooLargeError(UserError):
    """A file copy exceeds the configured size limit."""


class UnsupportedError(UserError):
    """The backend or runtime cannot do this on this host (e.g. snapshot under crun)."""


class IsolationPolicyError(UserError):
    """The requested isolation level is not allowed by the template."""


class ConflictError(UserError):
    """The request clashes with what exists (e.g. a sandbox name already in use)."""


class QuotaExceededError(UserError):
    """The tenant is at a quota (running sandboxes, vCPUs or memory)."""


class AuthenticationError(UserError):
    """No API key was given, or the key is unknown or revoked."""


class PermissionDeniedError(UserError):
    """The key is valid but may not do this (e.g. fleet-wide views need an admin key)."""


class InfrastructureError(CorralError):
    """The host, a runtime or the store failed; retrying or fixing the host helps."""


class BackendUnavailableError(InfrastructureError):
    """A backend, runtime binary or optional extra is not installed or not usable."""


class ImageBuildError(InfrastructureError):
    """Realizing a template into an image failed."""


class SandboxStartError(InfrastructureError):
    """Creating or starting a sandbox failed; everything it took was released."""


class ExecError(InfrastructureError):
    """The runtime could not run the command (not the command's own failure)."""


class StoreError(InfrastructureError):
    """The state database could not be read or written."""


class ServerUnavailableError(InfrastructureError):
    """The Corral server could not be reached or answered outside the API (SDK, remote CLI)."""

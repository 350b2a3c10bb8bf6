"""Corral's exception tree: one root, user mistakes kept apart from host failures.

    CorralError
    ├── UserError                   the caller can fix it (bad input, wrong state, limits)
    │   ├── TemplateError           a template file is malformed (file, field, fix)
    │   ├── NotFoundError           sandbox / template / image unknown
    │   ├── InvalidStateError       an illegal lifecycle transition
    │   ├── FileTooLargeError       a copy over the size limit
    │   ├── UnsupportedError        the backend or runtime cannot do this here
    │   └── IsolationPolicyError    the template does not allow that isolation level
    └── InfrastructureError         the host or a runtime failed
        ├── BackendUnavailableError a backend, runtime or extra is missing
        ├── ImageBuildError         realizing a template failed
        ├── SandboxStartError       create/start failed (nothing is left behind)
        ├── ExecError               the runtime could not run a command
        └── StoreError              the state database failed

Every error carries operational facts (`sandbox_id`, `backend`, `hint`, the
tail of the runtime's stderr) so a message says what happened and what to do.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CorralError",
    "ExecError",
    "FileTooLargeError",
    "ImageBuildError",
    "InfrastructureError",
    "InvalidStateError",
    "IsolationPolicyError",
    "NotFoundError",
    "SandboxStartError",
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

"""Corral: self-hosted sandboxes for coding agents.

One declarative template becomes an image; a backend (OCI runtime, Podman,
microVM) runs it with real isolation; the runtime keeps every sandbox in the
store so any process can drive it.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing costs the CLI ~15 ms
if TYPE_CHECKING:
    from corral.backends.base import (
        Backend,
        BackendStatus,
        Capability,
        ExecRequest,
        ExecResult,
        ExitStatus,
        Output,
        SandboxConfig,
        SandboxLimits,
        SandboxStats,
    )
    from corral.client import AsyncCorral, AsyncSandbox, Corral, Sandbox
    from corral.config import Settings
    from corral.errors import (
        AuthenticationError,
        BackendUnavailableError,
        ConflictError,
        CorralError,
        ExecError,
        FileTooLargeError,
        ImageBuildError,
        InfrastructureError,
        InvalidStateError,
        IsolationPolicyError,
        NotFoundError,
        PermissionDeniedError,
        QuotaExceededError,
        SandboxStartError,
        ServerUnavailableError,
        StoreError,
        TemplateError,
        UnsupportedError,
        UserError,
    )
    from corral.runtime.manager import SandboxManager
    from corral.runtime.state import SandboxState
    from corral.spec.template import Template, load_template

# Exports load on first use (PEP 562), so `import corral.cli` and other light entry
# points do not pay for SQLAlchemy and pydantic before they need them.
_EXPORTS = {
    **dict.fromkeys(
        [
            "Backend",
            "BackendStatus",
            "Capability",
            "ExecRequest",
            "ExecResult",
            "ExitStatus",
            "Output",
            "SandboxConfig",
            "SandboxLimits",
            "SandboxStats",
        ],
        "corral.backends.base",
    ),
    **dict.fromkeys(["AsyncCorral", "AsyncSandbox", "Corral", "Sandbox"], "corral.client"),
    "Settings": "corral.config",
    **dict.fromkeys(
        [
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
        ],
        "corral.errors",
    ),
    "SandboxManager": "corral.runtime.manager",
    "SandboxState": "corral.runtime.state",
    "Template": "corral.spec.template",
    "load_template": "corral.spec.template",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute '{name}'")
    __import__(module)
    value = getattr(sys.modules[module], name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AsyncCorral",
    "AsyncSandbox",
    "AuthenticationError",
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "Capability",
    "ConflictError",
    "Corral",
    "CorralError",
    "ExecError",
    "ExecRequest",
    "ExecResult",
    "ExitStatus",
    "FileTooLargeError",
    "ImageBuildError",
    "InfrastructureError",
    "InvalidStateError",
    "IsolationPolicyError",
    "NotFoundError",
    "Output",
    "PermissionDeniedError",
    "QuotaExceededError",
    "Sandbox",
    "SandboxConfig",
    "SandboxLimits",
    "SandboxManager",
    "SandboxStartError",
    "SandboxState",
    "SandboxStats",
    "ServerUnavailableError",
    "Settings",
    "StoreError",
    "Template",
    "TemplateError",
    "UnsupportedError",
    "UserError",
    "__version__",
    "load_template",
]

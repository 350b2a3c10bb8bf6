"""Corral: self-hosted sandboxes for coding agents.

One declarative template becomes an image; a backend (OCI runtime, Podman,
microVM) runs it with real isolation; the runtime keeps every sandbox in the
store so any process can drive it.
"""

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
from corral.config import Settings
from corral.errors import (
    BackendUnavailableError,
    CorralError,
    ExecError,
    FileTooLargeError,
    ImageBuildError,
    InfrastructureError,
    InvalidStateError,
    IsolationPolicyError,
    NotFoundError,
    SandboxStartError,
    StoreError,
    TemplateError,
    UnsupportedError,
    UserError,
)
from corral.runtime.manager import SandboxManager
from corral.runtime.state import SandboxState
from corral.spec.template import Template, load_template

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "Capability",
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
    "SandboxConfig",
    "SandboxLimits",
    "SandboxManager",
    "SandboxStartError",
    "SandboxState",
    "SandboxStats",
    "Settings",
    "StoreError",
    "Template",
    "TemplateError",
    "UnsupportedError",
    "UserError",
    "__version__",
    "load_template",
]

"""The public surface is what `corral.__all__` says, and nothing leaks from submodules."""

import corral


def test_exported_members() -> None:
    assert set(corral.__all__) == {
        "AsyncCorral", "AsyncSandbox", "AuthenticationError", "Backend", "BackendStatus",
        "BackendUnavailableError", "Capability", "ConflictError", "Corral", "CorralError",
        "ExecError", "ExecRequest", "ExecResult", "ExitStatus", "FileTooLargeError",
        "ImageBuildError", "InfrastructureError", "InvalidStateError", "IsolationPolicyError",
        "NotFoundError", "Output", "PermissionDeniedError", "QuotaExceededError", "Sandbox",
        "SandboxConfig", "SandboxLimits", "SandboxManager", "SandboxStartError", "SandboxState",
        "SandboxStats", "ServerUnavailableError", "Settings", "StoreError", "Template",
        "TemplateError", "UnsupportedError", "UserError", "__version__", "load_template",
    }  # fmt: skip
    for name in corral.__all__:
        assert hasattr(corral, name), name


def test_error_tree_keeps_user_and_host_failures_apart() -> None:
    assert issubclass(corral.TemplateError, corral.UserError)
    assert issubclass(corral.NotFoundError, corral.UserError)
    assert issubclass(corral.SandboxStartError, corral.InfrastructureError)
    assert not issubclass(corral.InfrastructureError, corral.UserError)
    error = corral.SandboxStartError(
        "boom", sandbox_id="sb-1", backend="oci", stderr_tail="crun: bad", hint="run doctor"
    )
    text = str(error)
    assert "sb-1" in text
    assert "oci" in text
    assert "crun: bad" in text
    assert "run doctor" in text

"""Settings precedence and backend selection (config file < environment < flags)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.backends.fake import FakeBackend
from corral.backends.oci import OciBackend
from corral.backends.registry import available_backends, load_backend
from corral.config import Settings
from corral.errors import BackendUnavailableError, UserError


def test_defaults_without_config(tmp_path: Path) -> None:
    settings = Settings.load({"CORRAL_CONFIG": str(tmp_path / "none.toml")})
    assert settings.backend == "oci"
    assert settings.oci.runtime == "crun"
    assert settings.state_dir == Path("/var/lib/corral")


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('backend = "fake"\nstate_dir = "/srv/corral"\n[oci]\nruntime = "runc"\n')
    env = {"CORRAL_CONFIG": str(config)}
    settings = Settings.load(env)
    assert (settings.backend, settings.oci.runtime) == ("fake", "runc")
    settings = Settings.load({**env, "CORRAL_BACKEND": "oci", "CORRAL_RUNTIME": "runsc"})
    assert (settings.backend, settings.oci.runtime) == ("oci", "runsc")
    settings = Settings.load({**env, "CORRAL_BACKEND": "oci"}, backend="fake", runtime="crun")
    assert (settings.backend, settings.oci.runtime) == ("fake", "crun")
    assert settings.state_dir == Path("/srv/corral")


def test_bad_config_is_named(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("max_file_bytes = -1\n")
    with pytest.raises(UserError, match="max_file_bytes"):
        Settings.load({"CORRAL_CONFIG": str(config)})
    config.write_text("backend = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        Settings.load({"CORRAL_CONFIG": str(config)})


def test_load_backend_by_name(tmp_path: Path) -> None:
    settings = Settings.load({"CORRAL_CONFIG": "/nonexistent"}, state_dir=str(tmp_path))
    assert isinstance(load_backend(settings), OciBackend)
    assert isinstance(load_backend(settings, "fake"), FakeBackend)
    assert {"oci", "fake"} <= set(available_backends())
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'") as info:
        load_backend(settings, "nope")
    assert info.value.hint is not None
    assert "oci" in info.value.hint
    bad_runtime = Settings.load({"CORRAL_CONFIG": "/nonexistent"}, runtime="kata")
    with pytest.raises(BackendUnavailableError, match="unknown OCI runtime 'kata'"):
        load_backend(bad_runtime)

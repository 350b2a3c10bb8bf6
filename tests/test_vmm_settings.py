"""VMM settings: validated like the rest of Corral's config, turned into drivers in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.backends.microvm.vmm import (
    CloudHypervisorDriver,
    FirecrackerDriver,
    VmmSettings,
    make_driver,
)
from corral.errors import BackendUnavailableError


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    for name in ("firecracker", "cloud-hypervisor", "jailer"):
        binary = tmp_path / name
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    return tmp_path


def test_settings_parse_the_config_section_shape() -> None:
    settings = VmmSettings.model_validate(
        {
            "firecracker": {"binary": "/opt/fc/firecracker", "jailer": {"uid": 900, "gid": 901}},
            "cloud-hypervisor": {"max_vcpus": 8, "hotplug_memory_mib": 4096},
            "start_timeout": 5,
        }
    )
    assert settings.firecracker.jailer is not None
    assert settings.firecracker.jailer.chroot_base == Path("/srv/jailer")
    assert settings.cloud_hypervisor.max_vcpus == 8
    with pytest.raises(ValidationError, match="extra_forbidden"):
        VmmSettings.model_validate({"firecracker": {"binray": "x"}})
    with pytest.raises(ValidationError):
        VmmSettings.model_validate({"cloud-hypervisor": {"max_vcpus": 0}})


def test_make_driver_builds_each_vmm_from_settings(bin_dir: Path) -> None:
    environ = {"PATH": str(bin_dir)}
    settings = VmmSettings.model_validate(
        {
            "firecracker": {"jailer": {"uid": 900, "gid": 901, "chroot_base": "/srv/j"}},
            "cloud-hypervisor": {"max_vcpus": 6, "hotplug_memory_mib": 1024},
            "start_timeout": 3,
        }
    )
    fc = make_driver(
        "firecracker", Path("/run/x"), sandbox_id="sb-1", settings=settings, environ=environ
    )
    assert isinstance(fc, FirecrackerDriver)
    assert fc.binary == bin_dir / "firecracker"
    assert fc.start_timeout == 3
    assert fc.jailer is not None
    assert (fc.jailer.uid, fc.jailer.gid, fc.jailer.chroot_base) == (900, 901, Path("/srv/j"))
    assert fc.api_socket == Path("/srv/j/firecracker/sb-1/root/api.socket")
    ch = make_driver(
        "cloud-hypervisor", Path("/run/y"), sandbox_id="sb-2", settings=settings, environ=environ
    )
    assert isinstance(ch, CloudHypervisorDriver)
    assert (ch.max_vcpus, ch.hotplug_memory_mib) == (6, 1024)
    assert ch.api_socket == Path("/run/y/cloud-hypervisor.sock")


def test_make_driver_names_a_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="cloud-hypervisor is not on PATH"):
        make_driver("cloud-hypervisor", tmp_path, sandbox_id="sb", environ={"PATH": str(tmp_path)})

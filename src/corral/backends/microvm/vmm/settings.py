"""Typed settings for the VMM drivers and the one place that turns them into a driver.

Meant to sit in the microvm section of Corral's config, e.g.

    [microvm.firecracker]
    binary = "/usr/local/bin/firecracker"
    jailer = { uid = 900, gid = 900, chroot_base = "/srv/jailer" }

    [microvm.cloud-hypervisor]
    max_vcpus = 8
    hotplug_memory_mib = 4096
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.backends.microvm.vmm.base import VmmDriver
from corral.backends.microvm.vmm.cloud_hypervisor import CloudHypervisorDriver
from corral.backends.microvm.vmm.firecracker import FirecrackerDriver, JailerConfig

__all__ = [
    "CloudHypervisorSettings",
    "FirecrackerSettings",
    "JailerSettings",
    "VmmName",
    "VmmSettings",
    "make_driver",
]

VmmName = Literal["firecracker", "cloud-hypervisor"]


class JailerSettings(BaseModel):
    """Run Firecracker under its jailer as `uid`:`gid`, chrooted under `chroot_base`."""

    model_config = ConfigDict(extra="forbid")
    uid: int = Field(ge=0)
    gid: int = Field(ge=0)
    chroot_base: Path = Path("/srv/jailer")
    binary: str | None = None  # default: `jailer` on PATH
    netns: Path | None = None
    cgroup_version: Literal[1, 2] = 1


class FirecrackerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    binary: str | None = None  # default: `firecracker` on PATH
    jailer: JailerSettings | None = None


class CloudHypervisorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    binary: str | None = None  # default: `cloud-hypervisor` on PATH
    max_vcpus: int | None = Field(default=None, ge=1)  # vCPU hotplug ceiling; None: no hotplug
    hotplug_memory_mib: int = Field(default=0, ge=0)  # memory hotplug room above the boot size


class VmmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    firecracker: FirecrackerSettings = FirecrackerSettings()
    cloud_hypervisor: CloudHypervisorSettings = Field(
        default=CloudHypervisorSettings(), alias="cloud-hypervisor"
    )
    start_timeout: float = Field(default=10.0, gt=0)  # seconds for the API socket to answer
    api_timeout: float = Field(default=30.0, gt=0)  # seconds for one API call (snapshots)


def make_driver(
    vmm: VmmName,
    run_dir: Path,
    *,
    sandbox_id: str,
    settings: VmmSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> VmmDriver:
    """A driver for one sandbox's VMM; raises BackendUnavailableError if a binary is missing."""
    settings = settings or VmmSettings()
    timeouts = {"start_timeout": settings.start_timeout, "api_timeout": settings.api_timeout}
    if vmm == "firecracker":
        fc = settings.firecracker
        jail = fc.jailer
        jailer = None
        if jail is not None:
            jailer = JailerConfig(
                uid=jail.uid,
                gid=jail.gid,
                chroot_base=jail.chroot_base,
                binary=jail.binary,
                netns=jail.netns,
                cgroup_version=jail.cgroup_version,
            )
        return FirecrackerDriver(
            run_dir,
            binary=fc.binary,
            jailer=jailer,
            sandbox_id=sandbox_id,
            environ=environ,
            **timeouts,
        )
    ch = settings.cloud_hypervisor
    return CloudHypervisorDriver(
        run_dir,
        binary=ch.binary,
        sandbox_id=sandbox_id,
        max_vcpus=ch.max_vcpus,
        hotplug_memory_mib=ch.hotplug_memory_mib,
        environ=environ,
        **timeouts,
    )

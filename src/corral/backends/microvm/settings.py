"""The `[microvm]` section of Corral's config: which VMM runs sandboxes, and how.

    [microvm]
    vmm = "firecracker"                 # qemu (default) | firecracker | cloud-hypervisor

    [microvm.firecracker]
    binary = "/usr/local/bin/firecracker"
    jailer = { uid = 900, gid = 900, chroot_base = "/srv/jailer" }

    [microvm.cloud-hypervisor]
    max_vcpus = 8
    hotplug_memory_mib = 4096

Plain pydantic, no driver code: the config module imports it on every command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "VMMS",
    "CloudHypervisorSettings",
    "FirecrackerSettings",
    "JailerSettings",
    "MicrovmSettings",
    "VmmChoice",
    "VmmName",
    "VmmSettings",
]

VmmName = Literal["firecracker", "cloud-hypervisor"]  # the VMMs with an HTTP API driver
VmmChoice = Literal["qemu", "firecracker", "cloud-hypervisor"]
VMMS: tuple[VmmChoice, ...] = ("qemu", "firecracker", "cloud-hypervisor")


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
    """What the Firecracker and Cloud Hypervisor drivers are built from (`make_driver`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    firecracker: FirecrackerSettings = FirecrackerSettings()
    cloud_hypervisor: CloudHypervisorSettings = Field(
        default=CloudHypervisorSettings(), alias="cloud-hypervisor"
    )
    start_timeout: float = Field(default=10.0, gt=0)  # seconds for the API socket to answer
    api_timeout: float = Field(default=30.0, gt=0)  # seconds for one API call (snapshots)


class MicrovmSettings(VmmSettings):
    """The microvm backend's section: its VMM, plus every VMM's own settings."""

    vmm: VmmChoice = "qemu"
    cache_dir: Path | None = None  # kernels and bundles (default /var/cache/corral/microvm)

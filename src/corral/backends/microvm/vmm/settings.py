"""Turn the microvm settings (corral.backends.microvm.settings) into a VMM driver.

The settings models live beside the backend, free of driver code, so the config
module can import them cheaply; they are re-exported here for the drivers' users.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from corral.backends.microvm.settings import (
    CloudHypervisorSettings,
    FirecrackerSettings,
    JailerSettings,
    VmmName,
    VmmSettings,
)
from corral.backends.microvm.vmm.cloud_hypervisor import CloudHypervisorDriver
from corral.backends.microvm.vmm.firecracker import FirecrackerDriver, JailerConfig
from corral.backends.microvm.vmm.supervised import SupervisedDriver

__all__ = [
    "CloudHypervisorSettings",
    "FirecrackerSettings",
    "JailerSettings",
    "VmmName",
    "VmmSettings",
    "make_driver",
]


def make_driver(
    vmm: VmmName,
    run_dir: Path,
    *,
    sandbox_id: str,
    settings: VmmSettings | None = None,
    environ: Mapping[str, str] | None = None,
    detached: bool = False,
) -> SupervisedDriver:
    """A driver for one sandbox's VMM; raises BackendUnavailableError if a binary is missing.

    `detached`: the VMM outlives the driver (see SupervisedDriver), as the backend wants.
    """
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
            detached=detached,
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
        detached=detached,
        **timeouts,
    )

"""VMM drivers for microVM mode: Firecracker and Cloud Hypervisor over their unix-socket APIs."""

from corral.backends.microvm.vmm.base import (
    BootSpec,
    DiskSpec,
    RestoreSpec,
    VmmDriver,
    VmmInfo,
    VmmState,
    VsockSpec,
)
from corral.backends.microvm.vmm.cloud_hypervisor import CloudHypervisorDriver
from corral.backends.microvm.vmm.firecracker import FirecrackerDriver, JailerConfig
from corral.backends.microvm.vmm.settings import (
    CloudHypervisorSettings,
    FirecrackerSettings,
    JailerSettings,
    VmmName,
    VmmSettings,
    make_driver,
)

__all__ = [
    "BootSpec",
    "CloudHypervisorDriver",
    "CloudHypervisorSettings",
    "DiskSpec",
    "FirecrackerDriver",
    "FirecrackerSettings",
    "JailerConfig",
    "JailerSettings",
    "RestoreSpec",
    "VmmDriver",
    "VmmInfo",
    "VmmName",
    "VmmSettings",
    "VmmState",
    "VsockSpec",
    "make_driver",
]

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

__all__ = [
    "BootSpec",
    "CloudHypervisorDriver",
    "DiskSpec",
    "FirecrackerDriver",
    "JailerConfig",
    "RestoreSpec",
    "VmmDriver",
    "VmmInfo",
    "VmmState",
    "VsockSpec",
]

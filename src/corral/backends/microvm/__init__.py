"""MicroVM mode: sandboxes as VMs under QEMU, Firecracker or Cloud Hypervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.backends.microvm.backend import MicrovmBackend

__all__ = ["MicrovmBackend"]


def __getattr__(name: str) -> Any:
    # Lazy: the VMM drivers import this package without needing QEMU's QMP library.
    if name == "MicrovmBackend":
        from corral.backends.microvm.backend import MicrovmBackend

        return MicrovmBackend
    raise AttributeError(name)

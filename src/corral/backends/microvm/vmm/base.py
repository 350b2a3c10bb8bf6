"""The VMM driver interface: one VMM process per sandbox, driven over its unix-socket API.

A driver owns exactly one VMM process (Firecracker or Cloud Hypervisor) and its
API socket. The microVM backend decides what to boot; the driver only speaks
the VMM's API and supervises the process.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

from corral.errors import InvalidStateError, UnsupportedError

__all__ = [
    "BootSpec",
    "DiskSpec",
    "RestoreSpec",
    "VmmDriver",
    "VmmInfo",
    "VmmState",
    "VsockSpec",
]


class VmmState(StrEnum):
    """Where a driver's VMM is in its life; illegal transitions raise `InvalidStateError`.

        NEW --start()--> STARTED --configure()--> CONFIGURED --boot()--> RUNNING
                            |                                            |   ^
                            |                                    pause() |   | resume()
                            |                                            v   |
                            '---------------restore()------------------> PAUSED --.
                                                                           ^      | snapshot()
                                                                           '------'
        any state --shutdown() / kill() / the process dying--> STOPPED (terminal)

    STARTED means the process answers on its API socket and nothing is
    configured yet: only then may a snapshot be restored into it (both VMMs
    refuse to restore into a configured VM).
    """

    NEW = "new"
    STARTED = "started"
    CONFIGURED = "configured"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A block device given to the guest; `drive_id` must be unique per VM.

    The guest sees the disks as /dev/vda, /dev/vdb, ... in `BootSpec.disks()`
    order on both VMMs; Cloud Hypervisor also passes `serial` (virtio-blk
    serial, /dev/disk/by-id/virtio-<serial>), which Firecracker's API has no
    field for.
    """

    drive_id: str
    path: Path
    read_only: bool
    serial: str | None = None


@dataclass(frozen=True, slots=True)
class VsockSpec:
    """A virtio-vsock device proxied to the unix socket `uds_path` on the host."""

    guest_cid: int
    uds_path: Path


@dataclass(frozen=True, slots=True)
class BootSpec:
    """What to boot: the microVM bundle plus this sandbox's own pieces.

    `rootfs` is the image's shared base disk and is always attached
    read-only; `overlay` is this sandbox's writable disk (raw or reflinked
    copy-on-write, made by the backend). `tap` names an existing tap device,
    or None for no network.
    """

    kernel: Path
    rootfs: Path
    overlay: Path
    cmdline: str = "console=ttyS0 reboot=k panic=1"
    initrd: Path | None = None
    vcpus: int = 1
    memory_mib: int = 256
    tap: str | None = None
    guest_mac: str | None = None
    vsock: VsockSpec | None = None
    extra_disks: tuple[DiskSpec, ...] = field(default=())

    def disks(self) -> tuple[DiskSpec, ...]:
        """All block devices in attach order: rootfs (vda), overlay (vdb), extras."""
        return (
            DiskSpec("rootfs", self.rootfs, read_only=True),
            DiskSpec("overlay", self.overlay, read_only=False),
            *self.extra_disks,
        )


@dataclass(frozen=True, slots=True)
class RestoreSpec:
    """A snapshot to load, re-pointed at the new sandbox's own files.

    `disks` re-points drives (matched by `drive_id`) at this sandbox's files,
    e.g. its own overlay copy, so several sandboxes can be forked from one
    snapshot; `vsock_uds` moves the vsock device to this sandbox's socket and
    `tap` its network interface to this sandbox's tap device. Without them the
    restored VM binds the snapshot's own socket path and tap, which clash with
    the original sandbox if it still runs.
    """

    directory: Path
    disks: tuple[DiskSpec, ...] = ()
    vsock_uds: Path | None = None
    tap: str | None = None
    resume: bool = False


@dataclass(frozen=True, slots=True)
class VmmInfo:
    """What the VMM itself reports (GET / or GET vm.info), in Corral's words."""

    state: VmmState
    vmm_state: str  # the VMM's own word, e.g. "Not started", "Running", "Paused"
    version: str | None = None


class VmmDriver(abc.ABC):
    """One VMM process for one sandbox.

    Contracts every implementation keeps:
    - Each verb checks the driver's state first and raises `InvalidStateError`
      without calling the VMM when the transition is illegal.
    - `start()`, `configure()`, `boot()` and `restore()` are the start phase:
      if one fails it raises `SandboxStartError` and has already released the
      process and its socket (state STOPPED).
    - A VMM refusing a runtime verb (pause, resume, snapshot, resize, add_disk)
      raises a `UserError` when the VMM blamed the request (`InvalidStateError`
      for the VM's state, `ConflictError` for a clash such as a duplicate disk
      id) and `InfrastructureError` when it failed; the VMM's own message is
      the error's `stderr_tail`. The driver's state is unchanged by a refusal.
    - `shutdown()` and `kill()` always leave no process and no API socket,
      even when the graceful path fails, and a second call does nothing.

    A driver serves one caller at a time (the backend holds the sandbox's
    lock); only `kill()` is meant to cut into another call.
    """

    name: ClassVar[str]
    supports_resize: ClassVar[bool] = False
    supports_add_disk: ClassVar[bool] = False

    def __init__(self) -> None:
        self._state = VmmState.NEW

    @property
    def state(self) -> VmmState:
        return self._state

    @property
    @abc.abstractmethod
    def api_socket(self) -> Path:
        """The VMM's API socket on the host (inside the jail's chroot when jailed)."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The VMM process id while it runs, else None."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Spawn the VMM; on return its API socket answers. NEW -> STARTED."""

    @abc.abstractmethod
    async def configure(self, boot: BootSpec) -> None:
        """Send the whole machine definition; nothing runs yet. STARTED -> CONFIGURED."""

    @abc.abstractmethod
    async def boot(self) -> None:
        """Start the guest. CONFIGURED -> RUNNING."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs. RUNNING -> PAUSED."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Run the vCPUs again. PAUSED -> RUNNING."""

    @abc.abstractmethod
    async def snapshot(self, directory: Path) -> None:
        """Write the paused VM's state and memory into `directory` (created if missing).

        PAUSED -> PAUSED; disks are not part of the snapshot (the caller keeps
        the overlay). The files are the VMM's own format, loadable only by
        `restore()` of the same driver class.
        """

    @abc.abstractmethod
    async def restore(self, spec: RestoreSpec) -> None:
        """Load a snapshot written by `snapshot()` into this fresh VMM.

        STARTED -> PAUSED (or RUNNING when `spec.resume`). The snapshot
        directory is only read, so many sandboxes may restore from one.
        """

    @abc.abstractmethod
    async def info(self) -> VmmInfo:
        """Ask the VMM what state it is in (does not change the driver's state)."""

    async def resize(self, *, vcpus: int | None = None, memory_mib: int | None = None) -> None:
        """Change the running VM's vCPUs and/or memory (hotplug), where the VMM can."""
        raise UnsupportedError(
            f"{self.name} cannot resize a running VM",
            backend="microvm",
            hint="pick the size at create time, or use --vmm cloud-hypervisor",
        )

    async def add_disk(self, disk: DiskSpec) -> None:
        """Hot-plug a block device into the running VM, where the VMM can."""
        raise UnsupportedError(
            f"{self.name} cannot add a disk to a running VM",
            backend="microvm",
            hint="list the disk in the template, or use --vmm cloud-hypervisor",
        )

    @abc.abstractmethod
    async def shutdown(self, *, grace: float = 5.0) -> None:
        """Ask the VMM to stop, then kill it after `grace` seconds. Any -> STOPPED."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the VMM at once and release its socket. Any -> STOPPED."""

    def _require(self, verb: str, *allowed: VmmState) -> None:
        if self._state not in allowed:
            wanted = " or ".join(s.value for s in allowed)
            raise InvalidStateError(
                f"cannot {verb}: the {self.name} VM is {self._state.value}, not {wanted}",
                backend="microvm",
            )

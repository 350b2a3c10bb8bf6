"""Pets' volumes on microVMs: the volume's ext4 image attached as a writable virtio
disk (serial `volN`) and mounted by the guest agent at the volume's path.

A VM cannot share a host directory, so the runtime hands a microVM the image
itself (Capability.VOLUME_DISK) and never loop-mounts it on the host while a VM
has it; QEMU's image lock keeps a second VM off it. The file system's size is
the limit, as for containers. Before boot the image's root directory is handed to
the sandbox user (debugfs on the unmounted image, as the container backends chown
a mounted volume's root). The guest's page cache holds recent writes, so a VM
with a volume is asked to `sync` before destroy kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from corral.backends.base import HostMount
from corral.backends.microvm.agent_client import AgentError, connect
from corral.backends.microvm.qemu import DriveSpec, VmSpec
from corral.errors import BackendUnavailableError, ExecError, SandboxStartError, UnsupportedError

__all__ = [
    "check_volume",
    "empty_slot",
    "flush",
    "hand_root_to",
    "has_volumes",
    "is_slot",
    "split_mounts",
    "volume_disks",
]

SERIAL_PREFIX = "vol"
SLOT_FILE = "volume-slot"
FLUSH_DEADLINE = 10.0  # seconds for the guest's sync before the VM is killed anyway
# A kernel command line token: no spaces, and ':' separates the fields of corral.mount=.
_TARGET = re.compile(r"/[A-Za-z0-9_./+@=,-]*")


def split_mounts(mounts: Sequence[HostMount]) -> tuple[list[HostMount], list[HostMount]]:
    """(read-only host mounts, which become erofs disks; writable ones: volumes)."""
    return [m for m in mounts if not m.writable], [m for m in mounts if m.writable]


async def volume_disks(
    sandbox_id: str, volumes: Sequence[HostMount], uid: int, gid: int
) -> tuple[list[DriveSpec], list[str]]:
    """The drives and `corral.mount=` tokens that attach `volumes` (each a writable
    HostMount whose source is an ext4 image), their roots handed to uid:gid."""
    drives: list[DriveSpec] = []
    tokens: list[str] = []
    for index, mount in enumerate(volumes):
        check_volume(sandbox_id, mount)
        await hand_root_to(sandbox_id, mount.source, uid, gid)
        serial = f"{SERIAL_PREFIX}{index}"
        drives.append(DriveSpec(serial, str(mount.source), "raw", False, durable=True))
        tokens.append(f"corral.mount={serial}:ext4:{mount.target}:rw")
    return drives, tokens


def check_volume(sandbox_id: str, mount: HostMount) -> None:
    """UnsupportedError unless `mount` is an image a VM can mount at its target."""
    if not mount.source.is_file():
        raise UnsupportedError(
            f"a microVM cannot share the host directory {mount.source} writable"
            f" (at {mount.target})",
            sandbox_id=sandbox_id,
            backend="microvm",
            hint="a pet's volume reaches a VM as its disk image: create pets through"
            " the runtime (`corral pet`/`service deploy`), or use a container backend",
        )
    if not _TARGET.fullmatch(mount.target) or mount.target == "/":
        raise UnsupportedError(
            f"the volume path {mount.target!r} cannot be mounted in a microVM",
            sandbox_id=sandbox_id,
            backend="microvm",
            hint="use an absolute path of letters, digits and . _ - / (e.g. /data)",
        )


def empty_slot(sandbox_dir: Path) -> DriveSpec:
    """The empty volume disk every VM without a volume boots with. QEMU's microvm
    has no hotplug, so a running VM gains a volume (promotion) by a snapshot restored
    with this disk's file swapped for the volume's image (see `attach`)."""
    path = sandbox_dir / SLOT_FILE
    path.touch()
    return DriveSpec(f"{SERIAL_PREFIX}0", str(path), "raw", False, durable=True)


def is_slot(drive: DriveSpec) -> bool:
    return Path(drive.path).name == SLOT_FILE


def has_volumes(spec: VmSpec) -> bool:
    return any(
        d.serial.startswith(SERIAL_PREFIX) and not d.read_only and not is_slot(d)
        for d in spec.drives
    )


async def flush(sandbox_dir: Path, ports: int) -> None:
    """Ask the guest to write its dirty pages out; best effort (a hung or dead guest
    keeps what already reached the host, and its journal keeps the file system whole)."""
    with contextlib.suppress(ExecError, AgentError, OSError, TimeoutError, EOFError):
        conn = await connect(sandbox_dir, ports, deadline=FLUSH_DEADLINE)
        try:
            await asyncio.wait_for(conn.flush(), FLUSH_DEADLINE)
        finally:
            await conn.close()


async def hand_root_to(sandbox_id: str, image: Path, uid: int, gid: int) -> None:
    """Replay the journal a killed VM left (so it cannot undo this later), then make
    uid:gid own the file system's root directory."""
    await _tool(sandbox_id, "e2fsck", "-p", str(image), ok=(0, 1))
    report = await _tool(
        sandbox_id,
        "debugfs",
        "-w",
        "-f",
        "-",
        str(image),
        stdin=f"sif <2> uid {uid}\nsif <2> gid {gid}\nstat <2>\n".encode(),
    )
    if not re.search(rf"User:\s+{uid}\s+Group:\s+{gid}\b", report):
        raise SandboxStartError(
            f"the volume {image} could not be handed to the sandbox user {uid}:{gid}",
            sandbox_id=sandbox_id,
            backend="microvm",
            stderr_tail=report[-800:],
            hint="check the image is an ext4 file system (`e2fsck -f IMAGE`)",
        )


async def _tool(sandbox_id: str, *argv: str, ok: tuple[int, ...] = (0,), stdin: bytes = b"") -> str:
    if shutil.which(argv[0]) is None:
        raise BackendUnavailableError(
            f"'{argv[0]}' is not installed: pets' volumes on microVMs need it",
            backend="microvm",
            hint="apt-get install e2fsprogs",
        )
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate(stdin)
    text = output.decode(errors="replace")
    if proc.returncode not in ok:
        raise SandboxStartError(
            f"{argv[0]} failed on the volume (exit {proc.returncode})",
            sandbox_id=sandbox_id,
            backend="microvm",
            stderr_tail=text[-800:],
            hint=f"check the image with `e2fsck -f {argv[-1]}`",
        )
    return text

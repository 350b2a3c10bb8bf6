"""Pets' persistent volumes: a sparse ext4 image per (tenant, name) under the state
dir, loop-mounted on the host and bound read-write into the sandbox, or (mode
"disk", for microVMs) handed to the backend as the image itself, which the guest
mounts.

The file system's size is the limit (a write past it fails with ENOSPC inside the
sandbox); the image outlives the sandbox, so a pet re-created under the same name
finds its data again. Only `remove` deletes it. In mode "dir" (the fake backend,
which mounts nothing) a volume is a plain directory with no limit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral._sys import mounts
from corral.backends.base import HostMount
from corral.errors import BackendUnavailableError, InfrastructureError, UserError

__all__ = ["Volume", "VolumeStore"]


@dataclass(frozen=True, slots=True)
class Volume:
    """One volume: its image file and the host directory it is mounted on."""

    tenant: str
    name: str
    image: Path
    mountpoint: Path

    @property
    def size(self) -> int:
        return self.image.stat().st_size if self.image.exists() else 0


VolumeMode = Literal["mount", "disk", "dir"]


class VolumeStore:
    """Create, mount, unmount and remove volumes under `root` (`<state>/volumes`).

    `mode`: "mount" loop-mounts the image on the host (container backends bind the
    mount point); "disk" leaves the image unmounted for a backend that attaches it
    as a disk (Capability.VOLUME_DISK: one writer at a time, so never both);
    "dir" is a plain directory (the fake backend)."""

    def __init__(self, root: Path, *, mode: VolumeMode = "mount") -> None:
        self.root = root
        self.mode = mode

    def volume(self, tenant: str, name: str) -> Volume:
        base = self.root / tenant / name
        return Volume(tenant, name, base / "volume.ext4", base / "mnt")

    async def ensure(self, tenant: str, name: str, size: int) -> Volume:
        """The volume, made (`size` bytes, sparse) if missing, grown if `size` is larger,
        and mounted. A volume is never shrunk: its data may not fit."""
        volume = self.volume(tenant, name)
        if self.mode == "dir":
            volume.mountpoint.mkdir(parents=True, exist_ok=True)
            volume.image.touch()
            return volume
        volume.image.parent.mkdir(parents=True, exist_ok=True)
        _check_room(self.root, size - volume.size)
        if not volume.image.exists():
            partial = volume.image.with_suffix(".partial")
            with open(partial, "wb") as image:
                image.truncate(size)
            await _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(partial))
            partial.rename(volume.image)
        elif size > volume.size:
            # Only while unmounted: resize2fs of a mounted ext4 needs the kernel's
            # online resize, which works, but keep it simple and predictable.
            self.unmount(volume)
            await _released(volume)
            with open(volume.image, "r+b") as image:
                image.truncate(size)
            await _run("e2fsck", "-f", "-p", str(volume.image), ok=(0, 1))
            await _run("resize2fs", "-f", str(volume.image))
        if self.mode == "disk":
            self.unmount(volume)  # e.g. left mounted by a container pet of that name
            await _released(volume)
            return volume
        volume.mountpoint.mkdir(parents=True, exist_ok=True)
        if not self.is_mounted(volume):
            await _released(volume)  # one file system instance per image, ever
            await _run(
                "mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(volume.image),
                str(volume.mountpoint),
            )  # fmt: skip
        return volume

    def host_mount(self, volume: Volume, target: str) -> HostMount:
        """How the backend gets `volume` at `target`: the mount point, or in mode
        "disk" the image itself."""
        source = volume.image if self.mode == "disk" else volume.mountpoint
        return HostMount(source, target, writable=True)

    def is_mounted(self, volume: Volume) -> bool:
        return volume.mountpoint in mounts.mounts_under(volume.mountpoint)

    def unmount(self, volume: Volume) -> None:
        """Unmount (the loop device goes with the last user: it is autoclear)."""
        for point in mounts.mounts_under(volume.mountpoint):
            mounts.unmount(point)

    def remove(self, tenant: str, name: str) -> None:
        """Unmount and delete the volume and its data; harmless when absent."""
        volume = self.volume(tenant, name)
        self.unmount(volume)
        shutil.rmtree(volume.image.parent, ignore_errors=True)
        parent = volume.image.parent.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()

    def list(self) -> list[Volume]:
        if not self.root.is_dir():
            return []
        return [
            self.volume(tenant.name, base.name)
            for tenant in sorted(self.root.iterdir())
            for base in sorted(tenant.iterdir())
            if (base / "volume.ext4").exists()
        ]


async def _released(volume: Volume, timeout: float = 15.0) -> None:
    """Wait until no loop device backs the image. An unmount is lazy: the file system
    lives on (and writes its superblock back) until the last process of the sandbox
    that used it is gone; resizing the image or handing it to a VM before that
    loses the change, or corrupts it."""
    deadline = time.monotonic() + timeout
    while devices := _loop_devices(volume.image):
        if time.monotonic() > deadline:
            raise InfrastructureError(
                f"volume '{volume.image.parent.name}' is still in use ({', '.join(devices)}"
                " backs it)",
                hint="wait until the sandbox that used it has exited, then retry",
            )
        await asyncio.sleep(0.05)


def _loop_devices(image: Path) -> list[str]:
    """The loop devices whose backing file is `image`."""
    target = os.path.realpath(image)
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            text = backing.read_text().strip()
        except OSError:
            continue
        if text in (target, target + " (deleted)"):
            found.append(backing.parent.parent.name)
    return found


def _check_room(root: Path, grow: int) -> None:
    """UserError when the state dir's file system could not hold `grow` more bytes:
    images are sparse, and a full host disk would break every volume at once."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if grow > free:
        raise UserError(
            f"a volume of {grow >> 20} MiB more does not fit: {free >> 20} MiB free under {root}",
            hint="ask for a smaller volume (--volume), or free disk space on the host",
        )


async def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> None:
    if shutil.which(argv[0]) is None:
        raise BackendUnavailableError(
            f"'{argv[0]}' is not installed: pets' volumes need it",
            hint="apt-get install e2fsprogs mount",
        )
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode not in ok:
        raise InfrastructureError(
            f"{argv[0]} failed (exit {proc.returncode}): "
            + output.decode(errors="replace").strip()[-500:],
            hint="check the state dir's disk has room and loop devices are available",
        )

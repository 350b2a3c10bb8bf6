"""mount(2)/umount2(2) through libc, and /proc/self/mountinfo queries (no subprocess)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from pathlib import Path

MNT_DETACH = 2
MS_NOSUID = 0x2
MS_NODEV = 0x4


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_tmpfs(target: Path, *, size: int, mode: int = 0o755) -> None:
    """Mount a tmpfs of at most `size` bytes on `target` (nosuid, nodev)."""
    data = f"size={size},mode={mode:o}".encode()
    rc = _libc().mount(b"tmpfs", os.fsencode(target), b"tmpfs", MS_NOSUID | MS_NODEV, data)
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount tmpfs on {target}: {os.strerror(errno)}")


def unmount(target: Path) -> None:
    """Lazily unmount `target`; a path that is not a mount point is left alone."""
    rc = _libc().umount2(os.fsencode(target), MNT_DETACH)
    if rc != 0:
        errno = ctypes.get_errno()
        if errno in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            return
        raise OSError(errno, f"umount {target}: {os.strerror(errno)}")


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix`, deepest first (so they unmount in order)."""
    root = str(prefix).rstrip("/")
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            point = line.split(" ", 5)[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)

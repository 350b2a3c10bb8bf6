"""The guest's initramfs: the agent as /init plus the kernel modules it loads, as newc cpio.

Uncompressed on purpose: the kernel unpacks it at boot, and under TCG every
decompression costs real seconds. The agent is a static C program built here
with the host's gcc, so it runs before any root filesystem is mounted.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from corral.errors import ImageBuildError

__all__ = ["AGENT_SOURCE", "build_agent", "write_initramfs"]

AGENT_SOURCE = Path(__file__).parent / "agent" / "agent.c"
_CFLAGS = ("-static", "-O2", "-Wall", "-Wno-format-truncation", "-s")


def agent_digest() -> str:
    """What the agent binary is built from: its source and the compiler flags."""
    data = AGENT_SOURCE.read_bytes() + " ".join(_CFLAGS).encode()
    return hashlib.sha256(data).hexdigest()


def build_agent(target: Path) -> None:
    """Compile the guest agent into `target` (a static x86-64 binary)."""
    temp = target.with_name(f".{target.name}.{os.getpid()}")
    argv = ["gcc", *_CFLAGS, "-o", str(temp), str(AGENT_SOURCE)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError("gcc is not installed", hint="apt-get install gcc libc6-dev") from exc
    if done.returncode != 0:
        raise ImageBuildError(
            "building the guest agent failed",
            stderr_tail=done.stderr[-800:],
            hint="static glibc is needed: apt-get install libc6-dev",
        )
    temp.rename(target)


def write_initramfs(
    target: Path, agent: Path, modules: Sequence[Path], vmm_modules: Sequence[Path] = ()
) -> None:
    """An initramfs with /init (the agent), /lib/modules/*.ko, /modules.order (loaded at
    every boot) and /vmm-modules.order (loaded under Firecracker / Cloud Hypervisor)."""
    archive = _Cpio()
    for directory in ("dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("init", stat.S_IFREG | 0o755, agent.read_bytes())
    for listing, group in (("modules.order", modules), ("vmm-modules.order", vmm_modules)):
        order = []
        for module in group:
            archive.add(f"lib/modules/{module.name}", stat.S_IFREG | 0o644, module.read_bytes())
            order.append(f"/lib/modules/{module.name}\n")
        archive.add(listing, stat.S_IFREG | 0o644, "".join(order).encode())
    temp = target.with_name(f".{target.name}.{os.getpid()}")
    temp.write_bytes(archive.finish())
    temp.rename(target)


class _Cpio:
    """A minimal writer of the kernel's `newc` cpio format (all entries owned by root)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        self._out.write(encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self._out.getvalue()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

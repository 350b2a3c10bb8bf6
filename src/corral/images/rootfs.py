"""The bases a rootfs starts from: the host's /usr, a static busybox, or Debian.

Each base knows the host facts its content depends on (`inputs`, part of the
image cache key) and how to lay itself down (`populate`);
`corral.images.skeleton` then adds what every sandbox needs.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from corral.errors import ImageBuildError
from corral.spec.template import Template

__all__ = [
    "BaseBuilder",
    "BusyboxBase",
    "DebianBase",
    "HostBase",
    "builder_for",
    "remove_tree",
]

Log = Callable[[str], None]

DEBIAN_SUITE = "bookworm"
# Top-level names a merged-/usr host makes symlinks into /usr; the host base
# recreates the ones this host has, so /bin/sh works once /usr is bound.
_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class BaseBuilder(Protocol):
    """How one `base` becomes the bottom of a rootfs."""

    def inputs(self) -> dict[str, str]:
        """Host facts the base's content depends on; a change means a rebuild."""
        ...

    def populate(self, rootfs: Path, log: Log, epoch: int) -> None:
        """Create `rootfs` (which must not exist) and lay the base down in it."""
        ...


def builder_for(template: Template) -> BaseBuilder:
    """The builder for the template's `base` (already validated by the template)."""
    if template.base == "host":
        return HostBase()
    if template.base == "busybox":
        return BusyboxBase()
    return DebianBase(template.packages)


_HOST_INPUTS: dict[Path, tuple[tuple[tuple[int, ...], ...], dict[str, str]]] = {}


def _stat_signature(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HostBase:
    """The host's userland: /usr is bound read-only at run time, never copied.

    Only the small bits of /etc that programs from /usr need are copied:
    the linker cache, the alternatives symlinks (`cc` for the Rust linker),
    and the release files.
    """

    def __init__(self, host: Path = Path("/")) -> None:
        self.host = host

    def inputs(self) -> dict[str, str]:
        # Hashing these costs ~9 ms, paid on every sandbox create: reuse the result
        # while none of the inputs' stat() signatures changed.
        etc = self.host / "etc"
        names = ("alternatives", "ld.so.cache", "debian_version", "os-release")
        signature = tuple(_stat_signature(etc / name) for name in names)
        cached = _HOST_INPUTS.get(self.host)
        if cached is not None and cached[0] == signature:
            return dict(cached[1])
        result = self._inputs(etc)
        _HOST_INPUTS[self.host] = (signature, result)
        return dict(result)

    def _inputs(self, etc: Path) -> dict[str, str]:
        alternatives = etc / "alternatives"
        listing = (
            "\n".join(f"{p.name}->{_link_or_file(p)}" for p in sorted(alternatives.iterdir()))
            if alternatives.is_dir()
            else ""
        )
        return {
            "ld.so.cache": _sha256_file(etc / "ld.so.cache"),
            "alternatives": hashlib.sha256(listing.encode()).hexdigest(),
            "debian_version": _sha256_file(etc / "debian_version"),
            "os-release": _sha256_file(etc / "os-release"),
            "usr-links": ",".join(f"{n}->{t}" for n, t in self._usr_links()),
        }

    def populate(self, rootfs: Path, log: Log, epoch: int) -> None:
        log("linking the host's /usr")
        rootfs.mkdir(mode=0o755)
        (rootfs / "usr").mkdir(mode=0o755)
        for name, target in self._usr_links():
            (rootfs / name).symlink_to(target)
        log("copying the host's linker cache and alternatives")
        etc = rootfs / "etc"
        etc.mkdir(mode=0o755)
        for name in ("ld.so.cache", "debian_version", "os-release"):
            source = self.host / "etc" / name
            if source.exists():
                shutil.copyfile(source, etc / name)  # follows os-release -> ../usr/lib/...
                os.chmod(etc / name, 0o644)
        alternatives = self.host / "etc" / "alternatives"
        if alternatives.is_dir():
            shutil.copytree(alternatives, etc / "alternatives", symlinks=True)
            os.chmod(etc / "alternatives", 0o755)

    def _usr_links(self) -> list[tuple[str, str]]:
        links = []
        for name in _USR_LINKS:
            path = self.host / name
            if path.is_symlink():
                links.append((name, os.readlink(path)))
            elif path.exists():
                raise ImageBuildError(
                    f"the host's /{name} is a directory, not a symlink into /usr",
                    hint="base 'host' needs a merged-/usr host (Debian 12 or later); "
                    "use base 'debian:bookworm' on this host",
                )
        return links


class BusyboxBase:
    """A static busybox (Debian's busybox-static) with one symlink per applet."""

    def __init__(self, binary: Path = Path("/usr/bin/busybox")) -> None:
        self.binary = binary

    def inputs(self) -> dict[str, str]:
        self._check()
        return {"busybox": _sha256_file(self.binary)}

    def populate(self, rootfs: Path, log: Log, epoch: int) -> None:
        self._check()
        log("installing busybox")
        applets = subprocess.run(
            [str(self.binary), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        rootfs.mkdir(mode=0o755)
        bin_dir = rootfs / "bin"
        bin_dir.mkdir(mode=0o755)
        shutil.copyfile(self.binary, bin_dir / "busybox")
        os.chmod(bin_dir / "busybox", 0o755)
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (bin_dir / applet).symlink_to("busybox")
        # `#!/usr/bin/env sh` is the most common shebang there is.
        (rootfs / "usr" / "bin").mkdir(mode=0o755, parents=True)
        (rootfs / "usr" / "bin" / "env").symlink_to("/bin/busybox")

    def _check(self) -> None:
        hint = "apt-get install busybox-static"
        if not self.binary.is_file():
            raise ImageBuildError(f"base 'busybox' needs {self.binary}", hint=hint)
        if not _is_static_elf(self.binary):
            raise ImageBuildError(
                f"{self.binary} is dynamically linked, so it cannot run in its own rootfs",
                hint=hint,
            )


class DebianBase:
    """A minimal Debian (mmdebstrap minbase) plus the template's packages."""

    def __init__(self, packages: tuple[str, ...] = (), suite: str = DEBIAN_SUITE) -> None:
        self.packages = packages
        self.suite = suite

    def inputs(self) -> dict[str, str]:
        # The mirror moves on, so a cached image keeps the packages of the day
        # it was built; `build(force=True)` picks up updates.
        return {"suite": self.suite, "variant": "minbase", "packages": ",".join(self.packages)}

    def populate(self, rootfs: Path, log: Log, epoch: int) -> None:
        mmdebstrap = shutil.which("mmdebstrap")
        if mmdebstrap is None:
            raise ImageBuildError(
                "base 'debian:bookworm' needs mmdebstrap", hint="apt-get install mmdebstrap"
            )
        if os.geteuid() != 0:
            raise ImageBuildError(
                "base 'debian:bookworm' is built with mmdebstrap --mode=root, which needs root",
                hint="build the image as root (e.g. sudo corral images build ...)",
            )
        argv = [mmdebstrap, "--variant=minbase", "--mode=root"]
        if self.packages:
            argv.append("--include=" + ",".join(self.packages))
        argv += [self.suite, str(rootfs)]
        log("running " + " ".join(argv))
        _run_streaming(argv, {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}, log)


def remove_tree(path: Path) -> None:
    """Delete `path`, first unmounting anything mounted inside it.

    An interrupted mmdebstrap can leave /proc, /sys or /dev mounted in its
    target; deleting through those would delete from the host.
    """
    for mount_point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
    if _mounts_under(path):
        raise ImageBuildError(
            f"cannot delete {path}: something is still mounted inside it",
            hint=f"unmount what `findmnt -R {path}` lists, then delete the directory",
        )
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), ln.split()[4]) for ln in lines]
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(inside, reverse=True)  # deepest first


def _run_streaming(argv: list[str], env: dict[str, str], log: Log) -> None:
    """Run `argv`, passing each output line to `log`; ImageBuildError on failure."""
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
    ) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line)
                log(line.rstrip())
            status = process.wait()
        finally:
            if process.poll() is None:  # interrupted: do not leave mmdebstrap running
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    if status != 0:
        raise ImageBuildError(
            f"{Path(argv[0]).name} failed (exit {status})",
            stderr_tail="".join(tail),
            hint="check access to the Debian mirror (deb.debian.org) and that every package "
            f"exists in {DEBIAN_SUITE}",
        )


def _sha256_file(path: Path) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _link_or_file(path: Path) -> str:
    return os.readlink(path) if path.is_symlink() else _sha256_file(path)


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit ELF file without a program interpreter (PT_INTERP)."""
    with path.open("rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        order = "<" if header[5] == 1 else ">"
        (table_offset,) = struct.unpack_from(order + "Q", header, 0x20)
        entry_size, count = struct.unpack_from(order + "HH", header, 0x36)
        handle.seek(table_offset)
        table = handle.read(entry_size * count)
    kinds = (struct.unpack_from(order + "I", table, i * entry_size)[0] for i in range(count))
    return 3 not in kinds  # 3 = PT_INTERP

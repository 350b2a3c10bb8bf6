"""The guest kernel: Debian's linux-image package, unpacked into an uncompressed vmlinux.

QEMU's microvm machine boots an ELF vmlinux through its PVH entry point, which
skips the bzImage's self-decompression (~3.5 s under TCG). Modules come from
the same package, resolved in dependency order from each module's `.modinfo`
(the .deb carries no modules.dep: depmod runs at install time).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ImageBuildError

__all__ = ["GUEST_MODULES", "VMM_MODULES", "GuestKernel", "ensure_kernel", "module_order"]

KERNEL_PACKAGE = "linux-image-amd64"
# What a Corral guest needs: virtio-mmio transport, disks, the agent's serial
# ports, ext4 (scratch) and erofs (read-only bases). crc32c_generic is asked for
# through the crypto API (no symbol dependency), so it is named explicitly.
GUEST_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "crc32c_generic", "ext4", "erofs")
# What a Firecracker or Cloud Hypervisor guest loads on top (the agent does when
# the cmdline has corral.vsock=): virtio-vsock for the agent, and virtio-pci,
# Cloud Hypervisor's transport for every device.
VMM_MODULES = ("virtio_pci", "vmw_vsock_virtio_transport")
_XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True, slots=True)
class GuestKernel:
    """An unpacked kernel package: `vmlinux` plus the modules a guest loads, in order."""

    version: str  # the package version, e.g. 6.1.0-56-amd64 6.1.192-2
    digest: str  # sha256 of the .deb it came from
    vmlinux: Path
    modules: tuple[Path, ...]
    vmm_modules: tuple[Path, ...] = ()  # loaded after `modules` under Firecracker / CH


def ensure_kernel(
    cache: Path, package: str = KERNEL_PACKAGE, *, refresh: bool = False
) -> GuestKernel:
    """The guest kernel under `cache/kernel`, downloaded with apt and unpacked on first use.

    The kernel in use is pinned by `cache/kernel/current-<package>` so creating a
    sandbox never asks apt; `refresh` resolves the package again (a newer kernel
    then makes new bundles, and old snapshots keep theirs).
    """
    pin = cache / "kernel" / f"current-{package}"
    with _locked(cache / "kernel" / ".lock"):
        pinned = pin.read_text().strip() if pin.is_file() and not refresh else ""
        target = cache / "kernel" / pinned
        if not pinned or not (target / "digest").is_file():
            name, version = _resolve(package)
            target = cache / "kernel" / f"{name}_{version}"
            if not (target / "digest").is_file():
                _unpack(name, version, target)
            pin.write_text(target.name + "\n")
        if not (target / "vmm-modules.order").is_file():  # unpacked before VMM_MODULES existed
            name, _, version = target.name.partition("_")
            _unpack(name, version, target)

    def listed(order: str) -> tuple[Path, ...]:
        return tuple(target / "modules" / line for line in _read_lines(target / order))

    return GuestKernel(
        version=target.name.replace("_", " "),
        digest=(target / "digest").read_text().strip(),
        vmlinux=target / "vmlinux",
        modules=listed("modules.order"),
        vmm_modules=listed("vmm-modules.order"),
    )


def _resolve(package: str) -> tuple[str, str]:
    """The real image package behind a metapackage, and its candidate version."""
    name = package
    for _ in range(3):
        shown = _run(["apt-cache", "show", "--no-all-versions", name])
        fields = dict(
            line.split(": ", 1) for line in shown.splitlines() if ": " in line and line[0] != " "
        )
        depends = fields.get("Depends", "")
        if name.startswith("linux-image-") and "Version" in fields:
            real = [d.split()[0] for d in depends.split(", ") if d.startswith("linux-image-")]
            if not real:
                return name, fields["Version"]
            name = real[0]
    raise ImageBuildError(f"cannot resolve the kernel package '{package}'", hint="apt-get update")


def _unpack(name: str, version: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        _run(
            ["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{name}={version}"],
            cwd=work,
        )
        deb = next(work.glob("*.deb"))
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        stage = work / "out"
        (stage / "modules").mkdir(parents=True)
        vmlinuz = next((work / "root" / "boot").glob("vmlinuz-*"))
        (stage / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        available = {
            path.name.removesuffix(".ko").replace("-", "_"): path
            for path in (work / "root").glob("lib/modules/*/kernel/**/*.ko")
        }
        order = module_order(GUEST_MODULES, available)
        vmm_order = [m for m in module_order(VMM_MODULES, available) if m not in order]
        for module in (*order, *vmm_order):
            shutil.copyfile(available[module], stage / "modules" / f"{module}.ko")
        (stage / "modules.order").write_text("".join(f"{m}.ko\n" for m in order))
        (stage / "vmm-modules.order").write_text("".join(f"{m}.ko\n" for m in vmm_order))
        (stage / "digest").write_text(f"sha256:{digest}\n")
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    except (OSError, StopIteration) as exc:
        raise ImageBuildError(
            f"unpacking the kernel package {name}={version} failed: {exc}",
            hint="check free space and that dpkg-deb is installed",
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz-compressed (Debian's)."""
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        raise ImageBuildError(
            "the kernel image has no xz payload", hint="use a Debian linux-image package"
        )
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise ImageBuildError("the kernel payload is not an ELF vmlinux", hint="report a bug")
    return elf


def module_order(wanted: Sequence[str], available: dict[str, Path]) -> list[str]:
    """`wanted` and everything they depend on, each after its dependencies."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in available:
            raise ImageBuildError(
                f"kernel module '{name}' is not in the kernel package",
                hint="the guest kernel must build it as a module or in",
            )
        if name in visiting:
            raise ImageBuildError(f"kernel module dependency cycle at '{name}'", hint="report it")
        visiting.add(name)
        for dep in modinfo(available[name].read_bytes()).get("depends", "").split(","):
            if dep:
                visit(dep.replace("-", "_"))
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value pairs of an ELF64 module's `.modinfo` section."""
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from("<I", ko, base)[0]
        offset, size = struct.unpack_from("<QQ", ko, base + 0x18)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if ko[names_at + name : ko.index(b"\0", names_at + name)] == b".modinfo":
            entries = ko[offset : offset + size].split(b"\0")
            pairs = (entry.decode(errors="replace").split("=", 1) for entry in entries if entry)
            return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}
    return {}


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} is not installed", hint="run on Debian") from exc
    if done.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv[:3])} failed (exit {done.returncode})",
            stderr_tail=done.stderr[-800:],
            hint="check the apt sources (apt-get update) and the network to the Debian mirror",
        )
    return done.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

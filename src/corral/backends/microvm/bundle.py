"""MicroVM bundles: a template's image as a kernel, an initramfs and read-only disks.

A bundle is content-addressed like the OCI image it comes from, and cached
under the microVM cache directory (default /var/cache/corral/microvm):

    kernel/<package>_<version>/   vmlinux + the guest's modules (see kernel.py)
    agents/<digest>               the static guest agent
    bundles/<key>/                vmlinux, initramfs.cpio, rootfs.erofs, bundle.json
    hostfs/<key>.erofs            a host directory (e.g. /usr of a `host` template)
    scratch/<size>-<uid>-<gid>.ext4   an empty scratch filesystem, the base of
                                  every sandbox's qcow2 overlay

A VM cannot bind host paths the way a container does, so a template's host
mounts (the host's /usr for `base = "host"`) become read-only erofs disks,
keyed by the directory's path and a stat signature of its top two levels and
dpkg's status file (installing a package changes one of them).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.backends.base import HostMount, ImageRef
from corral.backends.microvm import initramfs
from corral.backends.microvm.kernel import GuestKernel, ensure_kernel
from corral.errors import ImageBuildError

__all__ = ["DEFAULT_CACHE", "Bundle", "BundleStore", "Disk"]

DEFAULT_CACHE = Path("/var/cache/corral/microvm")
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Disk:
    """A read-only disk the guest mounts at `target` (its virtio serial names it)."""

    serial: str
    path: Path
    fstype: str
    target: str


@dataclass(frozen=True, slots=True)
class Bundle:
    """Everything a microVM boots from, all of it shared read-only by its sandboxes."""

    key: str
    kernel: Path
    initramfs: Path
    disks: tuple[Disk, ...]  # the rootfs first, then host mounts
    kernel_version: str


class BundleStore:
    """Builds and caches bundles under `root` (many processes may share one root)."""

    def __init__(self, root: Path = DEFAULT_CACHE, *, kernel_package: str | None = None) -> None:
        self.root = Path(root)
        self.kernel_package = kernel_package

    def kernel(self) -> GuestKernel:
        if self.kernel_package:
            return ensure_kernel(self.root, self.kernel_package)
        return ensure_kernel(self.root)

    def bundle(self, image: ImageRef, mounts: Sequence[HostMount] = ()) -> Bundle:
        """The bundle for `image` plus `mounts`, built on first use."""
        if not image.rootfs.is_dir():
            raise ImageBuildError(
                f"the image's rootfs {image.rootfs} does not exist",
                hint="rebuild the image (`corral images build`)",
            )
        kernel = self.kernel()
        agent = self._agent()
        host_disks = tuple(
            Disk(f"m{index}", self._host_disk(mount.source), "erofs", mount.target)
            for index, mount in enumerate(mounts)
        )
        inputs = {
            "format": _FORMAT,
            "kernel": kernel.digest,
            "modules": [m.name for m in (*kernel.modules, *kernel.vmm_modules)],
            "agent": agent.name,
            "image": image.digest,
        }
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        directory = self.root / "bundles" / key
        with _locked(self.root / "bundles" / f".{key}.lock"):
            if not (directory / "bundle.json").is_file():
                self._build(directory, kernel, agent, image, inputs)
        rootfs = Disk("root", directory / "rootfs.erofs", "erofs", "/")
        return Bundle(
            key=key,
            kernel=directory / "vmlinux",
            initramfs=directory / "initramfs.cpio",
            disks=(rootfs, *host_disks),
            kernel_version=kernel.version,
        )

    def scratch_base(self, size: int, uid: int, gid: int) -> Path:
        """An empty ext4 of `size` bytes with tmp/, home/ and work/ for the sandbox user."""
        target = self.root / "scratch" / f"{size}-{uid}-{gid}.ext4"
        with _locked(self.root / "scratch" / ".lock"):
            if target.is_file():
                return target
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".stage-") as stage:
                for name, mode, owner in (
                    ("tmp", 0o1777, (0, 0)),
                    ("home", 0o755, (uid, gid)),
                    ("work", 0o755, (uid, gid)),
                ):
                    path = Path(stage, "tree", name)
                    path.mkdir(parents=True)
                    os.chown(path, *owner)
                    path.chmod(mode)
                temp = Path(stage, "fs.ext4")
                with open(temp, "wb") as handle:
                    handle.truncate(size)
                _run(
                    [
                        *("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "scratch"),
                        *("-O", "^has_journal,^metadata_csum", "-E", "root_owner=0:0"),
                        *("-d", str(Path(stage, "tree")), str(temp)),
                    ]
                )
                temp.rename(target)
        return target

    # -- pieces -------------------------------------------------------------

    def _agent(self) -> Path:
        target = self.root / "agents" / initramfs.agent_digest()
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            initramfs.build_agent(target)
        return target

    def _build(
        self,
        directory: Path,
        kernel: GuestKernel,
        agent: Path,
        image: ImageRef,
        inputs: dict[str, object],
    ) -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            _link_or_copy(kernel.vmlinux, stage / "vmlinux")
            initramfs.write_initramfs(
                stage / "initramfs.cpio", agent, kernel.modules, kernel.vmm_modules
            )
            _mkfs_erofs(image.rootfs, stage / "rootfs.erofs")
            (stage / "bundle.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
            if directory.exists():
                shutil.rmtree(directory)
            stage.rename(directory)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _host_disk(self, source: Path) -> Path:
        signature = _tree_signature(source)
        key = hashlib.sha256(f"{_FORMAT}\n{source}\n{signature}".encode()).hexdigest()
        target = self.root / "hostfs" / f"{key}.erofs"
        with _locked(self.root / "hostfs" / f".{key}.lock"):
            if not target.is_file():
                for stale in target.parent.glob(f"{_slug(source)}-*.erofs"):
                    stale.unlink(missing_ok=True)
                temp = target.with_name(f".{key}.tmp")
                _mkfs_erofs(source, temp)
                temp.rename(target)
                (target.parent / f"{_slug(source)}-{key[:12]}.erofs").symlink_to(target.name)
        return target


def _slug(source: Path) -> str:
    return str(source).strip("/").replace("/", "_") or "root"


def _tree_signature(source: Path) -> str:
    """Stats of `source`, its children, grandchildren and dpkg's status: changes on installs."""
    if not source.is_dir():
        raise ImageBuildError(
            f"host mount source {source} is not a directory",
            hint="check the template's [[mounts]]",
        )
    entries = [source, Path("/var/lib/dpkg/status")]
    for child in sorted(source.iterdir()):
        entries.append(child)
        if child.is_dir() and not child.is_symlink():
            with contextlib.suppress(OSError):
                entries.extend(sorted(child.iterdir()))
    parts = []
    for entry in entries:
        try:
            st = entry.lstat()
        except OSError:
            continue
        parts.append(f"{entry}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _mkfs_erofs(source: Path, target: Path) -> None:
    # -T0: every timestamp 0, so the same tree gives the same disk.
    _run(["mkfs.erofs", "--quiet", "-T0", "-Enoinline_data", str(target), str(source)])


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _run(argv: Sequence[str]) -> None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{argv[0]} is not installed", hint="apt-get install erofs-utils e2fsprogs"
        ) from exc
    if done.returncode != 0:
        raise ImageBuildError(
            f"{argv[0]} failed (exit {done.returncode})",
            stderr_tail=done.stderr[-800:],
            hint="check free space under the microVM cache directory",
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def prebuild(template_names: Sequence[str], cache: Path = DEFAULT_CACHE) -> list[Bundle]:
    """Build the bundles of built-in templates ahead of time (for set-up scripts and CI:
    the host's /usr disk alone takes a minute once)."""
    from corral.images import ImageStore
    from corral.spec.template import load_template

    with tempfile.TemporaryDirectory(prefix="corral-prebuild-", dir="/var/tmp") as scratch:
        images = ImageStore(Path(scratch))
        store = BundleStore(cache)
        built = []
        for name in template_names:
            image = images.build(load_template(name))
            built.append(store.bundle(image.to_ref(), image.host_mounts))
        return built


if __name__ == "__main__":  # python -m corral.backends.microvm.bundle [TEMPLATE...]
    import sys

    for done in prebuild(sys.argv[1:] or ["default"]):
        print(f"bundle {done.key[:16]} ({done.kernel_version})")

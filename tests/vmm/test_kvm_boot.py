"""Real boots under Firecracker and Cloud Hypervisor: the `kvm` tier.

Deselected by default (`-m "not kvm"`): our CI machines have no hardware
virtualization (/dev/kvm there is PVM), so these never ran here. On a host
with KVM, the VMM binaries on PATH and a microVM bundle directory in
$CORRAL_KVM_BUNDLE (vmlinux, initramfs.cpio and a rootfs image, as
corral.backends.microvm.bundle writes them), run `pytest -m kvm tests/vmm`.
A missing prerequisite fails the test rather than skipping it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backends.microvm.vmm import (
    BootSpec,
    CloudHypervisorDriver,
    DiskSpec,
    FirecrackerDriver,
    RestoreSpec,
    VmmDriver,
    VmmState,
)
from tests.vmm.harness import assert_released

pytestmark = pytest.mark.kvm

BOOT_MARKER = "Linux version"


def _require_kvm(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not on PATH: install its static release binary")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.fail("/dev/kvm is missing or not accessible")
    if not any(Path(f"/sys/module/{m}").is_dir() for m in ("kvm_intel", "kvm_amd")):
        pytest.fail("no kvm_intel/kvm_amd: this host has no hardware virtualization")


def _boot_spec(work: Path) -> BootSpec:
    bundle = os.environ.get("CORRAL_KVM_BUNDLE")
    if not bundle:
        pytest.fail("set CORRAL_KVM_BUNDLE to a microVM bundle directory")
    root = Path(bundle)
    rootfs = next((p for p in sorted(root.glob("rootfs.*"))), None)
    if rootfs is None or not (root / "vmlinux").is_file():
        pytest.fail(f"{root} is not a bundle (vmlinux, initramfs.cpio, rootfs.*)")
    overlay = work / "overlay.ext4"
    with overlay.open("wb") as file:
        file.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(overlay)], check=True)
    initramfs = root / "initramfs.cpio"
    return BootSpec(
        kernel=root / "vmlinux",
        initrd=initramfs if initramfs.is_file() else None,
        rootfs=rootfs,
        overlay=overlay,
        cmdline=os.environ.get("CORRAL_KVM_CMDLINE", "console=ttyS0 reboot=k panic=1"),
        vcpus=1,
        memory_mib=256,
    )


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _wait_for(path: Path, text: str, deadline: float = 30.0) -> None:
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else "<no output>"
    pytest.fail(f"{text!r} not seen in {path} within {deadline}s:\n{tail}")


async def _boot_snapshot_restore(
    make: type[FirecrackerDriver] | type[CloudHypervisorDriver], console: str, work: Path
) -> None:
    boot = _boot_spec(work)
    first: VmmDriver = make(work / "a", sandbox_id="kvm-a")
    try:
        await first.start()
        await first.configure(boot)
        await first.boot()
        await _wait_for(work / "a" / console, BOOT_MARKER)
        await first.pause()
        await first.snapshot(work / "snap")
    finally:
        await first.shutdown()
    assert_released(first, None)

    second: VmmDriver = make(work / "b", sandbox_id="kvm-b")
    try:
        await second.start()
        disks = (DiskSpec("rootfs", boot.rootfs, True), DiskSpec("overlay", boot.overlay, False))
        await second.restore(RestoreSpec(work / "snap", disks=disks, resume=True))
        info = await second.info()
        assert info.state is VmmState.RUNNING
    finally:
        await second.shutdown()
    assert_released(second, None)


async def test_firecracker_boots_snapshots_and_restores(work: Path) -> None:
    _require_kvm("firecracker")
    await _boot_snapshot_restore(FirecrackerDriver, "firecracker.log", work)


async def test_cloud_hypervisor_boots_snapshots_and_restores(work: Path) -> None:
    _require_kvm("cloud-hypervisor")
    await _boot_snapshot_restore(CloudHypervisorDriver, "serial.log", work)

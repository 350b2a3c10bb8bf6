"""Real boots under Firecracker and Cloud Hypervisor: the `kvm` tier.

Deselected by default (`-m "not kvm"`): our CI machines have no hardware
virtualization (/dev/kvm there is PVM), so these never ran here. On a host
with KVM and the VMM binaries on PATH, run `pytest -m kvm tests/vmm` as root:

- the driver tests boot a bundle directory named by $CORRAL_KVM_BUNDLE
  (vmlinux, initramfs.cpio and a rootfs image, as
  corral.backends.microvm.bundle writes them) and watch the serial console;
- the backend tests run `MicrovmBackend(vmm=...)` end to end with a real guest:
  the bundle built from the default template, the agent over real vsock.

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
from typing import Any

import pytest

from corral.backends.base import BackendStatus, ExecRequest, SandboxConfig, SandboxLimits
from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.vmm import (
    BootSpec,
    CloudHypervisorDriver,
    DiskSpec,
    FirecrackerDriver,
    RestoreSpec,
    VmmDriver,
    VmmState,
)
from tests.conftest import TEST_LABEL, require_root
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


@pytest.mark.parametrize("vmm", ["firecracker", "cloud-hypervisor"])
async def test_backend_runs_a_real_guest(vmm: str, state_root: Path, default_image: Any) -> None:
    """The backend's whole path with a real guest: what tests/test_vmm_backend.py simulates."""
    require_root()
    _require_kvm(vmm)
    backend = MicrovmBackend(state_root, vmm=vmm)
    config = SandboxConfig(
        sandbox_id=f"kvm-{os.urandom(4).hex()}",
        image=default_image.to_ref(),
        limits=SandboxLimits(memory=256 << 20, pids=128, disk=64 << 20),
        mounts=list(default_image.host_mounts),
        labels=TEST_LABEL,
    )
    restored = f"kvm-{os.urandom(4).hex()}"
    try:
        await backend.create(config)
        sid = config.sandbox_id
        hello = await backend.exec(sid, ExecRequest(["/bin/sh", "-c", "echo hi; id -u"]))
        assert hello.stdout == f"hi\n{default_image.to_ref().uid}\n".encode(), hello
        await backend.put_file(sid, "/work/kept", b"kept\n")
        await backend.pause(sid)
        assert await backend.status(sid) == BackendStatus.PAUSED
        await backend.resume(sid)
        counter = "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.2; done' &"
        await backend.exec(sid, ExecRequest(["/bin/sh", "-c", counter + " sleep 0.5"]))
        snap = state_root / "snapshots" / sid
        await backend.snapshot(sid, snap, keep_running=True)
        await backend.restore(restored, snap)
        assert await backend.get_file(restored, "/work/kept", 100) == b"kept\n"
        first = int((await backend.exec(restored, ExecRequest(["cat", "/tmp/n"]))).stdout)
        await asyncio.sleep(1)
        later = int((await backend.exec(restored, ExecRequest(["cat", "/tmp/n"]))).stdout)
        assert later > first, "the process started before the snapshot stopped counting"
    finally:
        for sandbox_id in (config.sandbox_id, restored):
            await backend.destroy(sandbox_id)

"""The Cloud Hypervisor driver against a stand-in Cloud Hypervisor serving cloud-hypervisor.yaml.

The stand-in is a real process started by the driver (tests/vmm/spec_server.py
behind a script named `cloud-hypervisor`); it refuses anything outside the
spec, models Cloud Hypervisor's VM states and records every request. No real
Cloud Hypervisor runs here: see docs/microvm-vmm.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.backends.microvm.vmm import (
    BootSpec,
    CloudHypervisorDriver,
    DiskSpec,
    RestoreSpec,
    VmmState,
)
from corral.errors import (
    BackendUnavailableError,
    ConflictError,
    InfrastructureError,
    InvalidStateError,
    SandboxStartError,
    UserError,
)
from tests.vmm.harness import (
    assert_all_valid,
    assert_released,
    bundle,
    operations,
    read_record,
    standin_pids,
    standin_vmm,
)

API = "/api/v1"


@pytest.fixture(autouse=True, scope="module")
def no_vmm_left_behind() -> Iterator[None]:
    """After the module, no stand-in VMM process is left running."""
    before = standin_pids()
    yield
    assert standin_pids() - before == set()


@dataclass
class Env:
    root: Path
    binary: Path
    record: Path
    boot: BootSpec

    def driver(self, name: str = "sb-a", **kwargs: Any) -> CloudHypervisorDriver:
        kwargs.setdefault("max_vcpus", 4)
        kwargs.setdefault("hotplug_memory_mib", 512)
        return CloudHypervisorDriver(
            self.root / name, binary=self.binary, sandbox_id=name, **kwargs
        )

    def requests(self) -> list[dict[str, Any]]:
        return read_record(self.record)

    def bodies(self, action: str) -> list[Any]:
        return [e["body"] for e in self.requests() if e["path"] == f"{API}/{action}"]


@pytest.fixture
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="ch-", dir="/tmp"))
    record = root / "requests.jsonl"
    yield Env(
        root, standin_vmm(root / "bin", "cloud-hypervisor", record), record, bundle(root / "b")
    )
    shutil.rmtree(root, ignore_errors=True)


async def _running(env: Env, name: str = "sb-a") -> CloudHypervisorDriver:
    driver = env.driver(name)
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    return driver


def _other_client(driver: CloudHypervisorDriver) -> httpx.AsyncClient:
    """A second API client on the VMM's socket, to change its state behind the driver's back."""
    transport = httpx.AsyncHTTPTransport(uds=str(driver.api_socket))
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


async def test_full_lifecycle_sends_the_spec_sequence(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    pid = driver.pid
    assert (await driver.info()).vmm_state == "Not created"
    await driver.configure(env.boot)
    assert (await driver.info()).state is VmmState.CONFIGURED
    await driver.boot()
    await driver.resize(vcpus=3, memory_mib=512)
    await driver.add_disk(DiskSpec("data", env.boot.rootfs, read_only=True))
    await driver.pause()
    assert (await driver.info()).vmm_state == "Paused"
    await driver.snapshot(env.root / "snap")
    await driver.resume()
    info = await driver.info()
    assert info.state is VmmState.RUNNING
    assert info.version == "spec-stand-in"
    await driver.shutdown(grace=5)

    assert driver.state is VmmState.STOPPED
    assert_released(driver, pid)
    record = env.requests()
    assert_all_valid(record)
    assert [op for op in operations(record) if not op.startswith("GET")] == [
        f"PUT {API}/vm.create",
        f"PUT {API}/vm.boot",
        f"PUT {API}/vm.resize",
        f"PUT {API}/vm.add-disk",
        f"PUT {API}/vm.pause",
        f"PUT {API}/vm.snapshot",
        f"PUT {API}/vm.resume",
        f"PUT {API}/vm.shutdown",
        f"PUT {API}/vmm.shutdown",
    ]
    b = env.root / "b"
    assert env.bodies("vm.create") == [
        {
            "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
            "memory": {"size": 256 << 20, "hotplug_size": 512 << 20},
            "payload": {
                "kernel": str(b / "vmlinux"),
                "cmdline": "console=ttyS0 reboot=k panic=1",
                "initramfs": str(b / "initrd.cpio"),
            },
            "disks": [
                {"id": "rootfs", "path": str(b / "rootfs.ext4"), "readonly": True},
                {"id": "overlay", "path": str(b / "overlay.raw"), "readonly": False},
            ],
            "serial": {"mode": "File", "file": str(env.root / "sb-a/serial.log")},
            "console": {"mode": "Off"},
            "vsock": {"cid": 3, "socket": str(b / "vsock.sock")},
        }
    ]
    # Bodiless actions carry no body at all.
    assert env.bodies("vm.boot") == [None]
    assert env.bodies("vm.resize") == [{"desired_vcpus": 3, "desired_ram": 512 << 20}]
    assert env.bodies("vm.add-disk") == [
        {"id": "data", "path": str(b / "rootfs.ext4"), "readonly": True}
    ]
    add_disk = next(e for e in record if e["path"] == f"{API}/vm.add-disk")
    assert add_disk["status"] == 200  # hot-plugged into the running VM: PciDeviceInfo
    assert set(add_disk["reply"]) == {"id", "bdf"}
    assert env.bodies("vm.snapshot") == [{"destination_url": f"file://{env.root}/snap"}]
    assert sorted(p.name for p in (env.root / "snap").iterdir()) == [
        "config.json",
        "memory-ranges",
        "state.json",
    ]
    assert not (b / "vsock.sock").exists()
    assert [p.name for p in (env.root / "sb-a").iterdir()] == ["cloud-hypervisor.log"]


async def _snapshot(env: Env) -> Path:
    driver = await _running(env, "sb-src")
    await driver.pause()
    await driver.snapshot(env.root / "snap")
    await driver.kill()
    return env.root / "snap"


@pytest.mark.parametrize("resume", [False, True])
async def test_restore_into_a_fresh_vmm_with_its_own_overlay(env: Env, resume: bool) -> None:
    snap = await _snapshot(env)
    own_overlay = env.root / "b/overlay-2.raw"
    own_overlay.write_bytes(b"\0" * 512)
    own_vsock = env.root / "b/vsock-2.sock"
    env.record.unlink()

    driver = env.driver("sb-fork")
    await driver.start()
    pid = driver.pid
    spec = RestoreSpec(
        snap,
        disks=(DiskSpec("overlay", own_overlay, read_only=False),),
        vsock_uds=own_vsock,
        resume=resume,
    )
    await driver.restore(spec)
    info = await driver.info()
    assert info.vmm_state == ("Running" if resume else "Paused")
    assert driver.state is info.state
    assert own_vsock.exists()
    # The restored VM uses this sandbox's overlay and vsock socket; the snapshot is untouched.
    restore_dir = env.root / "sb-fork/restore"
    config = json.loads((restore_dir / "config.json").read_text())
    assert config["disks"][1] == {"id": "overlay", "path": str(own_overlay), "readonly": False}
    assert config["vsock"]["socket"] == str(own_vsock)
    assert (restore_dir / "memory-ranges").resolve() == snap / "memory-ranges"
    original = json.loads((snap / "config.json").read_text())
    assert original["disks"][1]["path"] == str(env.boot.overlay)
    if not resume:
        await driver.resume()
    await driver.resize(vcpus=4)  # bounds come from the snapshot's config
    await driver.shutdown(grace=5)

    record = env.requests()
    assert_all_valid(record)
    assert env.bodies("vm.restore") == [{"source_url": f"file://{restore_dir}", "resume": resume}]
    assert_released(driver, pid)
    assert not restore_dir.exists()
    assert not own_vsock.exists()


async def test_restore_of_a_disk_the_snapshot_lacks_is_a_start_error(env: Env) -> None:
    snap = await _snapshot(env)
    driver = env.driver("sb-fork")
    await driver.start()
    with pytest.raises(SandboxStartError, match=r"the snapshot has no disks \['scratch'\]"):
        await driver.restore(RestoreSpec(snap, disks=(DiskSpec("scratch", snap, read_only=False),)))
    assert_released(driver, None)


async def test_a_rejected_boot_is_a_start_error_and_releases_everything(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    pid = driver.pid
    broken = BootSpec(
        kernel=env.root / "no-vmlinux", rootfs=env.boot.rootfs, overlay=env.boot.overlay
    )
    await driver.configure(broken)  # Cloud Hypervisor opens the kernel at boot, not at create
    with pytest.raises(SandboxStartError) as caught:
        await driver.boot()
    error = caught.value
    assert (
        error.stderr_tail
        == f"Error from API: The VM could not boot: cannot open kernel {env.root}/no-vmlinux"
    )
    assert "PUT /api/v1/vm.boot: HTTP 500" in error.message
    assert error.sandbox_id == "sb-a"
    assert driver.state is VmmState.STOPPED
    assert_released(driver, pid)


async def test_state_faults_from_the_vmm_are_invalid_state_errors(env: Env) -> None:
    driver = await _running(env)
    await driver.pause()
    async with _other_client(driver) as other:
        assert (await other.put(f"{API}/vm.resume")).status_code == 204
    # Spec-coded refusal: vm.resume of a VM that is not paused is 405.
    with pytest.raises(InvalidStateError, match="HTTP 405") as caught:
        await driver.resume()
    assert (
        caught.value.stderr_tail == "Error from API: The VM could not be resumed: VM is not paused"
    )
    # Undocumented refusal: Cloud Hypervisor's 500 naming the state.
    with pytest.raises(InvalidStateError, match="HTTP 500") as caught:
        await driver.snapshot(env.root / "snap")
    assert (
        caught.value.stderr_tail
        == "Error from API: The VM could not be snapshotted: VM is not paused"
    )
    assert driver.state is VmmState.PAUSED
    await driver.kill()


async def test_a_duplicate_disk_is_a_conflict_and_a_bad_one_a_user_error(env: Env) -> None:
    driver = await _running(env)
    with pytest.raises(ConflictError, match="HTTP 409") as conflict:
        await driver.add_disk(DiskSpec("overlay", env.boot.overlay, read_only=False))
    assert conflict.value.stderr_tail is not None
    assert "duplicate id overlay" in conflict.value.stderr_tail
    with pytest.raises(UserError, match="HTTP 400") as bad:
        await driver.add_disk(DiskSpec("data", env.root / "missing.img", read_only=True))
    assert type(bad.value) is UserError
    assert driver.state is VmmState.RUNNING
    await driver.kill()


async def test_resize_is_bounded_by_what_the_vm_was_created_for(env: Env) -> None:
    driver = await _running(env)
    with pytest.raises(UserError, match="1 to 4"):
        await driver.resize(vcpus=5)
    with pytest.raises(UserError, match="256 to 768 MiB"):
        await driver.resize(memory_mib=1024)
    await driver.resize()  # nothing asked, nothing sent
    await driver.kill()
    assert env.bodies("vm.resize") == []


async def test_a_vmm_failure_at_runtime_is_an_infrastructure_error(env: Env) -> None:
    driver = await _running(env)
    await driver.pause()
    snap = env.root / "snap"
    snap.mkdir()
    (snap / "config.json").mkdir()  # Cloud Hypervisor cannot write its config there
    with pytest.raises(InfrastructureError) as caught:
        await driver.snapshot(snap)
    assert type(caught.value) is InfrastructureError
    assert caught.value.stderr_tail is not None
    assert caught.value.stderr_tail.startswith("Error from API: The VM could not be snapshotted:")
    assert driver.state is VmmState.PAUSED
    await driver.kill()


async def test_the_driver_refuses_out_of_order_calls_before_asking_the_vmm(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    with pytest.raises(InvalidStateError, match="cannot boot"):
        await driver.boot()
    with pytest.raises(InvalidStateError, match="cannot resize"):
        await driver.resize(vcpus=2)
    with pytest.raises(InvalidStateError, match="cannot add a disk"):
        await driver.add_disk(DiskSpec("data", env.boot.rootfs, read_only=True))
    await driver.configure(env.boot)
    with pytest.raises(InvalidStateError, match="cannot restore"):
        await driver.restore(RestoreSpec(env.root))
    with pytest.raises(InvalidStateError, match="cannot resume"):
        await driver.resume()
    await driver.kill()
    assert [op for op in operations(env.requests()) if not op.startswith("GET")] == [
        f"PUT {API}/vm.create"
    ]


def test_a_missing_binary_is_named(env: Env) -> None:
    with pytest.raises(BackendUnavailableError, match="cloud-hypervisor is not on PATH"):
        CloudHypervisorDriver(env.root / "x", environ={"PATH": str(env.root / "empty")})
    driver = CloudHypervisorDriver(env.root / "x", environ={"PATH": str(env.binary.parent)})
    assert driver.binary == env.binary
    assert driver.supports_resize
    assert driver.supports_add_disk


async def test_a_vmm_that_dies_at_start_is_a_start_error_with_its_stderr(env: Env) -> None:
    broken = standin_vmm(
        env.root / "bin2", "cloud-hypervisor", env.record, "--fail-start", "no KVM"
    )
    driver = CloudHypervisorDriver(env.root / "sb-a", binary=broken, sandbox_id="sb-a")
    with pytest.raises(SandboxStartError) as caught:
        await driver.start()
    assert caught.value.stderr_tail == "no KVM"
    assert driver.state is VmmState.STOPPED
    assert_released(driver, None)


async def test_kill_and_crash_release_everything(env: Env) -> None:
    driver = await _running(env)
    pid = driver.pid
    await driver.kill()
    assert_released(driver, pid)
    await driver.shutdown()  # harmless the second time
    assert not (env.root / "b/vsock.sock").exists()

    crashed = await _running(env, "sb-b")
    assert crashed.pid is not None
    pid = crashed.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(InfrastructureError, match="exited with status -9 during pause"):
        await crashed.pause()
    assert crashed.state is VmmState.STOPPED
    assert_released(crashed, pid)


async def test_a_tap_and_extra_disks_are_configured(env: Env) -> None:
    extra = DiskSpec("usr", env.boot.rootfs, read_only=True, serial="hostusr")
    boot = replace(env.boot, tap="tap-sb-a", guest_mac="06:00:ac:10:00:02", extra_disks=(extra,))
    driver = env.driver()
    await driver.start()
    await driver.configure(boot)
    await driver.boot()
    await driver.kill()
    assert_all_valid(env.requests())
    create = env.bodies("vm.create")[0]
    assert create["net"] == [{"id": "eth0", "tap": "tap-sb-a", "mac": "06:00:ac:10:00:02"}]
    assert create["disks"][2] == {
        "id": "usr",
        "path": str(env.boot.rootfs),
        "readonly": True,
        "serial": "hostusr",
    }


async def test_a_restored_vm_can_move_to_its_own_tap(env: Env) -> None:
    driver = env.driver("sb-src")
    await driver.start()
    await driver.configure(replace(env.boot, tap="tap-src"))
    await driver.boot()
    await driver.pause()
    await driver.snapshot(env.root / "snap")
    await driver.kill()

    fork = env.driver("sb-fork")
    await fork.start()
    await fork.restore(RestoreSpec(env.root / "snap", tap="tap-fork"))
    async with _other_client(fork) as other:
        info = (await other.get(f"{API}/vm.info")).json()
    await fork.kill()
    assert_all_valid(env.requests())
    assert info["config"]["net"] == [{"id": "eth0", "tap": "tap-fork"}]
    # Not moved, the vsock device bound the snapshot's socket path: released all the same.
    assert not (env.root / "b/vsock.sock").exists()

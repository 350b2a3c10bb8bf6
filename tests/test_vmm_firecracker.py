"""The Firecracker driver against a stand-in Firecracker serving firecracker.yaml.

The stand-in is a real process started by the driver (tests/vmm/spec_server.py
behind a script named `firecracker`); it refuses anything outside the spec and
models Firecracker's states, and records every request for the assertions.
No real Firecracker runs here: see docs/microvm-vmm.md.
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
    DiskSpec,
    FirecrackerDriver,
    JailerConfig,
    RestoreSpec,
    VmmState,
)
from corral.errors import (
    BackendUnavailableError,
    InfrastructureError,
    InvalidStateError,
    SandboxStartError,
    UnsupportedError,
    UserError,
)
from tests.vmm.harness import (
    assert_all_valid,
    assert_released,
    bundle,
    operations,
    read_record,
    standin_jailer,
    standin_pids,
    standin_vmm,
)


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

    def driver(self, name: str = "sb-a", **kwargs: Any) -> FirecrackerDriver:
        return FirecrackerDriver(self.root / name, binary=self.binary, sandbox_id=name, **kwargs)

    def requests(self) -> list[dict[str, Any]]:
        return read_record(self.record)


@pytest.fixture
def env() -> Iterator[Env]:
    # Short paths: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))
    record = root / "requests.jsonl"
    yield Env(root, standin_vmm(root / "bin", "firecracker", record), record, bundle(root / "b"))
    shutil.rmtree(root, ignore_errors=True)


def _bodies(env: Env, path: str) -> list[Any]:
    return [e["body"] for e in env.requests() if e["path"] == path]


async def test_full_lifecycle_sends_the_spec_sequence(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    assert driver.state is VmmState.STARTED
    assert driver.pid is not None
    pid = driver.pid
    await driver.configure(env.boot)
    assert driver.state is VmmState.CONFIGURED
    await driver.boot()
    assert (await driver.info()).vmm_state == "Running"
    await driver.pause()
    assert (await driver.info()).state is VmmState.PAUSED
    await driver.snapshot(env.root / "snap")
    await driver.resume()
    assert (await driver.info()).state is VmmState.RUNNING
    await driver.shutdown(grace=5)

    assert driver.state is VmmState.STOPPED
    assert_released(driver, pid)
    record = env.requests()
    assert_all_valid(record)
    assert operations(record) == [
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /drives/rootfs",
        "PUT /drives/overlay",
        "PUT /vsock",
        "PUT /actions",
        "PATCH /vm",
        "PUT /snapshot/create",
        "PATCH /vm",
        "PUT /actions",
    ]
    assert _bodies(env, "/machine-config") == [{"vcpu_count": 2, "mem_size_mib": 256, "smt": False}]
    assert _bodies(env, "/boot-source") == [
        {
            "kernel_image_path": "vmlinux",
            "boot_args": "console=ttyS0 reboot=k panic=1",
            "initrd_path": "initrd",
        }
    ]
    rootfs, overlay = _bodies(env, "/drives/rootfs")[0], _bodies(env, "/drives/overlay")[0]
    assert rootfs == {
        "drive_id": "rootfs",
        "path_on_host": "disk-rootfs",
        "is_root_device": False,
        "is_read_only": True,
    }
    assert overlay["is_read_only"] is False
    assert overlay["path_on_host"] == "disk-overlay"
    assert _bodies(env, "/vsock") == [{"guest_cid": 3, "uds_path": str(env.root / "b/vsock.sock")}]
    assert [b["action_type"] for b in _bodies(env, "/actions")] == [
        "InstanceStart",
        "SendCtrlAltDel",
    ]
    assert [b["state"] for b in _bodies(env, "/vm")] == ["Paused", "Resumed"]
    assert _bodies(env, "/snapshot/create") == [
        {
            "snapshot_type": "Full",
            "snapshot_path": str(env.root / "snap/vmstate"),
            "mem_file_path": str(env.root / "snap/memory"),
        }
    ]
    assert sorted(p.name for p in (env.root / "snap").iterdir()) == ["memory", "vmstate"]
    # Only the log stays; the staged links, the API socket and the vsock socket are gone.
    assert [p.name for p in (env.root / "sb-a").iterdir()] == ["firecracker.log"]
    assert not (env.root / "b/vsock.sock").exists()


async def test_without_initrd_the_base_disk_is_the_root_device(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    try:
        boot = BootSpec(kernel=env.boot.kernel, rootfs=env.boot.rootfs, overlay=env.boot.overlay)
        await driver.configure(boot)
    finally:
        await driver.kill()
    assert _bodies(env, "/drives/rootfs")[0]["is_root_device"] is True
    assert "initrd_path" not in _bodies(env, "/boot-source")[0]
    assert_all_valid(env.requests())


async def _snapshot_of_running_vm(env: Env) -> Path:
    driver = env.driver("sb-src")
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    await driver.pause()
    await driver.snapshot(env.root / "snap")
    await driver.kill()
    return env.root / "snap"


@pytest.mark.parametrize("resume", [False, True])
async def test_restore_into_a_fresh_vmm_with_its_own_overlay(env: Env, resume: bool) -> None:
    snap = await _snapshot_of_running_vm(env)
    own_overlay = env.root / "b/overlay-2.raw"
    own_overlay.write_bytes(b"\0" * 512)
    own_vsock = env.root / "b/vsock-2.sock"
    env.record.unlink()

    driver = env.driver("sb-fork")
    await driver.start()
    pid = driver.pid
    await driver.restore(
        RestoreSpec(
            snap,
            disks=(
                DiskSpec("rootfs", env.boot.rootfs, read_only=True),
                DiskSpec("overlay", own_overlay, read_only=False),
            ),
            vsock_uds=own_vsock,
            resume=resume,
        )
    )
    expected = VmmState.RUNNING if resume else VmmState.PAUSED
    assert driver.state is expected
    assert (await driver.info()).state is expected
    # The snapshot names drives by their staged names, which now point at this sandbox's files.
    assert (env.root / "sb-fork/disk-overlay").resolve() == own_overlay
    assert own_vsock.exists()
    if not resume:
        await driver.resume()
    await driver.shutdown(grace=5)

    record = env.requests()
    assert_all_valid(record)
    load = _bodies(env, "/snapshot/load")
    assert load == [
        {
            "snapshot_path": str(snap / "vmstate"),
            "mem_backend": {"backend_type": "File", "backend_path": str(snap / "memory")},
            "resume_vm": resume,
            "vsock_override": {"uds_path": str(own_vsock)},
        }
    ]
    assert operations(record)[0] == "PUT /snapshot/load"
    assert_released(driver, pid)
    assert not own_vsock.exists()


async def test_restore_needs_a_fresh_vmm(env: Env) -> None:
    snap = await _snapshot_of_running_vm(env)
    driver = env.driver()
    await driver.start()
    await driver.configure(env.boot)
    with pytest.raises(InvalidStateError, match="cannot restore: the firecracker VM is configured"):
        await driver.restore(RestoreSpec(snap))
    await driver.kill()
    assert "/snapshot/load" not in {e["path"] for e in env.requests()}


async def test_a_rejected_setting_is_a_start_error_and_releases_everything(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    pid = driver.pid
    broken = BootSpec(
        kernel=env.root / "no-such-vmlinux", rootfs=env.boot.rootfs, overlay=env.boot.overlay
    )
    with pytest.raises(SandboxStartError) as caught:
        await driver.configure(broken)
    error = caught.value
    assert error.stderr_tail == "Cannot open kernel image: vmlinux: not found"
    assert error.sandbox_id == "sb-a"
    assert error.backend == "microvm"
    assert "PUT /boot-source: HTTP 400" in error.message
    assert error.hint
    assert "firecracker.log" in error.hint
    assert driver.state is VmmState.STOPPED
    assert_released(driver, pid)
    assert [p.name for p in (env.root / "sb-a").iterdir()] == ["firecracker.log"]


async def test_a_state_fault_from_the_vmm_is_an_invalid_state_error(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    await driver.pause()
    # Someone else resumes the VM behind the driver's back; Firecracker then refuses the snapshot.
    transport = httpx.AsyncHTTPTransport(uds=str(driver.api_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as other:
        assert (await other.patch("/vm", json={"state": "Resumed"})).status_code == 204
    with pytest.raises(InvalidStateError) as caught:
        await driver.snapshot(env.root / "snap")
    assert caught.value.stderr_tail == "Cannot create a snapshot: the microVM is not paused."
    assert "HTTP 400" in caught.value.message
    # A refused runtime call leaves the VM as it was.
    assert driver.state is VmmState.PAUSED
    assert driver.pid is not None
    await driver.kill()
    assert_all_valid([e for e in env.requests() if e["status"] < 400])


async def test_a_failed_runtime_call_is_an_infrastructure_error(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    await driver.pause()
    snap = env.root / "snap"
    (snap / "vmstate").mkdir(parents=True)  # Firecracker cannot write its state file there
    with pytest.raises(InfrastructureError) as caught:
        await driver.snapshot(snap)
    assert type(caught.value) is InfrastructureError
    assert caught.value.stderr_tail is not None
    assert caught.value.stderr_tail.startswith("Cannot create snapshot:")
    assert driver.state is VmmState.PAUSED
    await driver.kill()


async def test_the_driver_refuses_out_of_order_calls_before_asking_the_vmm(env: Env) -> None:
    driver = env.driver()
    with pytest.raises(InvalidStateError, match="cannot boot: the firecracker VM is new"):
        await driver.boot()
    await driver.start()
    with pytest.raises(InvalidStateError, match="cannot pause"):
        await driver.pause()
    with pytest.raises(InvalidStateError, match="cannot snapshot"):
        await driver.snapshot(env.root / "snap")
    await driver.configure(env.boot)
    with pytest.raises(InvalidStateError, match="cannot configure"):
        await driver.configure(env.boot)
    await driver.boot()
    with pytest.raises(InvalidStateError, match=r"cannot snapshot: .* running, not paused"):
        await driver.snapshot(env.root / "snap")
    await driver.kill()
    with pytest.raises(InvalidStateError):
        await driver.start()
    assert operations(env.requests()) == [
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /drives/rootfs",
        "PUT /drives/overlay",
        "PUT /vsock",
        "PUT /actions",
    ]


async def test_resize_and_add_disk_are_unsupported(env: Env) -> None:
    driver = env.driver()
    assert not driver.supports_resize
    assert not driver.supports_add_disk
    with pytest.raises(UnsupportedError, match="cannot resize"):
        await driver.resize(vcpus=2)
    with pytest.raises(UnsupportedError, match="cannot add a disk"):
        await driver.add_disk(DiskSpec("data", env.boot.rootfs, read_only=True))


def test_a_missing_binary_is_named(env: Env) -> None:
    with pytest.raises(BackendUnavailableError, match="firecracker is not on PATH") as caught:
        FirecrackerDriver(env.root / "x", environ={"PATH": str(env.root / "empty")})
    assert caught.value.hint
    assert "install firecracker" in caught.value.hint
    with pytest.raises(BackendUnavailableError, match="/opt/none/firecracker is not executable"):
        FirecrackerDriver(env.root / "x", binary="/opt/none/firecracker")
    # Found on PATH when not configured.
    driver = FirecrackerDriver(env.root / "x", environ={"PATH": str(env.binary.parent)})
    assert driver.binary == env.binary
    with pytest.raises(BackendUnavailableError, match="jailer is not on PATH"):
        FirecrackerDriver(
            env.root / "x",
            binary=env.binary,
            jailer=JailerConfig(uid=0, gid=0),
            environ={"PATH": str(env.root / "empty")},
        )


async def test_a_vmm_that_dies_at_start_is_a_start_error_with_its_stderr(env: Env) -> None:
    broken = standin_vmm(
        env.root / "bin2", "firecracker", env.record, "--fail-start", "KVM: no such device"
    )
    driver = FirecrackerDriver(env.root / "sb-a", binary=broken, sandbox_id="sb-a")
    with pytest.raises(
        SandboxStartError, match="exited with status 1 before its API came up"
    ) as caught:
        await driver.start()
    assert caught.value.stderr_tail == "KVM: no such device"
    assert caught.value.sandbox_id == "sb-a"
    assert_released(driver, None)
    assert driver.state is VmmState.STOPPED


async def test_a_too_long_socket_path_is_refused_before_spawning(env: Env) -> None:
    driver = FirecrackerDriver(env.root / ("d" * 110), binary=env.binary)
    with pytest.raises(SandboxStartError, match="over the 107-byte limit"):
        await driver.start()
    assert env.requests() == []


async def test_kill_releases_and_a_second_stop_is_harmless(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    pid = driver.pid
    await driver.kill()
    assert_released(driver, pid)
    await driver.kill()
    await driver.shutdown()
    assert driver.state is VmmState.STOPPED
    assert not (env.root / "b/vsock.sock").exists()


async def test_shutdown_of_a_paused_vm_kills_it(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    await driver.pause()
    pid = driver.pid
    await driver.shutdown(grace=0.5)
    assert_released(driver, pid)
    # A paused guest cannot answer Ctrl-Alt-Del, so none is sent.
    assert [b["action_type"] for b in _bodies(env, "/actions")] == ["InstanceStart"]


async def test_a_vmm_crash_is_reported_and_released(env: Env) -> None:
    driver = env.driver()
    await driver.start()
    await driver.configure(env.boot)
    await driver.boot()
    assert driver.pid is not None
    pid = driver.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(InfrastructureError, match=r"exited with status -9 during pause"):
        await driver.pause()
    assert driver.state is VmmState.STOPPED
    assert_released(driver, pid)


# -- the jailer ---------------------------------------------------------------------


@pytest.fixture
def jailed(env: Env) -> tuple[JailerConfig, Path]:
    jailer_record = env.root / "jailer.json"
    config = JailerConfig(
        uid=os.getuid(),
        gid=os.getgid(),
        chroot_base=env.root / "jail",
        binary=standin_jailer(env.root / "bin", jailer_record),
        cgroup_version=2,
    )
    return config, jailer_record


async def test_jailed_lifecycle_stages_files_in_the_chroot(
    env: Env, jailed: tuple[JailerConfig, Path]
) -> None:
    jailer, jailer_record = jailed
    driver = env.driver("sb-j", jailer=jailer)
    root = env.root / "jail/firecracker/sb-j/root"
    assert driver.workdir == root
    assert driver.api_socket == root / "api.socket"
    await driver.start()
    pid = driver.pid
    argv = json.loads(jailer_record.read_text())["argv"]
    assert argv == [
        "--id", "sb-j", "--exec-file", str(env.binary),
        "--uid", str(os.getuid()), "--gid", str(os.getgid()),
        "--chroot-base-dir", str(env.root / "jail"), "--cgroup-version", "2",
        "--", "--api-sock", "/api.socket",
    ]  # fmt: skip
    await driver.configure(env.boot)
    # Hard links inside the jail, named by role; the API gets in-jail paths.
    assert (root / "disk-overlay").stat().st_ino == env.boot.overlay.stat().st_ino
    assert _bodies(env, "/boot-source")[0]["kernel_image_path"] == "/vmlinux"
    assert _bodies(env, "/drives/overlay")[0]["path_on_host"] == "/disk-overlay"
    assert _bodies(env, "/vsock")[0]["uds_path"] == "/vsock.sock"
    await driver.boot()
    # The host-side vsock path leads into the jail.
    assert env.boot.vsock is not None
    assert env.boot.vsock.uds_path.resolve() == root / "vsock.sock"
    await driver.pause()
    await driver.snapshot(env.root / "snap")
    assert _bodies(env, "/snapshot/create")[0]["snapshot_path"] == "/snapshot/vmstate"
    assert sorted(p.name for p in (env.root / "snap").iterdir()) == ["memory", "vmstate"]
    await driver.resume()
    await driver.shutdown(grace=5)

    assert_all_valid(env.requests())
    assert_released(driver, pid)
    assert not (env.root / "jail/firecracker/sb-j").exists()
    assert not env.boot.vsock.uds_path.exists()
    assert not env.boot.vsock.uds_path.is_symlink()
    assert env.boot.overlay.exists()  # the jail held a link, not the file

    # A second jail restores the snapshot under the same in-jail names.
    fork = env.driver("sb-k", jailer=jailer)
    await fork.start()
    await fork.restore(RestoreSpec(env.root / "snap", disks=env.boot.disks(), resume=True))
    assert fork.state is VmmState.RUNNING
    load = _bodies(env, "/snapshot/load")[0]
    assert load["snapshot_path"] == "/snapshot/vmstate"
    assert load["mem_backend"] == {"backend_type": "File", "backend_path": "/snapshot/memory"}
    await fork.kill()
    assert not (env.root / "jail/firecracker/sb-k").exists()
    assert_all_valid(env.requests())


def test_jail_ids_are_checked(env: Env, jailed: tuple[JailerConfig, Path]) -> None:
    with pytest.raises(UserError, match="jailer ids are 1-64 letters"):
        FirecrackerDriver(env.root / "x", binary=env.binary, jailer=jailed[0], sandbox_id="bad_id!")


async def test_a_tap_and_extra_disks_are_configured(env: Env) -> None:
    extra = DiskSpec("usr", env.boot.rootfs, read_only=True, serial="hostusr")
    boot = replace(env.boot, tap="tap-sb-a", guest_mac="06:00:ac:10:00:02", extra_disks=(extra,))
    driver = env.driver()
    await driver.start()
    await driver.configure(boot)
    await driver.kill()
    assert_all_valid(env.requests())
    assert _bodies(env, "/network-interfaces/eth0") == [
        {"iface_id": "eth0", "host_dev_name": "tap-sb-a", "guest_mac": "06:00:ac:10:00:02"}
    ]
    # Firecracker's Drive has no serial: the guest tells disks apart by order (vda, vdb, vdc).
    assert [e["path"] for e in env.requests() if e["path"].startswith("/drives/")] == [
        "/drives/rootfs",
        "/drives/overlay",
        "/drives/usr",
    ]
    assert "serial" not in _bodies(env, "/drives/usr")[0]


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
    await fork.restore(RestoreSpec(env.root / "snap", disks=env.boot.disks(), tap="tap-fork"))
    transport = httpx.AsyncHTTPTransport(uds=str(fork.api_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as other:
        config = (await other.get("/vm/config")).json()
    await fork.kill()
    assert_all_valid(env.requests())
    assert _bodies(env, "/snapshot/load")[0]["network_overrides"] == [
        {"iface_id": "eth0", "host_dev_name": "tap-fork"}
    ]
    assert config["network-interfaces"][0]["host_dev_name"] == "tap-fork"


async def test_a_file_that_cannot_be_staged_is_a_start_error(env: Env) -> None:
    (env.root / "sb-a").mkdir()
    (env.root / "sb-a" / "vmlinux").mkdir()  # a directory where the kernel link must go
    driver = env.driver()
    await driver.start()
    pid = driver.pid
    with pytest.raises(SandboxStartError, match="cannot stage"):
        await driver.configure(env.boot)
    assert_released(driver, pid)
    assert operations(env.requests()) == []

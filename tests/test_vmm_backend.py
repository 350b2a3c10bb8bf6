"""The microvm backend with `--vmm firecracker` and `--vmm cloud-hypervisor`, end to end,
against stand-in VMMs that boot a SIMULATED guest.

Neither VMM can run here (no binaries; /dev/kvm is PVM). The stand-ins
(tests/vmm/spec_server.py) serve the VMMs' published APIs and check every
request against them; on boot they run the bundle's real guest agent (taken
out of the initramfs the backend built) as an unprivileged HOST process behind
a hybrid-vsock socket, per tests/vmm/guest.py. So this verifies the backend's
whole path - bundle, raw overlay, driver calls, detached VMM, the vsock
transport and the agent protocol, pause, snapshot/restore/fork, destroy and
release - but NOT isolation: the "guest" is a host process, its files live in
a host directory, and snapshots keep its files but not its processes. Real
boots are the `kvm` tier (tests/vmm/test_kvm_boot.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral._sys import procs
from corral.backends.base import (
    BackendStatus,
    ExecRequest,
    ExitStatus,
    Output,
    SandboxConfig,
    SandboxLimits,
)
from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.settings import MicrovmSettings
from corral.backends.microvm.vmm_backend import VmmBackend
from corral.backends.registry import load_backend
from corral.config import Settings
from corral.errors import (
    BackendUnavailableError,
    ExecError,
    FileTooLargeError,
    InvalidStateError,
    NotFoundError,
    UserError,
)
from corral.host.doctor import run_checks
from tests.conftest import TEST_LABEL, require_root
from tests.test_host import FakeHost
from tests.vmm.guest import GUEST_UID
from tests.vmm.harness import (
    assert_all_valid,
    read_record,
    standin_jailer,
    standin_pids,
    standin_vmm,
)

pytestmark = pytest.mark.runtime

VMMS = ["firecracker", "cloud-hypervisor"]


def sh(script: str, **kwargs: Any) -> ExecRequest:
    return ExecRequest(["/bin/sh", "-c", script], **kwargs)


def guest_processes(backend: VmmBackend, sandbox_id: str) -> dict[int, str]:
    """The simulated guest's processes (the VMM's session, less the VMM) and their states."""
    record = json.loads((backend._dir(sandbox_id) / "vmm.json").read_text())
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == record["pid"]:
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == record["session"] and fields[0] not in (b"Z", b"X"):
            found[int(entry.name)] = fields[0].decode()
    return found


@dataclasses.dataclass
class Setup:
    backend: VmmBackend
    vmm: str
    record: Path
    image: Any
    mounts: list[Any]
    created: list[str]

    def config(self, **overrides: Any) -> SandboxConfig:
        sandbox_id = overrides.pop("sandbox_id", f"vb-{os.urandom(4).hex()}")
        self.created.append(sandbox_id)
        values: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "image": self.image,
            "limits": SandboxLimits(memory=256 << 20, pids=128, disk=64 << 20),
            "mounts": self.mounts,
            "labels": TEST_LABEL,
            "env": {"FROM_CONFIG": "config-value"},
        }
        values.update(overrides)
        return SandboxConfig(**values)

    def new_id(self) -> str:
        sandbox_id = f"vb-{os.urandom(4).hex()}"
        self.created.append(sandbox_id)
        return sandbox_id


@pytest.fixture(params=VMMS)
def setup(request: pytest.FixtureRequest, state_root: Path, default_image: Any) -> Iterator[Setup]:
    require_root()
    vmm = str(request.param)
    bin_dir = state_root / "bin"
    record = state_root / f"{vmm}-requests.jsonl"
    binary = standin_vmm(bin_dir, vmm, record, "--guest")
    settings = MicrovmSettings.model_validate({vmm: {"binary": str(binary)}})
    backend = MicrovmBackend(state_root, vmm=vmm, vmm_settings=settings)
    assert isinstance(backend, VmmBackend)
    # The simulated guest runs unprivileged, as GUEST_UID: the sandbox user must be it.
    image = dataclasses.replace(default_image.to_ref(), uid=GUEST_UID, gid=GUEST_UID)
    found = Setup(backend, vmm, record, image, list(default_image.host_mounts), [])
    yield found

    async def teardown() -> None:
        for sandbox_id in found.created:
            await backend.destroy(sandbox_id)

    asyncio.run(teardown())
    assert not standin_pids(), "a stand-in VMM outlived destroy()"
    assert not list(state_root.rglob("simguest-*")), "a simulated guest's directory was left"
    assert not list((state_root / "sandboxes").glob("vb-*")), "a sandbox directory was left"


async def test_lifecycle_create_exec_files_pause_snapshot_restore_destroy(setup: Setup) -> None:
    backend = setup.backend
    config = setup.config()
    sid = config.sandbox_id
    await backend.create(config)
    sandbox_dir = backend._dir(sid)
    assert await backend.status(sid) == BackendStatus.RUNNING
    assert (sandbox_dir / "scratch.raw").is_file()  # a raw overlay, not qcow2
    assert not (sandbox_dir / "scratch.qcow2").exists()
    meta = json.loads((sandbox_dir / "meta.json").read_text())
    cmdline = meta["spec"]["boot"]["cmdline"]
    assert "corral.vsock=1024" in cmdline
    assert "corral.mount=/dev/vda:erofs:/:ro" in cmdline
    assert ("pci=off" in cmdline) == (setup.vmm == "firecracker")

    # exec: output streamed as it comes, then the exit status
    events = [
        event
        async for event in backend.exec_stream(
            sid, sh("echo out; echo err >&2; sleep 0.3; echo later; exit 7")
        )
    ]
    outputs = [e for e in events if isinstance(e, Output)]
    assert [e.data for e in outputs if e.stream == "stdout"] == [b"out\n", b"later\n"]
    assert [e.data for e in outputs if e.stream == "stderr"] == [b"err\n"]
    assert isinstance(events[-1], ExitStatus)
    assert events[-1].exit_code == 7
    # stdin, env (the sandbox's and the request's), cwd (the workdir, or the request's)
    echoed = await backend.exec(sid, ExecRequest(["cat"], stdin=b"to stdin\n"))
    assert (echoed.exit_code, echoed.stdout) == (0, b"to stdin\n")
    env = await backend.exec(
        sid, sh('echo "$FROM_CONFIG $FROM_REQUEST"', env={"FROM_REQUEST": "request-value"})
    )
    assert env.stdout == b"config-value request-value\n"
    assert (await backend.exec(sid, sh("pwd"))).stdout.endswith(b"/work\n")
    assert (await backend.exec(sid, sh("pwd", cwd="/tmp"))).stdout.endswith(b"/tmp\n")
    # timeout: the agent kills the command and says so
    slow = await backend.exec(sid, sh("sleep 30", timeout=0.5))
    assert (slow.exit_code, slow.timed_out) == (124, True)
    missing = await backend.exec(sid, ExecRequest(["no-such-command"]))
    assert missing.exit_code == 127

    # files, both ways, and as the command sees them
    await backend.put_file(sid, "/work/notes.txt", b"kept across snapshots\n")
    assert await backend.get_file(sid, "/work/notes.txt", 1000) == b"kept across snapshots\n"
    assert (await backend.exec(sid, sh("cat notes.txt"))).stdout == b"kept across snapshots\n"
    with pytest.raises(NotFoundError):
        await backend.get_file(sid, "/work/absent", 1000)
    with pytest.raises(FileTooLargeError):
        await backend.get_file(sid, "/work/notes.txt", 4)
    stats = await backend.stats(sid)
    assert stats.memory_limit == 256 << 20
    assert stats.pids >= 1

    # pause stops the guest's processes and refuses requests; resume brings both back
    await backend.pause(sid)
    assert await backend.status(sid) == BackendStatus.PAUSED
    states = guest_processes(backend, sid)
    assert states, "the simulated guest has no processes"
    assert set(states.values()) == {"T"}, states
    with pytest.raises(InvalidStateError):
        await backend.exec(sid, sh("true"))
    with pytest.raises(InvalidStateError):
        await backend.pause(sid)  # the driver refuses an illegal transition
    await backend.resume(sid)
    assert await backend.status(sid) == BackendStatus.RUNNING
    assert "T" not in guest_processes(backend, sid).values()
    assert (await backend.exec(sid, sh("echo back"))).stdout == b"back\n"

    # snapshot (kept running), restore into a new sandbox, fork two more
    snap = backend.state_dir / "snapshots" / f"{sid}-snap"
    await backend.snapshot(sid, snap, keep_running=True)
    assert await backend.status(sid) == BackendStatus.RUNNING
    assert {p.name for p in snap.iterdir()} == {"vmm", "scratch.raw", "snapshot.json"}
    restored = setup.new_id()
    await backend.restore(restored, snap)
    assert await backend.status(restored) == BackendStatus.RUNNING
    assert await backend.get_file(restored, "/work/notes.txt", 1000) == b"kept across snapshots\n"
    forks = [setup.new_id(), setup.new_id()]
    await backend.fork(snap, forks)
    for index, fork in enumerate(forks):
        await backend.put_file(fork, "/work/mine", f"{index}\n".encode())
    for index, fork in enumerate(forks):
        assert await backend.get_file(fork, "/work/mine", 100) == f"{index}\n".encode()
        assert (backend._dir(fork) / "scratch.raw").is_file()
    with pytest.raises(NotFoundError):
        await backend.get_file(sid, "/work/mine", 100)  # the origin never saw the forks

    # snapshot without keep_running stops the sandbox; it restores in place
    await backend.snapshot(sid, snap.with_name("stopped"), keep_running=False)
    assert await backend.status(sid) == BackendStatus.STOPPED
    with pytest.raises(ExecError, match="not running"):
        await backend.exec(sid, sh("true"))
    await backend.restore(sid, snap.with_name("stopped"))
    assert await backend.status(sid) == BackendStatus.RUNNING
    assert await backend.get_file(sid, "/work/notes.txt", 1000) == b"kept across snapshots\n"

    # a second backend instance (another process) drives the same VMs
    other = MicrovmBackend(backend.state_dir, vmm=setup.vmm, vmm_settings=backend.vmm_settings)
    assert (await other.exec(restored, sh("echo from-elsewhere"))).stdout == b"from-elsewhere\n"

    # destroy releases everything, and again is harmless
    for sandbox_id in [sid, restored, *forks]:
        pids = guest_processes(backend, sandbox_id)
        vmm_pid = json.loads((backend._dir(sandbox_id) / "vmm.json").read_text())["pid"]
        await backend.destroy(sandbox_id)
        await backend.destroy(sandbox_id)
        assert await backend.status(sandbox_id) == BackendStatus.MISSING
        for pid in [vmm_pid, *pids]:
            assert not procs.running(pid), f"process {pid} of {sandbox_id} left behind"
    shutil.rmtree(snap.parent, ignore_errors=True)
    # Every request the backend sent was in the VMM's published spec, answered as documented.
    assert_all_valid(read_record(setup.record))


async def test_a_missing_vmm_binary_is_a_clear_error_and_leaves_nothing(setup: Setup) -> None:
    settings = MicrovmSettings.model_validate({setup.vmm: {"binary": "/nonexistent/vmm"}})
    backend = MicrovmBackend(setup.backend.state_dir, vmm=setup.vmm, vmm_settings=settings)
    config = setup.config()
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.create(config)
    assert "/nonexistent/vmm" in caught.value.message
    assert caught.value.hint
    assert "microvm" in caught.value.hint
    assert not backend._dir(config.sandbox_id).exists()


async def test_a_snapshot_restores_only_under_its_own_vmm(setup: Setup, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    other = "cloud-hypervisor" if setup.vmm == "firecracker" else "firecracker"
    (snap / "snapshot.json").write_text(json.dumps({"vmm": other, "meta": _meta()}))
    with pytest.raises(UserError) as caught:
        await setup.backend.restore(setup.new_id(), snap)
    assert f"--vmm {other}" in (caught.value.hint or "")
    with pytest.raises(NotFoundError):
        await setup.backend.restore(setup.new_id(), tmp_path / "nothing")


def test_vmm_is_chosen_in_config_env_or_flag(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[microvm]\nvmm = "cloud-hypervisor"\n'
        "[microvm.cloud-hypervisor]\nmax_vcpus = 4\n"
        "[microvm.firecracker.jailer]\nuid = 900\ngid = 900\n"
    )
    base = {"CORRAL_CONFIG": str(config), "CORRAL_STATE_DIR": str(tmp_path)}
    settings = Settings.load(environ=base)
    assert settings.microvm.vmm == "cloud-hypervisor"
    assert settings.microvm.cloud_hypervisor.max_vcpus == 4
    assert settings.microvm.firecracker.jailer is not None
    assert Settings.load(environ={**base, "CORRAL_VMM": "firecracker"}).microvm.vmm == "firecracker"
    assert Settings.load(environ=base, vmm="qemu").microvm.vmm == "qemu"
    backend = load_backend(Settings.load(environ=base, backend="microvm"))
    assert isinstance(backend, VmmBackend)
    assert backend.vmm == "cloud-hypervisor"
    with pytest.raises(UserError) as caught:
        Settings.load(environ={**base, "CORRAL_VMM": "xen"})
    assert "microvm.vmm" in caught.value.message
    with pytest.raises(UserError) as bad:
        MicrovmBackend(tmp_path, vmm="xen")
    assert "firecracker" in (bad.value.hint or "")


def _meta() -> dict[str, Any]:
    return {
        "spec": {},
        "cgroup": "/x",
        "uid": 0,
        "gid": 0,
        "workdir": "/work",
        "env": {},
        "memory_limit": 1,
        "pids_limit": 1,
        "vcpus": 1.0,
    }


def test_doctor_says_which_vmms_are_usable_and_why_not(tmp_path: Path) -> None:
    tools = {
        "qemu-system-x86_64": "QEMU emulator version 7.2.0",
        "firecracker": "Firecracker v1.7.0",
    }
    pvm = FakeHost(tmp_path / "pvm", kvm=True, pvm_module=True, tools=tools).build()
    checks = pvm.checks()
    assert checks["vmm-qemu"].status == "ok"
    assert "tcg" in checks["vmm-qemu"].detail
    firecracker = checks["vmm-firecracker"]
    assert firecracker.status == "warn"
    assert "hardware KVM" in firecracker.detail
    assert "PVM" in firecracker.detail
    assert "not on PATH" not in firecracker.detail  # the binary is there; KVM is what fails
    assert "cloud-hypervisor is not on PATH" in checks["vmm-cloud-hypervisor"].detail
    assert "--vmm qemu here" in (firecracker.fix or "")

    kvm = FakeHost(tmp_path / "kvm", kvm=True, tools=tools).build()
    (kvm.root / "sys" / "module" / "kvm_intel").mkdir()
    found = kvm.checks()
    assert found["vmm-firecracker"].status == "ok", found["vmm-firecracker"]
    assert found["vmm-cloud-hypervisor"].status == "warn"
    jailed = MicrovmSettings.model_validate(
        {"vmm": "firecracker", "firecracker": {"jailer": {"uid": 900, "gid": 900}}}
    )
    with_jailer = run_checks(
        environ=kvm.environ,
        proc_root=kvm.root / "proc",
        cgroup_root=kvm.cgroup_root,
        sys_root=kvm.root / "sys",
        dev_root=kvm.root / "dev",
        microvm=jailed,
    )
    check = next(c for c in with_jailer if c.name == "vmm-firecracker")
    assert check.status == "warn"
    assert "(the configured --vmm)" in check.detail
    assert "jailer is not on PATH" in check.detail


async def test_a_jailed_firecracker_sandbox_runs_and_leaves_no_jail(
    state_root: Path, default_image: Any
) -> None:
    """Firecracker under (a stand-in for) its jailer: files hard-linked into the chroot,
    the vsock socket reached through a link into it, the jail removed on destroy."""
    require_root()
    bin_dir = state_root / "bin"
    record = state_root / "jailed-requests.jsonl"
    firecracker = standin_vmm(bin_dir, "firecracker", record, "--guest")
    jailer = standin_jailer(bin_dir, state_root / "jailer.json")
    chroot_base = state_root / "jail"
    settings = MicrovmSettings.model_validate(
        {
            "firecracker": {
                "binary": str(firecracker),
                "jailer": {
                    "uid": GUEST_UID,
                    "gid": GUEST_UID,
                    "chroot_base": str(chroot_base),
                    "binary": str(jailer),
                },
            }
        }
    )
    backend = MicrovmBackend(state_root, vmm="firecracker", vmm_settings=settings)
    image = dataclasses.replace(default_image.to_ref(), uid=GUEST_UID, gid=GUEST_UID)
    sid = f"vb-{os.urandom(4).hex()}"
    config = SandboxConfig(
        sandbox_id=sid,
        image=image,
        limits=SandboxLimits(memory=256 << 20, pids=128, disk=64 << 20),
        mounts=list(default_image.host_mounts),
        labels=TEST_LABEL,
    )
    try:
        await backend.create(config)
        jail = chroot_base / firecracker.name / sid / "root"
        assert (jail / "api.socket").exists()
        assert (backend._dir(sid) / "vsock.sock").is_symlink()
        assert (await backend.exec(sid, sh("echo jailed"))).stdout == b"jailed\n"
        await backend.pause(sid)
        await backend.resume(sid)
        assert await backend.status(sid) == BackendStatus.RUNNING
    finally:
        await backend.destroy(sid)
    assert not (chroot_base / firecracker.name / sid).exists(), "the jail was left"
    assert not standin_pids()
    assert_all_valid(read_record(record))

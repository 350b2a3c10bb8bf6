"""The microvm backend's own behaviour: bundle pieces, the guest agent, snapshots and fork.

The shared conformance suite runs on it too (harness param `microvm`). Here one
VM is booted per module; every other sandbox is restored from its snapshot, as
Corral's fast path does, so the module costs one cold boot.
"""

from __future__ import annotations

import asyncio
import lzma
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import BackendStatus, ExecRequest, Output, SandboxConfig, SandboxLimits
from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.bundle import BundleStore
from corral.backends.microvm.host import accelerator, tsc_khz
from corral.backends.microvm.initramfs import write_initramfs
from corral.backends.microvm.kernel import extract_vmlinux, modinfo, module_order
from corral.errors import ExecError, ImageBuildError, InvalidStateError
from tests.conftest import TEST_LABEL, counter_script, require_binary, require_root

pytestmark = pytest.mark.runtime

COUNTER = counter_script()


def sh(script: str, **kwargs: Any) -> ExecRequest:
    return ExecRequest(["/bin/sh", "-c", script], **kwargs)


# -- pieces, no VM -----------------------------------------------------------


def test_vmlinux_is_cut_out_of_an_xz_bzimage() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    bzimage = b"\x00" * 1000 + b"setup code" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    assert extract_vmlinux(bzimage) == elf
    with pytest.raises(ImageBuildError):
        extract_vmlinux(b"\x00" * 4096)


def test_modules_load_after_their_dependencies() -> None:
    kernel = BundleStore().kernel()
    names = [path.stem for path in kernel.modules]
    for before, after in [
        ("virtio", "virtio_mmio"),
        ("virtio_ring", "virtio_blk"),
        ("jbd2", "ext4"),
        ("mbcache", "ext4"),
        ("crc32c_generic", "ext4"),
    ]:
        assert names.index(before) < names.index(after), names
    # The order is what each module's .modinfo says, not a list typed by hand.
    available = {path.stem: path for path in kernel.modules}
    assert module_order(["ext4"], available)[-1] == "ext4"
    assert "jbd2" in modinfo(available["ext4"].read_bytes())["depends"].split(",")
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"


def test_initramfs_holds_the_agent_and_modules(tmp_path: Path) -> None:
    require_binary("cpio")
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF fake agent")
    module = tmp_path / "virtio.ko"
    module.write_bytes(b"module")
    write_initramfs(tmp_path / "initramfs.cpio", agent, [module])
    listing = subprocess.run(
        ["cpio", "-itv"], input=(tmp_path / "initramfs.cpio").read_bytes(), capture_output=True
    )
    assert listing.returncode == 0, listing.stderr
    names = {line.split()[-1] for line in listing.stdout.decode().splitlines()}
    assert {"init", "modules.order", "lib/modules/virtio.ko", "dev/console"} <= names


def test_accelerator_says_why(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    modules = tmp_path / "module"
    modules.mkdir()
    assert accelerator(dev, modules).name == "tcg"
    dev.touch(mode=0o600)
    (modules / "kvm_pvm").mkdir()
    pvm = accelerator(dev, modules)
    assert (pvm.name, "PVM" in pvm.reason) == ("tcg", True)
    (modules / "kvm_amd").mkdir()
    assert accelerator(dev, modules).name == "kvm"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\ncpu MHz\t\t: 2445.430\n")
    assert tsc_khz(cpuinfo) == 2445430


# -- one booted VM, snapshotted ------------------------------------------------


class Origin:
    """The module's one cold-booted VM, with a file and a running counter, snapshotted."""

    def __init__(self, backend: MicrovmBackend, sandbox_id: str, snapshot: Path) -> None:
        self.backend = backend
        self.sandbox_id = sandbox_id
        self.snapshot = snapshot
        self.created: list[str] = [sandbox_id]

    def new_id(self) -> str:
        sandbox_id = f"mv-{os.urandom(4).hex()}"
        self.created.append(sandbox_id)
        return sandbox_id


@pytest.fixture(scope="module")
def origin(state_root: Path, default_image: Any) -> Iterator[Origin]:
    require_root()
    require_binary("qemu-system-x86_64")
    backend = MicrovmBackend(state_root)
    found = Origin(backend, f"mv-{os.urandom(4).hex()}", state_root / "snapshots" / "origin")
    config = SandboxConfig(
        sandbox_id=found.sandbox_id,
        image=default_image.to_ref(),
        limits=SandboxLimits(memory=256 << 20, pids=128, disk=64 << 20),
        mounts=list(default_image.host_mounts),
        labels=TEST_LABEL,
    )

    async def boot() -> None:
        await backend.create(config)
        ready = await backend.exec(
            found.sandbox_id,
            sh(
                f"echo from-origin > /work/kept; nohup sh -c '{COUNTER}' >/dev/null 2>&1 & "
                "while [ ! -s /tmp/count ]; do sleep 0.1; done; echo ok"
            ),
        )
        assert ready.stdout == b"ok\n", ready
        await backend.snapshot(found.sandbox_id, found.snapshot, keep_running=True)

    try:
        asyncio.run(boot())
        yield found
    finally:

        async def teardown() -> None:
            for sandbox_id in found.created:
                await backend.destroy(sandbox_id)

        asyncio.run(teardown())
        shutil.rmtree(found.snapshot, ignore_errors=True)


async def count(backend: MicrovmBackend, sandbox_id: str) -> int:
    result = await backend.exec(sandbox_id, sh("cat /tmp/count"))
    assert result.exit_code == 0, result
    return int(result.stdout)


async def test_restore_keeps_files_and_processes_and_sets_the_clock(origin: Origin) -> None:
    backend = origin.backend
    sid = origin.new_id()
    await backend.restore(sid, origin.snapshot)
    assert await backend.status(sid) == BackendStatus.RUNNING
    kept = await backend.exec(sid, sh("cat /work/kept; date +%s"))
    lines = kept.stdout.decode().split()
    assert lines[0] == "from-origin", kept
    # The guest woke up at its snapshot time; the agent set it to now.
    assert abs(int(lines[1]) - time.time()) < 5, kept
    # The counter started before the snapshot is still counting after the restore.
    first = await count(backend, sid)
    await asyncio.sleep(1.5)
    assert await count(backend, sid) > first


async def test_fork_gives_each_sandbox_its_own_overlay(origin: Origin) -> None:
    backend = origin.backend
    forks = [origin.new_id(), origin.new_id()]
    await backend.fork(origin.snapshot, forks)
    for index, sid in enumerate(forks):
        wrote = await backend.exec(sid, sh(f"cat /work/kept && echo {index} > /work/mine"))
        assert wrote.stdout == b"from-origin\n", wrote
    for index, sid in enumerate(forks):
        mine = await backend.get_file(sid, "/work/mine", 100)
        assert mine == f"{index}\n".encode()
        assert await count(backend, sid) > 0
    # Each fork's kernel RNG was reseeded on restore: no two draw the same bytes.
    draws = [await backend.exec(sid, sh("head -c 16 /dev/urandom | od -An -tx1")) for sid in forks]
    assert draws[0].stdout != draws[1].stdout, draws
    overlays = {backend._dir(sid) / "scratch.qcow2" for sid in forks}
    assert len(overlays) == 2
    assert all(path.is_file() for path in overlays)
    # The origin, still running, never saw the forks' writes.
    untouched = await backend.exec(origin.sandbox_id, sh("test -e /work/mine || echo absent"))
    assert untouched.stdout == b"absent\n"


async def test_snapshot_stops_and_restore_in_place(origin: Origin, tmp_path: Path) -> None:
    backend = origin.backend
    sid = origin.new_id()
    await backend.restore(sid, origin.snapshot)
    await backend.put_file(sid, "/work/later", b"written after the restore")
    with pytest.raises(InvalidStateError):
        await backend.restore(sid, origin.snapshot)  # it is running
    await backend.snapshot(sid, tmp_path / "again")
    assert await backend.status(sid) == BackendStatus.STOPPED
    await backend.restore(sid, tmp_path / "again")
    assert await backend.status(sid) == BackendStatus.RUNNING
    assert await backend.get_file(sid, "/work/later", 100) == b"written after the restore"


async def test_stopping_early_kills_the_command(origin: Origin) -> None:
    backend = origin.backend
    sid = origin.new_id()
    await backend.restore(sid, origin.snapshot)
    stream = backend.exec_stream(sid, sh("echo started; exec sleep 1234"))
    async for event in stream:
        assert isinstance(event, Output)
        break
    await stream.aclose()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while True:
        ps = await backend.exec(sid, sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '"))
        if b"sleep 1234" not in ps.stdout or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert b"sleep 1234" not in ps.stdout, "the abandoned command still runs in the guest"


async def test_a_paused_vm_refuses_requests_at_once(origin: Origin) -> None:
    backend = origin.backend
    sid = origin.new_id()
    await backend.restore(sid, origin.snapshot)
    await backend.pause(sid)
    started = time.monotonic()
    with pytest.raises(InvalidStateError):
        await backend.exec(sid, sh("true"))
    assert time.monotonic() - started < 2
    await backend.resume(sid)
    assert (await backend.exec(sid, sh("echo back"))).stdout == b"back\n"


async def test_concurrent_commands_use_separate_ports(origin: Origin) -> None:
    backend = origin.backend
    script = "date +%s.%N; sleep 3; date +%s.%N"
    results = await asyncio.gather(*(backend.exec(origin.sandbox_id, sh(script)) for _ in range(4)))
    spans = [tuple(float(t) for t in r.stdout.split()) for r in results]
    assert len(spans) == 4
    # Every command started before the first one ended: they ran side by side.
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


async def test_stats_come_from_inside_the_guest(origin: Origin) -> None:
    backend = origin.backend
    guest = await backend.guest_stats(origin.sandbox_id)
    assert 150 << 10 < guest["mem_total_kib"] <= 256 << 10
    assert 0 < guest["mem_available_kib"] < guest["mem_total_kib"]
    assert guest["pids"] >= 1  # the counter's shell (and its sleep)
    stats = await backend.stats(origin.sandbox_id)
    assert (stats.memory_limit, stats.pids_limit) == (256 << 20, 128)
    assert stats.cpu_seconds > 0  # QEMU's time, from the host cgroup


async def test_warm_start_restores_later_sandboxes_of_a_kind(
    state_root: Path, default_image: Any
) -> None:
    backend = MicrovmBackend(state_root, warm_start=True)
    limits = SandboxLimits(memory=192 << 20, pids=100, disk=48 << 20)
    ids = [f"mvw-{os.urandom(4).hex()}" for _ in range(2)]
    try:
        for index, sid in enumerate(ids):
            await backend.create(
                SandboxConfig(
                    sandbox_id=sid,
                    image=default_image.to_ref(),
                    limits=limits,
                    env={"WHO": f"sandbox-{index}"},
                    mounts=list(default_image.host_mounts),
                    labels=TEST_LABEL,
                )
            )
        first, second = (backend._meta(sid) for sid in ids)
        assert first.restored_from is None  # booted cold, then snapshotted as the warm start
        assert second.restored_from is not None
        assert Path(second.restored_from).parent == backend.warm_dir
        for index, sid in enumerate(ids):
            who = await backend.exec(sid, sh('echo "$WHO"; date +%s; ls /work'))
            lines = who.stdout.decode().split("\n")
            assert lines[0] == f"sandbox-{index}", who
            assert abs(int(lines[1]) - time.time()) < 5, who
        # Writes of one do not reach the other, nor the next sandbox of the kind.
        await backend.put_file(ids[1], "/work/private", b"x")
        assert (await backend.exec(ids[0], sh("ls /work"))).stdout == b""
    finally:
        for sid in ids:
            await backend.destroy(sid)


async def test_a_vm_that_dies_is_stopped(origin: Origin) -> None:
    backend = origin.backend
    sid = origin.new_id()
    await backend.restore(sid, origin.snapshot)
    pid = backend._qemu_pid(sid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not _alive(pid):
            break
        await asyncio.sleep(0.05)
    assert await backend.status(sid) == BackendStatus.STOPPED
    with pytest.raises(ExecError) as info:
        await backend.exec(sid, sh("true"))
    assert info.value.sandbox_id == sid
    await backend.destroy(sid)
    assert await backend.status(sid) == BackendStatus.MISSING


async def test_destroy_leaves_no_process_cgroup_or_file(origin: Origin) -> None:
    backend = origin.backend
    sid = origin.new_id()
    await backend.restore(sid, origin.snapshot)
    pid = backend._qemu_pid(sid)
    assert pid is not None
    sandbox_dir = backend._dir(sid)
    await backend.destroy(sid)
    assert not _alive(pid), "QEMU outlived destroy()"
    assert not sandbox_dir.exists()
    assert sid not in await backend.list_sandboxes()
    await backend.destroy(sid)  # harmless twice


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

"""Hostile workloads in a microVM: the VM holds them; the host and a neighbour VM stay fine.

The same workloads as tests/test_hostile.py (the Rust program and shell
snippets in tests/hostile/), asserted the way a VM contains them: limits are
the guest kernel's (a cgroup the agent makes inside the guest), the host sees
only QEMU, and a neighbour VM keeps answering. test_hostile.py itself stays on
the container backends: its host-side checks (the sandbox's processes in a host
cgroup, uid mapping, seccomp) describe containers, not VMs.

One noisy VM (small limits) and one neighbour are booted per module.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import ExecRequest, ExecResult, SandboxConfig, SandboxLimits
from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.hostcg import QEMU_THREADS
from tests.conftest import TEST_LABEL, require_binary, require_root
from tests.test_hostile import BINARY, fields, hostile_binary, snippet

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

__all__ = ["hostile_binary"]  # the session fixture, shared with test_hostile.py

NOISY = SandboxLimits(vcpus=0.5, memory=160 << 20, pids=64, disk=32 << 20)
# An `echo` through the agent takes ~0.3 s under TCG on an idle host; a busy
# neighbour must not make it take many times that.
NEIGHBOUR_LATENCY = 5.0
HANG_MARGIN = 30.0


@dataclass
class Pair:
    backend: MicrovmBackend
    noisy: str
    neighbour: str


@pytest.fixture(scope="module")
def pair(state_root: Path, default_image: Any, hostile_binary: bytes) -> Iterator[Pair]:
    require_root()
    require_binary("qemu-system-x86_64")
    backend = MicrovmBackend(state_root)
    found = Pair(backend, f"mvh-{os.urandom(4).hex()}", f"mvn-{os.urandom(4).hex()}")

    def config(sandbox_id: str, limits: SandboxLimits) -> SandboxConfig:
        return SandboxConfig(
            sandbox_id=sandbox_id,
            image=default_image.to_ref(),
            limits=limits,
            mounts=list(default_image.host_mounts),
            labels=TEST_LABEL,
        )

    async def boot() -> None:
        await asyncio.gather(
            backend.create(config(found.noisy, NOISY)),
            backend.create(config(found.neighbour, SandboxLimits(memory=256 << 20, pids=128))),
        )
        await backend.put_file(found.noisy, BINARY, hostile_binary, mode=0o755)

    try:
        asyncio.run(boot())
        yield found
    finally:

        async def teardown() -> None:
            for sandbox_id in (found.noisy, found.neighbour):
                await backend.destroy(sandbox_id)

        asyncio.run(teardown())


async def run(pair: Pair, sid: str, argv: Sequence[str], *, timeout: float = 10) -> ExecResult:
    request = ExecRequest(list(argv), timeout=timeout)
    try:
        return await asyncio.wait_for(pair.backend.exec(sid, request), timeout + HANG_MARGIN)
    except TimeoutError:
        pytest.fail(f"{argv} was still running {HANG_MARGIN}s after its {timeout}s timeout")


async def echo_latency(pair: Pair) -> float:
    started = time.monotonic()
    result = await run(pair, pair.neighbour, ["echo", "ok"])
    assert result.stdout == b"ok\n", f"the neighbour stopped answering: {result}"
    return time.monotonic() - started


def host_answers() -> float:
    started = time.monotonic()
    subprocess.run(["true"], check=True)
    return time.monotonic() - started


def qemu_threads(pair: Pair, sid: str) -> int:
    pid = pair.backend._qemu_pid(sid)
    assert pid is not None, "the VM's QEMU is gone"
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("bomb", ["raw-fork", "shell"])
async def test_fork_bomb_stays_inside_the_vm(pair: Pair, bomb: str) -> None:
    if bomb == "shell":
        await pair.backend.put_file(pair.noisy, "/work/forkbomb.sh", snippet("forkbomb.sh"))
        argv = ["/bin/sh", "/work/forkbomb.sh"]
    else:
        argv = [BINARY, "forkbomb"]
    host_before = len(os.listdir("/proc"))
    bombing = asyncio.create_task(run(pair, pair.noisy, argv, timeout=3))
    latencies: list[float] = []
    threads = 0
    while not bombing.done():
        latencies.append(await echo_latency(pair))
        threads = max(threads, qemu_threads(pair, pair.noisy))
        assert host_answers() < 1.0
        await asyncio.sleep(0.1)
    result = await bombing
    assert result.duration < 3 + 10, f"the bomb outlived its timeout: {result}"
    if bomb == "raw-fork":
        assert result.timed_out, result
        assert int(fields(result.stdout)["eagain"]) > 0, "fork never failed: no pids limit"
    else:
        assert b"Cannot fork" in result.stderr or result.timed_out, result
    assert latencies, "the neighbour was never asked while the bomb ran"
    assert max(latencies) < NEIGHBOUR_LATENCY, latencies
    # The host saw none of the bomb: guest processes are not host processes.
    assert threads <= QEMU_THREADS
    assert len(os.listdir("/proc")) - host_before < 100
    # The bomb is gone (the timeout killed its cgroup) and the VM answers.
    deadline = time.monotonic() + 10
    while (stats := await pair.backend.stats(pair.noisy)).pids > 1:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert stats.pids <= 1, f"bomb processes survived the exec: {stats}"
    assert (await run(pair, pair.noisy, ["echo", "ok"])).stdout == b"ok\n"


async def test_memory_hog_is_killed_inside_the_vm(pair: Pair) -> None:
    before = await pair.backend.stats(pair.noisy)
    result = await run(pair, pair.noisy, [BINARY, "memhog", "512"], timeout=60)
    report = fields(result.stdout)
    assert "done_mib" not in report, "touched 512 MiB in a 160 MiB VM"
    assert 0 < int(report.get("touched_mib", "0")) < 160, result
    assert (result.exit_code, result.oom_killed) == (137, True), result
    assert result.reason is not None
    assert "memory" in result.reason, result
    assert (await pair.backend.stats(pair.noisy)).oom_kills > before.oom_kills
    # Only the hog died: the guest agent (and the VM) live on and have memory to give.
    again = await run(pair, pair.noisy, [BINARY, "memhog", "32"], timeout=60)
    assert fields(again.stdout).get("done_mib") == "32", again
    assert await echo_latency(pair) < NEIGHBOUR_LATENCY


async def test_cpu_spinner_is_held_to_the_vms_quota(pair: Pair) -> None:
    # QEMU's host cgroup has a quota of `vcpus` CPUs: all the VM's work, emulation
    # included, fits in it however hard the guest spins.
    before = await pair.backend.stats(pair.noisy)
    started = time.monotonic()
    result = await run(pair, pair.noisy, [BINARY, "spin", "2", "3"], timeout=60)
    wall = time.monotonic() - started
    used = (await pair.backend.stats(pair.noisy)).cpu_seconds - before.cpu_seconds
    assert result.exit_code == 0, result
    assert used <= NOISY.vcpus * wall * 1.3 + 0.2, f"{used:.2f} cpu-s in {wall:.2f} s"
    assert used >= NOISY.vcpus * wall * 0.4, f"the VM barely ran ({used:.2f} cpu-s)"


async def test_disk_fill_stays_in_the_vms_scratch(pair: Pair) -> None:
    disk = NOISY.disk
    backend = pair.backend
    await backend.put_file(pair.noisy, "/work/fill.sh", snippet("fill.sh"))
    shell = await run(pair, pair.noisy, ["/bin/sh", "/work/fill.sh", "/tmp/fill"], timeout=60)
    assert b"No space left on device" in shell.stderr, shell
    assert disk // 2 < int(fields(shell.stdout)["written"]) <= disk, shell
    cleared = await run(pair, pair.noisy, ["sh", "-c", "rm /tmp/fill && echo cleared"])
    assert cleared.stdout == b"cleared\n", cleared

    result = await run(pair, pair.noisy, [BINARY, "diskfill", "/work/fill", "100"], timeout=60)
    report = fields(result.stdout)
    assert report["error"] == "ENOSPC", result
    assert disk // 2 < int(report["written"]) <= disk, result
    # On the host, the sandbox's writes land only in its qcow2 overlay, bounded by
    # the scratch filesystem's size.
    overlay = backend._dir(pair.noisy) / "scratch.qcow2"
    assert overlay.stat().st_blocks * 512 < disk + (8 << 20)
    assert (await run(pair, pair.noisy, ["echo", "ok"])).stdout == b"ok\n"
    await run(pair, pair.noisy, ["rm", "/work/fill"])
    refill = await run(pair, pair.noisy, [BINARY, "diskfill", "/work/again", "4"], timeout=30)
    assert fields(refill.stdout)["error"] == "none", refill


async def test_the_guest_sees_no_host(pair: Pair) -> None:
    script = (
        "cat /proc/net/dev; echo ---; cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; "
        "echo ---; id -u; cat /proc/self/status | grep NoNewPrivs"
    )
    result = await run(pair, pair.noisy, ["sh", "-c", script])
    dev, ps, ident = result.stdout.decode().split("---\n")
    interfaces = [line.split(":")[0].strip() for line in dev.splitlines() if ":" in line]
    assert interfaces == ["lo"], dev
    # The only processes are the guest's own: none of the host's (this test process).
    assert "pytest" not in ps, ps
    assert ident.split()[:3] == ["1000", "NoNewPrivs:", "1"], ident
    secret = await run(pair, pair.noisy, [BINARY, "read", "/etc/shadow"])
    assert fields(secret.stdout.splitlines()[0]).get("read") == "failed", secret

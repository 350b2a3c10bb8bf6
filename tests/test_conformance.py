"""The backend conformance suite: every real backend/runtime must pass all of it.

Parametrized through the `harness` fixture (conftest.py): oci on crun, runc and
runsc today; podman and microVM backends join by adding harness parameters.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from corral.backends.base import BackendStatus, Capability, ExecRequest, ExitStatus, Output
from corral.errors import FileTooLargeError, NotFoundError, SandboxStartError
from tests.conftest import Harness

pytestmark = pytest.mark.runtime


def sh(script: str, **kwargs: object) -> ExecRequest:
    return ExecRequest(["/bin/sh", "-c", script], **kwargs)  # type: ignore[arg-type]


async def test_create_exec_destroy(harness: Harness) -> None:
    backend = harness.backend
    sid = await harness.sandbox()
    assert await backend.status(sid) == BackendStatus.RUNNING
    assert sid in await backend.list_sandboxes()
    result = await backend.exec(sid, sh("echo out; echo err >&2; exit 3"))
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    await backend.destroy(sid)
    assert await backend.status(sid) == BackendStatus.MISSING
    await backend.destroy(sid)  # a second destroy is harmless
    with pytest.raises(NotFoundError):
        await backend.exec(sid, ExecRequest(["/bin/true"]))


async def test_env_cwd_stdin_and_user(harness: Harness) -> None:
    sid = await harness.sandbox(env={"FROM_CREATE": "c"})
    result = await harness.backend.exec(
        sid,
        sh(
            'echo "$FROM_CREATE $FROM_EXEC $HOME"; pwd; id -u; cat',
            env={"FROM_EXEC": "e"},
            cwd="/tmp",
            stdin=b"piped input",
        ),
    )
    assert result.exit_code == 0, result
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "c e /home/sandbox"
    assert lines[1] == "/tmp"
    assert lines[2] == "1000", "commands must run as the non-root template user"
    assert lines[3] == "piped input"
    default_cwd = await harness.backend.exec(sid, sh("pwd"))
    assert default_cwd.stdout == b"/work\n"


async def test_output_is_streamed_as_produced(harness: Harness) -> None:
    sid = await harness.sandbox()
    seen: list[tuple[float, object]] = []
    started = time.monotonic()
    async for event in harness.backend.exec_stream(sid, sh("echo first; sleep 1.5; echo second")):
        seen.append((time.monotonic() - started, event))
    outputs = [(t, e) for t, e in seen if isinstance(e, Output)]
    assert b"".join(e.data for _, e in outputs) == b"first\nsecond\n"  # type: ignore[union-attr]
    first_at = outputs[0][0]
    exit_at = seen[-1][0]
    assert isinstance(seen[-1][1], ExitStatus)
    assert exit_at - first_at > 1.0, "the first line must arrive before the command ends"


async def test_timeout_kills_the_whole_command(harness: Harness) -> None:
    sid = await harness.sandbox()
    heartbeat = "(while :; do echo beat >> /tmp/beat; sleep 0.1; done) & sleep 60"
    result = await harness.backend.exec(sid, sh(heartbeat, timeout=1))
    assert result.exit_code == 124
    assert result.timed_out
    assert result.duration < 10
    count = sh("wc -l < /tmp/beat")
    before = (await harness.backend.exec(sid, count)).stdout
    await asyncio.sleep(0.6)
    after = (await harness.backend.exec(sid, count)).stdout
    assert int(before) > 0
    assert before == after, "a background child of the timed-out command is still running"


async def test_missing_command_is_127(harness: Harness) -> None:
    sid = await harness.sandbox()
    result = await harness.backend.exec(sid, ExecRequest(["/no/such/command"]))
    assert result.exit_code == 127
    assert result.reason
    assert "not found" in result.reason


async def test_signals_map_to_128_plus_n(harness: Harness) -> None:
    sid = await harness.sandbox()
    assert (await harness.backend.exec(sid, sh("kill -9 $$"))).exit_code == 137
    assert (await harness.backend.exec(sid, sh("kill -15 $$"))).exit_code == 143


async def test_files_round_trip(harness: Harness) -> None:
    sid = await harness.sandbox()
    payload = bytes(range(256)) * 1000
    await harness.backend.put_file(sid, "/work/blob.bin", payload)
    assert await harness.backend.get_file(sid, "/work/blob.bin", 1 << 20) == payload
    with pytest.raises(FileTooLargeError):
        await harness.backend.get_file(sid, "/work/blob.bin", 1000)
    with pytest.raises(NotFoundError):
        await harness.backend.get_file(sid, "/work/missing", 1000)
    with pytest.raises(NotFoundError):
        await harness.backend.put_file(sid, "/usr/cannot-write", b"x")


async def test_rootfs_read_only_scratch_writable(harness: Harness) -> None:
    sid = await harness.sandbox()
    for path in ("/usr/x", "/etc/x", "/x"):
        result = await harness.backend.exec(sid, sh(f"echo hi > {path}"))
        assert result.exit_code != 0, f"{path} must not be writable"
    for path in ("/work/x", "/tmp/x", "/home/sandbox/x"):
        result = await harness.backend.exec(sid, sh(f"echo hi > {path} && cat {path}"))
        assert result.stdout == b"hi\n", (path, result)


async def test_stats_report_limits(harness: Harness) -> None:
    sid = await harness.sandbox()
    stats = await harness.backend.stats(sid)
    if harness.runtime != "runsc":  # gVisor accounts memory in its sentry, not per process
        assert stats.memory_limit == 256 << 20
    assert stats.pids_limit == 128
    assert stats.pids >= 1
    assert stats.memory_bytes > 0


async def test_sandbox_outlives_its_creator(harness: Harness, state_root: Path) -> None:
    sid = await harness.sandbox()
    other = harness.reopen()  # a new process would look just like this
    result = await other.exec(sid, sh("echo still here"))
    assert result.stdout == b"still here\n"
    await other.destroy(sid)
    assert await harness.backend.status(sid) == BackendStatus.MISSING


async def test_failed_create_leaves_nothing(harness: Harness, state_root: Path) -> None:
    from dataclasses import replace

    broken = replace(harness.image, rootfs=Path("/nonexistent/rootfs"))
    config = harness.config(image=broken)
    with pytest.raises(SandboxStartError) as info:
        await harness.backend.create(config)
    assert info.value.sandbox_id == config.sandbox_id
    assert not (state_root / "sandboxes" / config.sandbox_id).exists()
    assert await harness.backend.status(config.sandbox_id) == BackendStatus.MISSING
    assert config.sandbox_id not in await harness.backend.list_sandboxes()


async def test_pause_and_resume(harness: Harness) -> None:
    if Capability.PAUSE not in harness.backend.capabilities:
        pytest.fail("every current backend advertises pause")
    sid = await harness.sandbox()
    await harness.backend.pause(sid)
    assert await harness.backend.status(sid) == BackendStatus.PAUSED
    await harness.backend.resume(sid)
    assert await harness.backend.status(sid) == BackendStatus.RUNNING
    assert (await harness.backend.exec(sid, sh("echo ok"))).stdout == b"ok\n"

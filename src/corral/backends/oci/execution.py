"""Exec plumbing for the oci backend: streaming a command's output and naming its end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterable

from corral.backends.base import ExecRequest, ExitStatus, Output
from corral.backends.oci.runtimes import OciRuntime

_CHUNK = 65536
# `runsc exec` exits 128 when the sandbox itself went away under the command.
GVISOR_SANDBOX_DIED = 128


def ps_table(text: str) -> list[tuple[int, int]]:
    """(pid, ppid) pairs from `runsc ps` (columns: UID PID PPID C STIME TIME CMD)."""
    pairs = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1].isdigit() and fields[2].isdigit():
            pairs.append((int(fields[1]), int(fields[2])))
    return pairs


def exit_status(
    rc: int,
    runtime: OciRuntime,
    request: ExecRequest,
    stderr_tail: bytes,
    timed_out: bool,
    oom: bool,
    started: float,
    sandbox_gone: bool = False,
) -> ExitStatus:
    """Name how a command ended. `sandbox_gone`: the sandbox itself stopped under it
    (gVisor's sentry died), whatever code the runtime reported for the command."""
    duration = time.monotonic() - started
    if timed_out:
        reason = f"timed out after {request.timeout:g}s; killed"
        return ExitStatus(124, timed_out=True, oom_killed=oom, duration=duration, reason=reason)
    sandbox_died = sandbox_gone or (not runtime.in_kernel and rc == GVISOR_SANDBOX_DIED)
    if oom and (rc in (137, -9) or sandbox_died):
        return ExitStatus(
            137,
            oom_killed=True,
            duration=duration,
            reason="killed: out of memory (the sandbox's memory limit)",
        )
    if rc < 0:
        rc = 128 - rc
    text = stderr_tail.decode(errors="replace")
    if rc in (127, 128, 255) and runtime.missing_command.search(text):
        return ExitStatus(127, duration=duration, reason=f"command not found: {request.argv[0]}")
    if sandbox_died and not runtime.missing_command.search(text):
        return ExitStatus(
            rc or GVISOR_SANDBOX_DIED,
            duration=duration,
            reason="the sandbox's gVisor kernel exited (e.g. it hit its pids limit)",
        )
    if rc == 137:
        return ExitStatus(137, oom_killed=oom, duration=duration, reason="killed by SIGKILL")
    if rc > 128:
        name = signal_name(rc - 128)
        return ExitStatus(rc, duration=duration, reason=f"killed by {name}")
    return ExitStatus(rc, oom_killed=oom, duration=duration)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def pump(
    stream: asyncio.StreamReader | None, name: str, queue: asyncio.Queue[Output | None]
) -> None:
    assert stream is not None
    try:
        while chunk := await stream.read(_CHUNK):
            await queue.put(Output(name, chunk))  # type: ignore[arg-type]
    finally:
        await queue.put(None)


async def feed(proc: asyncio.subprocess.Process, data: bytes | AsyncIterable[bytes]) -> None:
    """Write stdin to the command (all at once, or chunk by chunk as it arrives), then close."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if isinstance(data, bytes):
            proc.stdin.write(data)
            await proc.stdin.drain()
        else:
            async for chunk in data:
                proc.stdin.write(chunk)
                await proc.stdin.drain()
        proc.stdin.close()

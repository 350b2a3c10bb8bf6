"""Exec plumbing shared by the oci and podman backends: running `<runtime> exec`,
streaming its output under a timeout, killing what it started, naming its end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral._sys import cgroups, procs
from corral.backends.base import ExecRequest, ExitStatus, Output
from corral.backends.oci.runtimes import OciRuntime

_CHUNK = 65536
# Every process an exec starts inherits this variable: at a timeout, processes that
# left the command's session (setsid) are still found by it in the sandbox's cgroup.
EXEC_TOKEN_VAR = "CORRAL_EXEC_ID"
# `runsc exec` exits 128 when the sandbox itself went away under the command.
GVISOR_SANDBOX_DIED = 128
# A standby shell (standby.py) that cannot find the command it was to exec.
STANDBY_MISSING_COMMAND = re.compile(r"^/bin/sh: \d+: exec: .*: not found$", re.MULTILINE)


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
    if rc in (127, 128, 255) and (
        runtime.missing_command.search(text) or STANDBY_MISSING_COMMAND.search(text)
    ):
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


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of `stream_process`: how the process ended."""

    returncode: int
    stderr_tail: bytes
    timed_out: bool
    started: float  # time.monotonic() when it was spawned


async def stream_process(
    argv: Sequence[str],
    request: ExecRequest,
    kill: Callable[[int], Awaitable[None]],
    *,
    cwd: Path | None = None,
) -> AsyncGenerator[Output | Finished, None]:
    """Run `argv` in a session of its own; yield its output as produced, then one Finished.

    `request.stdin` (bytes or an async iterable of chunks) is fed to it and closed.
    At `request.timeout`, `kill(session id)` must kill the command and all it
    started; the stream then ends when the output closes. Closing the generator
    early (use `contextlib.aclosing`) kills and reaps it before `aclose()` returns.
    """
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if request.stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    async with contextlib.aclosing(follow_process(proc, request, kill, started)) as events:
        async for event in events:
            yield event


async def follow_process(
    proc: asyncio.subprocess.Process,
    request: ExecRequest,
    kill: Callable[[int], Awaitable[None]],
    started: float,
) -> AsyncGenerator[Output | Finished, None]:
    """`stream_process` for a process already started (in a session of its own, with
    stdout and stderr piped, and stdin piped when `request.stdin` is given)."""
    queue: asyncio.Queue[Output | None] = asyncio.Queue()
    tasks = [
        asyncio.create_task(pump(proc.stdout, "stdout", queue)),
        asyncio.create_task(pump(proc.stderr, "stderr", queue)),
    ]
    if request.stdin is not None:
        tasks.append(asyncio.create_task(feed(proc, request.stdin)))
    deadline = None if request.timeout is None else started + request.timeout
    timed_out = False
    finished = False
    stderr_tail = b""
    try:
        open_streams = 2
        while open_streams:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                timed_out = True
                await kill(proc.pid)
                deadline = None
                continue
            try:
                item = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                continue
            if item is None:
                open_streams -= 1
                continue
            if item.stream == "stderr":
                stderr_tail = (stderr_tail + item.data)[-2048:]
            yield item
        rc = await proc.wait()
        finished = True
    finally:
        if not finished:
            await asyncio.shield(kill(proc.pid))
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for task in tasks:
            task.cancel()
    yield Finished(rc, stderr_tail, timed_out, started)


@dataclass(frozen=True, slots=True)
class ExecTarget:
    """Where `<runtime> exec` finds a running sandbox."""

    runtime: OciRuntime
    root: Path  # the runtime's state dir (--root)
    container: str  # the runtime's container id
    cgroup: str  # the container's cgroup (its processes, its OOM counter)
    work_dir: Path  # where the exec's process spec and pid file are written


def exec_command(
    target: ExecTarget, process: dict[str, Any], token: str
) -> tuple[list[str], Path, Path]:
    """Write `process` (an OCI process spec) for `<runtime> exec --process`: the
    command line, the process file and the pid file the runtime will write."""
    runtime = target.runtime
    process_file = target.work_dir / f"exec-{token}.json"
    pid_file = target.work_dir / f"exec-{token}.pid"
    process_file.write_text(json.dumps(process))
    pid_flag = "--pid-file" if runtime.in_kernel else "--internal-pid-file"
    argv = runtime.command(
        target.root, "exec", "--process", str(process_file), pid_flag, str(pid_file),
        target.container,
    )  # fmt: skip
    return argv, process_file, pid_file


async def runtime_exec(
    target: ExecTarget, process: dict[str, Any], request: ExecRequest, token: str
) -> AsyncGenerator[Output | Finished, None]:
    """`<runtime> exec --process` of `process` (an OCI process carrying `token` in its
    env), streamed by `stream_process`; its files are gone when the stream ends."""
    argv, process_file, pid_file = exec_command(target, process, token)

    async def kill(sid: int) -> None:
        await kill_exec(target, sid, pid_file, token)

    try:
        async with contextlib.aclosing(stream_process(argv, request, kill)) as events:
            async for event in events:
                yield event
    finally:
        process_file.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)


async def kill_exec(target: ExecTarget, sid: int, pid_file: Path, token: str) -> None:
    """Kill a command and everything it started (inside or outside gVisor)."""
    runtime = target.runtime
    try:
        command_pid: int | None = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        command_pid = None
    if runtime.in_kernel:
        # The runtime puts the command in a session of its own: kill that session.
        if command_pid is not None:
            procs.kill_session(procs.session_of(command_pid) or command_pid)
        procs.kill_session(sid)
        marker = f"{EXEC_TOKEN_VAR}={token}".encode()
        for _pass in range(50):  # until a pass finds none: children fork meanwhile
            marked = [
                pid for pid in cgroups.pids(target.cgroup) if procs.has_environ_entry(pid, marker)
            ]
            if not marked:
                break
            for pid in marked:
                procs.kill(pid)
        return
    if command_pid is not None:
        rc, out, _ = await run(runtime.command(target.root, "ps", target.container))
        tree = {command_pid}
        if rc == 0:
            table = ps_table(out.decode(errors="replace"))
            grew = True
            while grew:
                grew = False
                for pid, ppid in table:
                    if ppid in tree and pid not in tree:
                        tree.add(pid)
                        grew = True
        for pid in sorted(tree, reverse=True):
            kill_argv = runtime.command(
                target.root, "kill", "--pid", str(pid), target.container, "KILL"
            )
            await run(kill_argv)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)


async def run(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run a runtime command to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err

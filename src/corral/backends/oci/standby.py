"""Standby processes: a fast first command for warm-pool members.

`<runtime> exec` costs 10-15 ms (fork the runtime, join the namespaces, exec). A
standby pays that ahead of time: a `/bin/sh` exec'd into the sandbox the usual way
(same user, env, cgroup, exec token, pid file), blocked reading one line. The first
command's cwd, env and argv arrive as that line, shell-quoted, and the shell
`exec`s the command in place - so output, stdin, exit status, timeout and kill are
those of an ordinary exec (the same pipes, session and pid). It serves one command,
then it is gone; it lives in the process that primed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.backends.base import ExecRequest, Output
from corral.backends.oci.execution import (
    ExecTarget,
    Finished,
    exec_command,
    follow_process,
    kill_exec,
)
from corral.errors import ExecError

# Says it is ready (one byte, read by `start_standby`), reads the command line (EOF
# before it: exit quietly), then runs it in place.
_SCRIPT = 'printf R; IFS= read -r corral_line || exit 125; eval "$corral_line"'
_READY_SECONDS = 10.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLOSE_SECONDS = 1.0


def command_line(request: ExecRequest) -> bytes | None:
    """The line a standby runs for `request`, or None when it cannot carry it (a
    newline in an argument, an env name the shell cannot export, a relative cwd or
    an argv[0] the shell's exec would read as an option)."""
    words = [*request.argv, *request.env.values(), *request.env.keys(), request.cwd or ""]
    if any("\n" in word or "\0" in word for word in words):
        return None
    if not request.argv or request.argv[0].startswith("-"):
        return None
    if any(not _ENV_NAME.fullmatch(name) for name in request.env):
        return None
    parts = []
    if request.cwd is not None:
        if not request.cwd.startswith("/"):
            return None
        parts.append(f"cd {shlex.quote(request.cwd)} || exit 126")
    parts.extend(f"export {name}={shlex.quote(value)}" for name, value in request.env.items())
    parts.append("exec " + " ".join(shlex.quote(arg) for arg in request.argv))
    return ("; ".join(parts) + "\n").encode()


@dataclass
class Standby:
    """One primed `<runtime> exec` of the standby shell."""

    target: ExecTarget
    proc: asyncio.subprocess.Process
    token: str
    process_file: Path
    pid_file: Path

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def run(
        self, line: bytes, request: ExecRequest
    ) -> AsyncGenerator[Output | Finished, None]:
        """Hand `line` to the shell and follow the command it becomes."""
        started = time.monotonic()
        proc = self.proc
        assert proc.stdin is not None
        try:
            proc.stdin.write(line)
            if request.stdin is None:
                proc.stdin.close()

            async def kill(sid: int) -> None:
                await kill_exec(self.target, sid, self.pid_file, self.token)

            async with contextlib.aclosing(follow_process(proc, request, kill, started)) as events:
                async for event in events:
                    yield event
        finally:
            self._forget()

    async def close(self) -> None:
        """End the standby and reap it (harmless when it already ended). Its shell
        exits at end of input; one that cannot (a paused sandbox) is killed."""
        proc = self.proc
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), _CLOSE_SECONDS)
        except TimeoutError:
            await kill_exec(self.target, proc.pid, self.pid_file, self.token)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                # The runtime is gone; a pipe still held inside is the sandbox's to
                # release when it is deleted.
                await asyncio.wait_for(asyncio.shield(proc.wait()), _CLOSE_SECONDS)
        self._forget()

    def _forget(self) -> None:
        self.process_file.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)


async def start_standby(target: ExecTarget, process: dict[str, Any], token: str) -> Standby:
    """Exec the standby shell with `process` (an OCI process spec carrying `token`);
    its args are replaced by the standby script."""
    process = {**process, "args": ["/bin/sh", "-c", _SCRIPT]}
    argv, process_file, pid_file = exec_command(target, process, token)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    standby = Standby(target, proc, token, process_file, pid_file)
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(proc.stdout.readexactly(1), _READY_SECONDS)
    except (TimeoutError, asyncio.IncompleteReadError):
        await standby.close()
        assert proc.stderr is not None
        tail = (await proc.stderr.read()).decode(errors="replace")[-500:]
        raise ExecError(
            "the standby shell did not start (does the image have /bin/sh?)",
            sandbox_id=target.container,
            stderr_tail=tail,
            hint="its first command takes the ordinary exec path",
        ) from None
    process_file.unlink()  # read by the runtime before the shell started: not at claim time
    return standby

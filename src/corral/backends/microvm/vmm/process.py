"""Supervise one VMM process: find the binary, spawn it, wait for its API, always release it.

Both drivers share this: the process runs in its own session (so a jailer's
or VMM's children die with it), writes stdout and stderr to a log file whose
tail goes into error messages, and is stopped terminate -> wait -> kill.
`DetachedVmmProcess` is the same VMM made to outlive this Python process (as
`qemu -daemonize` does), found again later from the record it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import httpx

from corral._sys import procs
from corral.errors import BackendUnavailableError, SandboxStartError

__all__ = [
    "MAX_SOCKET_PATH",
    "DetachedVmmProcess",
    "ProcessRecord",
    "VmmProcess",
    "resolve_binary",
    "unix_client",
]

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_TAIL_BYTES = 2000


def resolve_binary(
    configured: str | Path | None, default: str, *, environ: Mapping[str, str] | None = None
) -> Path:
    """The VMM binary to run: the configured path, else `default` looked up on PATH.

    Raises BackendUnavailableError naming the binary when neither exists.
    """
    env = os.environ if environ is None else environ
    wanted = str(configured) if configured else default
    found = shutil.which(wanted, path=env.get("PATH", os.defpath))
    if found is None:
        where = "is not executable" if os.sep in wanted else "is not on PATH"
        raise BackendUnavailableError(
            f"{wanted} {where}",
            backend="microvm",
            hint=f"install {default} (a static release binary works) or set its path in the "
            "microvm section of the Corral config",
        )
    return Path(found)


def unix_client(socket: Path, *, timeout: float) -> httpx.AsyncClient:
    """An httpx client for an HTTP API served on a unix socket."""
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    return httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=timeout)


class VmmProcess:
    """One spawned VMM (or jailer) process and its log file."""

    def __init__(
        self, argv: Sequence[str], *, log_path: Path, name: str, cwd: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.log_path = log_path
        self.name = name
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def exited(self) -> bool:
        """True once the process has run and ended (False before it was spawned)."""
        return self.returncode is not None

    def exit_text(self) -> str:
        return f"exited with status {self.returncode}"

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _TAIL_BYTES))
                return log.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    cwd=self.cwd,
                )
            except OSError as exc:
                raise SandboxStartError(
                    f"could not run {self.argv[0]}: {exc.strerror}",
                    backend="microvm",
                    hint=f"check that {self.argv[0]} is an executable {self.name} binary",
                ) from exc

    async def wait_ready(
        self, probe: Callable[[], Awaitable[bool]], *, socket: Path, deadline: float
    ) -> None:
        """Poll until `probe()` is true; fail early if the process exits or time runs out."""
        give_up = time.monotonic() + deadline
        delay = 0.005
        while True:
            if self.exited or self.pid is None:
                raise SandboxStartError(
                    f"{self.name} {self.exit_text()} before its API came up",
                    backend="microvm",
                    stderr_tail=self.log_tail(),
                    hint=f"see {self.log_path}",
                )
            if socket.exists() and await probe():
                return
            if time.monotonic() > give_up:
                raise SandboxStartError(
                    f"{self.name} did not answer on {socket} within {deadline:g}s",
                    backend="microvm",
                    stderr_tail=self.log_tail(),
                    hint=f"see {self.log_path}",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def wait_exit(self, timeout: float) -> bool:
        """True if the process has exited within `timeout` seconds."""
        if self._proc is None:
            return True
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, *, grace: float = 2.0) -> None:
        """SIGTERM, wait up to `grace` (0: skip), then SIGKILL the whole session; reaps it."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            if grace > 0:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            if grace <= 0 or not await self.wait_exit(grace):
                procs.kill_session(proc.pid)
                await proc.wait()
        # Anything the VMM left in its session (it was the session leader) goes too.
        procs.kill_session(proc.pid)


ProcessRecord = dict[str, int]  # what DetachedVmmProcess.record() gives and adopt() takes

# The VMM runs in the background of a shell that leads a new session and exits at
# once: the VMM is then nobody's child here, and its session holds it and anything
# it starts. $1 is the log; the shell prints the VMM's pid.
_DETACH = 'log=$1; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!'


class DetachedVmmProcess(VmmProcess):
    """A VMM that outlives this Python process; `record()` finds it again (`adopt`).

    Its liveness is read from /proc (pid plus start time, so a reused pid is not
    mistaken for it); stopping it kills its whole session.
    """

    def __init__(
        self, argv: Sequence[str], *, log_path: Path, name: str, cwd: Path | None = None
    ) -> None:
        super().__init__(argv, log_path=log_path, name=name, cwd=cwd)
        self._pid: int | None = None
        self._session: int | None = None
        self._started: int | None = None
        self._spawned = False

    @classmethod
    def adopt(cls, record: ProcessRecord, *, log_path: Path, name: str) -> DetachedVmmProcess:
        process = cls([], log_path=log_path, name=name)
        process._pid, process._session = int(record["pid"]), int(record["session"])
        process._started, process._spawned = int(record["started"]), True
        return process

    def record(self) -> ProcessRecord:
        if self._pid is None or self._session is None or self._started is None:
            raise RuntimeError("the VMM was not started")
        return {"pid": self._pid, "session": self._session, "started": self._started}

    @property
    def pid(self) -> int | None:
        if self._pid is None or _start_time(self._pid) != self._started:
            return None
        return self._pid

    @property
    def returncode(self) -> int | None:
        return None  # not our child: its status is not ours to read

    @property
    def exited(self) -> bool:
        return self._spawned and self.pid is None

    def exit_text(self) -> str:
        return "exited"

    async def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["/bin/sh", "-c", _DETACH, "sh", str(self.log_path), *self.argv]
        with self.log_path.open("ab") as log:
            try:
                shell = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                    cwd=self.cwd,
                )
            except OSError as exc:
                raise SandboxStartError(
                    f"could not start {self.argv[0]} through /bin/sh: {exc.strerror}",
                    backend="microvm",
                    hint="check that /bin/sh exists and the run directory is writable",
                ) from exc
            out, _ = await shell.communicate()
        self._spawned = True
        try:
            self._pid = int(out.strip())
        except ValueError:
            raise SandboxStartError(
                f"could not start {self.argv[0]} (the shell said {out[:200]!r})",
                backend="microvm",
                stderr_tail=self.log_tail(),
            ) from None
        self._session = shell.pid
        self._started = _start_time(self._pid)

    async def wait_exit(self, timeout: float) -> bool:
        until = time.monotonic() + timeout
        while self.pid is not None:
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self, *, grace: float = 2.0) -> None:
        pid = self.pid
        if pid is not None and grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            await self.wait_exit(grace)
        if self._session is not None:
            procs.kill_session(self._session)
        pid = self.pid  # read once: it turns None the moment the process is gone
        if pid is not None:
            procs.kill(pid)
        await self.wait_exit(5.0)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])

"""Supervise one VMM process: find the binary, spawn it, wait for its API, always release it.

Both drivers share this: the process runs in its own session (so a jailer's
or VMM's children die with it), writes stdout and stderr to a log file whose
tail goes into error messages, and is stopped terminate -> wait -> kill.
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

__all__ = ["MAX_SOCKET_PATH", "VmmProcess", "resolve_binary", "unix_client"]

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
            if self.returncode is not None or self._proc is None:
                raise SandboxStartError(
                    f"{self.name} exited with status {self.returncode} before its API came up",
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

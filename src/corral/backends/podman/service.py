"""Podman's REST API, served by `podman system service` under Corral's own config.

One service per OCI runtime (Podman 4.3 ignores a container spec's runtime and
uses the service's `--runtime`), started on first use and reused by every
backend in this process and by other processes on the same state dir. It is
Corral's own: it dies with the process that started it (PR_SET_PDEATHSIG), on
`aclose()`, and by itself after `idle_timeout` seconds without a request, so a
crashed or forgotten owner never leaves a daemon behind. A request that finds
it gone starts it again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from corral.backends.podman.engine import Podman
from corral.errors import BackendUnavailableError

API_VERSION = "v4.0.0"
START_DEADLINE = 15.0  # seconds for a new service to answer _ping
DEFAULT_IDLE_TIMEOUT = 30  # seconds; podman's own `--time`
_PR_SET_PDEATHSIG = 1

# The services this process started, by socket path: stopped at exit whoever owns them.
_started: dict[Path, subprocess.Popen[bytes]] = {}


class PodmanService:
    """A client of the API service for one runtime; see the module docstring."""

    def __init__(
        self, podman: Podman, runtime: str, *, idle_timeout: int = DEFAULT_IDLE_TIMEOUT
    ) -> None:
        self.podman = podman
        self.runtime = runtime
        self.idle_timeout = idle_timeout
        self.socket = podman.home / "api" / f"{runtime}.sock"
        self.log = podman.home / "api" / f"{runtime}.log"
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        # A client belongs to one event loop (the bench and CLI run several in turn).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # No keep-alive: an idle connection would keep the service from timing out,
            # and a unix-socket connect costs microseconds.
            transport = httpx.AsyncHTTPTransport(
                uds=str(self.socket), limits=httpx.Limits(max_keepalive_connections=0)
            )
            self._client = httpx.AsyncClient(
                transport=transport, base_url=f"http://podman/{API_VERSION}/libpod", timeout=120
            )
            self._loop = loop
        return self._client

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One API call; starts the service when nobody answers on its socket."""
        attempts = 3  # the last try also covers a service that was just timing out
        for attempt in range(attempts):
            try:
                return await self._http().request(method, path, json=json, params=params)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt == attempts - 1:
                    raise BackendUnavailableError(
                        f"podman's API service ({self.runtime}) stopped answering: {exc}",
                        backend="podman",
                        stderr_tail=_tail(self.log),
                        hint="run `corral doctor`",
                    ) from exc
                if attempt:
                    await asyncio.sleep(0.2)  # let a service that is exiting finish
                await self.start()
        raise AssertionError("unreachable")

    async def alive(self) -> bool:
        try:
            response = await self._http().get("/_ping", timeout=2)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def start(self) -> None:
        """Start the service unless one (ours or another process's) already answers."""
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.socket.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            if await self.alive():
                return
            self._spawn()
            deadline = time.monotonic() + START_DEADLINE
            while not await self.alive():
                proc = _started.get(self.socket)
                if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                    self._stop()
                    raise BackendUnavailableError(
                        f"podman's API service ({self.runtime}) did not start",
                        backend="podman",
                        stderr_tail=_tail(self.log),
                        hint=f"see {self.log}; run `corral doctor`",
                    )
                await asyncio.sleep(0.01)
        finally:
            os.close(lock)

    def _spawn(self) -> None:
        self._stop()  # a dead one of ours: reap it
        self.socket.unlink(missing_ok=True)
        argv = self.podman.command(
            "--runtime",
            self.runtime,
            "system",
            "service",
            f"--time={self.idle_timeout}",
            f"unix://{self.socket}",
        )
        with open(self.log, "ab") as log:
            _started[self.socket] = subprocess.Popen(
                argv,
                env=self.podman.env,
                cwd=self.podman.home,  # conmon inherits it and drops an `oom` file there
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _stop(self) -> None:
        proc = _started.pop(self.socket, None)
        if proc is not None:
            _terminate(proc)

    async def aclose(self) -> None:
        """Close the client and stop the service if this process started it."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None
        if self.socket in _started:
            await asyncio.to_thread(self._stop)


def api_message(response: httpx.Response) -> str:
    """What Podman said about a failed call (its error's message, else the body)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[-1000:]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("cause") or body)[-1000:]
    return str(body)[-1000:]


def service_pids(home: Path) -> list[int]:
    """Pids of API services (anyone's) serving a socket under `home`/api."""
    needle = f"unix://{home / 'api'}/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


def _die_with_parent() -> None:
    # Runs in the child before exec: the service gets SIGTERM when its starter dies.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@atexit.register
def _stop_all() -> None:
    while _started:
        _terminate(_started.popitem()[1])


def _tail(path: Path, limit: int = 1000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""

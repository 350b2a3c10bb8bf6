"""What both drivers share: the VMM process, the httpx client on its socket, error mapping.

A subclass says how to start its VMM (`_argv`), how to tell that the API is up
(`_probe`), how to read the VMM's error body (`_fault_text`) and which faults
are the caller's (`_classify`: a state conflict, a clash); this class turns every failed call
into Corral's errors and keeps the release-on-failure contract of `VmmDriver`.

With `detached=True` the VMM outlives the driver and this Python process (the
microVM backend keeps no process of its own per sandbox): `record()` says how to
find it again, and `attach(record)` gives a fresh driver the running VMM.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, NoReturn

import httpx

from corral.backends.microvm.vmm.base import VmmDriver, VmmState
from corral.backends.microvm.vmm.process import (
    MAX_SOCKET_PATH,
    DetachedVmmProcess,
    ProcessRecord,
    VmmProcess,
    unix_client,
)
from corral.errors import InfrastructureError, InvalidStateError, SandboxStartError, UserError

__all__ = ["SupervisedDriver"]


class SupervisedDriver(VmmDriver):
    """A `VmmDriver` whose VMM is a child process serving HTTP on a unix socket."""

    def __init__(
        self,
        run_dir: Path,
        *,
        binary: Path,
        sandbox_id: str | None = None,
        api_timeout: float = 30.0,
        start_timeout: float = 10.0,
        detached: bool = False,
    ) -> None:
        super().__init__()
        self.detached = detached
        self.run_dir = run_dir
        self.binary = binary
        self.sandbox_id = sandbox_id
        self.api_timeout = api_timeout
        self.start_timeout = start_timeout
        self.log_path = run_dir / f"{self.name}.log"
        self._process: VmmProcess | None = None
        self._client: httpx.AsyncClient | None = None

    # -- what a subclass provides -------------------------------------------------

    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The command line that starts the VMM (or its jailer)."""

    @abc.abstractmethod
    async def _probe(self, client: httpx.AsyncClient) -> bool:
        """True once the API answers a harmless request."""

    @abc.abstractmethod
    def _fault_text(self, response: httpx.Response) -> str:
        """The VMM's own words from an error response."""

    @abc.abstractmethod
    def _classify(self, response: httpx.Response, text: str) -> type[UserError] | None:
        """The user error a refusal means (e.g. InvalidStateError), or None for a VMM failure."""

    def _cwd(self) -> Path | None:
        """The VMM's working directory (None: inherit ours)."""
        return None

    def _release_extra(self) -> None:
        """Remove what the subclass made beside the process (jail, links); must not raise."""

    # -- shared behaviour ---------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        self._require("start", VmmState.NEW)
        socket = self.api_socket
        if len(str(socket)) > MAX_SOCKET_PATH:
            raise SandboxStartError(
                f"API socket path is {len(str(socket))} bytes, over the {MAX_SOCKET_PATH}-byte "
                f"limit of unix sockets: {socket}",
                sandbox_id=self.sandbox_id,
                backend="microvm",
                hint="use a shorter state directory",
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)  # a stale socket would make the VMM refuse to bind
        kind = DetachedVmmProcess if self.detached else VmmProcess
        self._process = kind(self._argv(), log_path=self.log_path, name=self.name, cwd=self._cwd())
        try:
            await self._process.spawn()
            self._client = unix_client(socket, timeout=self.api_timeout)
            client = self._client

            async def probe() -> bool:
                return await self._probe(client)

            await self._process.wait_ready(probe, socket=socket, deadline=self.start_timeout)
        except BaseException as exc:
            await self._release(grace=0)
            if isinstance(exc, SandboxStartError):
                exc.sandbox_id = exc.sandbox_id or self.sandbox_id
            raise
        self._state = VmmState.STARTED

    async def kill(self) -> None:
        await self._release(grace=0)

    def record(self) -> ProcessRecord:
        """How another driver (in any process) finds this detached VMM: see `attach`."""
        if not isinstance(self._process, DetachedVmmProcess):
            raise InvalidStateError(
                f"only a detached {self.name} can be recorded", backend="microvm"
            )
        return self._process.record()

    async def close(self) -> None:
        """Let go of the VMM without stopping it (a detached VMM runs on); idempotent."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def attach(self, record: ProcessRecord, *, ask: bool = True) -> None:
        """Take over the detached VMM that `record()` described. NEW -> its state.

        With `ask`, the VMM is asked its state (InfrastructureError if it does not
        answer); without, the driver can only `kill()` or `shutdown()` it. A VMM
        that is gone leaves the driver STOPPED.
        """
        self._require("attach", VmmState.NEW)
        self._process = DetachedVmmProcess.adopt(record, log_path=self.log_path, name=self.name)
        self.detached = True
        if self._process.pid is None:
            await self._release(grace=0)
            return
        self._client = unix_client(self.api_socket, timeout=self.api_timeout)
        self._state = VmmState.STARTED  # what the VMM's own answer refines
        if ask:
            info = await self.info()
            self._state = info.state

    async def _call(
        self, method: str, path: str, body: Any = None, *, verb: str, starting: bool = False
    ) -> httpx.Response:
        """One API request; on failure maps to Corral's errors (releasing if `starting`)."""
        if self._client is None:
            raise InvalidStateError(
                f"cannot {verb}: the {self.name} process is not running", backend="microvm"
            )
        try:
            response = await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            await self._transport_failed(verb, exc, starting=starting)
        if response.is_success:
            return response
        await self._refused(response, verb=verb, starting=starting)

    async def _refused(self, response: httpx.Response, *, verb: str, starting: bool) -> NoReturn:
        """Raise the Corral error for a VMM's error response (releasing if `starting`)."""
        text = self._fault_text(response)
        request = response.request
        what = (
            f"{self.name} refused to {verb} "
            f"({request.method} {request.url.path}: HTTP {response.status_code})"
        )
        if starting:
            await self._release(grace=0)
            raise SandboxStartError(
                what,
                sandbox_id=self.sandbox_id,
                backend="microvm",
                stderr_tail=text,
                hint=f"the VMM's message names the setting it rejected; its log is {self.log_path}",
            )
        user_error = self._classify(response, text)
        if user_error is not None:
            raise user_error(
                what,
                sandbox_id=self.sandbox_id,
                backend="microvm",
                stderr_tail=text,
                hint="the VM's state or devices do not allow this; check `corral inspect`",
            )
        raise InfrastructureError(
            what,
            sandbox_id=self.sandbox_id,
            backend="microvm",
            stderr_tail=text,
            hint=f"see the VMM's log {self.log_path}",
        )

    async def _transport_failed(
        self, verb: str, exc: httpx.HTTPError, *, starting: bool
    ) -> NoReturn:
        process = self._process
        exited = process is not None and await process.wait_exit(0.2)
        tail = process.log_tail() if process is not None else ""
        if exited and process is not None:
            what = f"{self.name} {process.exit_text()} during {verb}"
        else:
            what = f"{self.name} API did not answer during {verb}: {exc!r}"
        if starting or exited:
            await self._release(grace=0)
        error = SandboxStartError if starting else InfrastructureError
        raise error(
            what,
            sandbox_id=self.sandbox_id,
            backend="microvm",
            stderr_tail=tail or None,
            hint=f"see the VMM's log {self.log_path}",
        ) from exc

    async def _release(self, *, grace: float) -> None:
        """Close the client, stop the process, remove the socket. Idempotent, never raises."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        process = self._process
        if process is not None:
            await process.stop(grace=grace)
        with contextlib.suppress(OSError):
            self.api_socket.unlink(missing_ok=True)
        self._release_extra()
        self._state = VmmState.STOPPED

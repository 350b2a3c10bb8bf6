"""The asyncio SDK: `AsyncCorral` and `AsyncSandbox`, twins of the blocking ones.

async with AsyncCorral(url, api_key) as c, c.sandbox(template="rust") as sb:
    result = await sb.exec(["rustc", "--version"])
    async for event in sb.exec_stream("make"): ...
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Unpack

import httpx

from corral.api import models
from corral.backends.base import ExecEvent, ExecResult, ExitStatus, SandboxStats
from corral.client import _archive, _base, _calls, _ws
from corral.client._base import DEFAULT_TIMEOUT, BaseClient, Call
from corral.client._calls import ClaimOptions, PoolOptions, RunOptions, SandboxOptions
from corral.client._events import NdjsonDecoder, ResultCollector, stream_cut
from corral.errors import CorralError, InvalidStateError, NotFoundError

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = ["AsyncCorral", "AsyncFiles", "AsyncInteractiveExec", "AsyncSandbox"]


class AsyncCorral(BaseClient):
    """A connection to a Corral server (see `Corral`; every call is awaited)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout=timeout, environ=environ)
        self._transport = transport or httpx.AsyncHTTPTransport(
            uds=self._connection.uds, proxy=self._connection.proxy
        )

    async def __aenter__(self) -> AsyncCorral:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (sandboxes are untouched)."""
        if not self._is_closed:
            self._is_closed = True
            await self._transport.aclose()

    async def create(
        self, template: str | os.PathLike[str] = "default", **options: Unpack[SandboxOptions]
    ) -> AsyncSandbox:
        """Create a sandbox from a template name or a local .toml file; returns once it runs."""
        call = _calls.create_call(template, options)
        return AsyncSandbox(self, _base.parse(call, await self._send(call), models.Sandbox))

    def sandbox(
        self,
        template: str | os.PathLike[str] = "default",
        *,
        from_pool: str | None = None,
        **options: Unpack[SandboxOptions],
    ) -> _Creating:
        """`create` for `async with c.sandbox(...) as sb:` (destroyed on the way out);
        with `from_pool`, `claim`."""
        if from_pool is not None:
            return _Creating(self, template, options, _calls.claim_options(options), from_pool)
        return _Creating(self, template, options)

    async def run(
        self,
        argv: str | Sequence[str],
        template: str | os.PathLike[str] = "default",
        *,
        from_pool: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> ExecResult:
        """See `Corral.run`."""
        collector = ResultCollector()
        async for event in self.run_stream(
            argv, template, from_pool=from_pool, env=env, cwd=cwd, stdin=stdin,
            timeout=timeout, **options,
        ):  # fmt: skip
            collector.add(event)
        return collector.result(sandbox_id=None)

    def run_stream(
        self,
        argv: str | Sequence[str],
        template: str | os.PathLike[str] = "default",
        *,
        from_pool: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncGenerator[ExecEvent, None]:
        """See `Corral.run_stream`."""
        call = _calls.run_call(
            argv, template, pool=from_pool, options=options, env=env, cwd=cwd, stdin=stdin,
            timeout=timeout,
        )  # fmt: skip
        return self._events(call)

    async def create_pet(
        self,
        template: str | os.PathLike[str] = "default",
        *,
        volume: str | int | None = None,
        restart: str | None = None,
        **options: Unpack[SandboxOptions],
    ) -> AsyncSandbox:
        """Create a pet (see `Corral.create_pet`)."""
        call = _calls.pet_create_call(template, volume=volume, restart=restart, options=options)
        return AsyncSandbox(self, _base.parse(call, await self._send(call), models.Sandbox))

    async def remove_volume(self, name: str) -> None:
        """Delete the kept volume of a destroyed pet `name`, with its data."""
        await self._send(_calls.volume_delete_call(name))

    async def claim(self, pool: str, **options: Unpack[ClaimOptions]) -> AsyncSandbox:
        """A running sandbox from warm pool `pool`, or created cold when the pool is
        empty (`AsyncSandbox.from_pool` says which); it is yours until destroyed."""
        call = _calls.claim_call(pool, options)
        result = _base.parse(call, await self._send(call), models.ClaimResult)
        sandbox = AsyncSandbox(self, result.sandbox)
        sandbox.from_pool = result.from_pool
        return sandbox

    async def create_pool(
        self,
        name: str,
        template: str | os.PathLike[str] = "default",
        *,
        size: int,
        **options: Unpack[PoolOptions],
    ) -> models.PoolInfo:
        """Keep `size` sandboxes of `template` ready to claim (made in the background)."""
        call = _calls.pool_create_call(name, template, size, options)
        return _base.parse(call, await self._send(call), models.PoolInfo)

    async def pools(self) -> builtins.list[models.PoolInfo]:
        call = _calls.pools_call()
        return _base.parse_list(call, await self._send(call), models.PoolInfo)

    async def pool(self, name: str) -> models.PoolInfo:
        call = _calls.pool_call(name)
        return _base.parse(call, await self._send(call), models.PoolInfo)

    async def resize_pool(self, name: str, size: int) -> models.PoolInfo:
        call = _calls.pool_resize_call(name, size)
        return _base.parse(call, await self._send(call), models.PoolInfo)

    async def delete_pool(self, name: str) -> builtins.list[str]:
        """Delete the pool; the ids of the idle members destroyed with it."""
        call = _calls.pool_delete_call(name)
        return _base.parse(call, await self._send(call), models.PoolRemoved).destroyed

    async def get(self, sandbox_id: str) -> AsyncSandbox:
        """A handle on an existing sandbox, by id or name."""
        call = _calls.get_call(sandbox_id)
        return AsyncSandbox(self, _base.parse(call, await self._send(call), models.Sandbox))

    async def list(
        self,
        *,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        tenant: str | None = None,
    ) -> builtins.list[AsyncSandbox]:
        """This tenant's sandboxes, filtered by state and labels (`tenant`: admin keys only)."""
        call = _calls.list_call(state, labels, tenant)
        infos = _base.parse_list(call, await self._send(call), models.Sandbox)
        return [AsyncSandbox(self, info) for info in infos]

    async def templates(self) -> builtins.list[models.TemplateInfo]:
        call = _calls.templates_call()
        return _base.parse_list(call, await self._send(call), models.TemplateInfo)

    async def health(self) -> models.Health:
        call = _calls.health_call()
        return _base.parse(call, await self._send(call), models.Health)

    async def ready(self) -> models.Health:
        call = _calls.ready_call()
        return _base.parse(call, await self._send(call), models.Health)

    async def tenant(self) -> models.TenantInfo:
        call = _calls.tenant_call()
        return _base.parse(call, await self._send(call), models.TenantInfo)

    async def tenants(self) -> builtins.list[models.TenantInfo]:
        call = _calls.tenants_call()
        return _base.parse_list(call, await self._send(call), models.TenantInfo)

    async def _send(self, call: Call) -> httpx.Response:
        async with self._response(call) as response:
            await response.aread()
        return response

    @contextlib.asynccontextmanager
    async def _response(self, call: Call) -> AsyncIterator[httpx.Response]:
        """The answer to `call`, its body not read yet (see `Corral._response`)."""
        request = self._request(call)
        with self._transport_errors(call):
            response = await self._transport.handle_async_request(request)
            response.request = request
            try:
                if not response.is_success:
                    await response.aread()
                    self._check(call, response)
                yield response
            finally:
                await response.aclose()

    async def _chunks(self, call: Call) -> AsyncGenerator[bytes, None]:
        """A streamed response body, chunk by chunk (a pet's log)."""
        async with self._response(call) as response:
            async for chunk in response.aiter_bytes():
                yield chunk

    async def _events(self, call: Call) -> AsyncGenerator[ExecEvent, None]:
        decoder = NdjsonDecoder(call.sandbox_id)
        async with self._response(call) as response:
            chunks = response.aiter_bytes()
            async for chunk in chunks:
                for event in decoder.feed(chunk):
                    yield event
                if decoder.exit_status is not None:
                    # Read to the end, so the connection serves the next request
                    # (see Corral._events).
                    await _base.adrain(chunks)
                    return
            for event in decoder.finish():
                yield event


class _Creating:
    """What `AsyncCorral.sandbox()` returns: awaitable, or an async context manager."""

    def __init__(
        self,
        client: AsyncCorral,
        template: str | os.PathLike[str],
        options: SandboxOptions,
        claim: ClaimOptions | None = None,
        pool: str | None = None,
    ) -> None:
        self._client = client
        self._template = template
        self._options = options
        self._claim = claim
        self._pool = pool
        self._sandbox: AsyncSandbox | None = None

    async def _make(self) -> AsyncSandbox:
        if self._pool is not None:
            return await self._client.claim(self._pool, **(self._claim or {}))
        return await self._client.create(self._template, **self._options)

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._make()
        return self._sandbox

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(kind, exc, tb)


class AsyncSandbox:
    """One sandbox on the server. As an async context manager it is always destroyed on exit."""

    def __init__(self, client: AsyncCorral, info: models.Sandbox) -> None:
        self._client = client
        self.info = info
        self.files = AsyncFiles(self)
        self.from_pool: bool | None = None  # set by a claim: False if created cold

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.info.template} {self.info.state}>"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.kill()
        except CorralError as error:
            if exc is None:
                raise
            exc.add_note(f"and destroying sandbox {self.id} failed too: {error}")

    async def refresh(self) -> models.Sandbox:
        return await self._apply(_calls.get_call(self.id))

    async def exec(
        self,
        argv: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to completion (a string runs under /bin/sh -c)."""
        collector = ResultCollector()
        events = self.exec_stream(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)
        async with contextlib.aclosing(events):
            async for event in events:
                collector.add(event)
        return collector.result(sandbox_id=self.id)

    def exec_stream(
        self,
        argv: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[ExecEvent, None]:
        """Output chunks as the command produces them, then its ExitStatus.

        An async generator: to stop early and close the request at once, wrap
        it in `contextlib.aclosing` (otherwise it closes when collected).
        """
        call = _calls.exec_call(self.id, argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)
        return self._client._events(call)

    def exec_interactive(
        self,
        argv: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> AsyncInteractiveExec:
        """A command over a WebSocket: `async with` (or await) it, then send and read."""
        return AsyncInteractiveExec(self._client, self.id, _ws.start_frame(argv, env, cwd, timeout))

    async def set_timeout(self, seconds: float) -> models.Sandbox:
        return await self._apply(_calls.timeout_call(self.id, seconds))

    async def update(
        self,
        *,
        labels: Mapping[str, str | None] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> models.Sandbox:
        return await self._apply(_calls.patch_call(self.id, labels, metadata))

    async def set_labels(self, labels: Mapping[str, str | None]) -> models.Sandbox:
        return await self.update(labels=labels)

    async def stats(self) -> SandboxStats:
        call = _calls.stats_call(self.id)
        return _base.parse_stats(call, await self._client._send(call))

    async def inspect(self) -> models.Inspection:
        """The record, what the backend reports now, and usage while it runs."""
        call = _calls.inspect_call(self.id)
        inspection = _base.parse(call, await self._client._send(call), models.Inspection)
        self.info = inspection.sandbox
        return inspection

    async def pause(self) -> models.Sandbox:
        return await self._apply(_calls.pause_call(self.id))

    async def resume(self) -> models.Sandbox:
        return await self._apply(_calls.resume_call(self.id))

    async def promote(
        self, name: str, *, volume: str | int | None = None, restart: str | None = None
    ) -> models.Sandbox:
        """Make this running sandbox a pet named `name` (see `Sandbox.promote`)."""
        return await self._apply(_calls.promote_call(self.id, name, volume, restart))

    async def restart(self) -> models.Sandbox:
        """Supervise this failed pet again (see `Sandbox.restart`)."""
        return await self._apply(_calls.restart_call(self.id))

    def logs(self, *, follow: bool = False, tail: int | None = None) -> AsyncIterator[bytes]:
        """A pet's log; with `follow`, what comes next too (see `Sandbox.logs`)."""
        return self._client._chunks(_calls.logs_call(self.id, follow=follow, tail=tail))

    async def kill(self) -> bool:
        """Destroy the sandbox; False when it was already gone."""
        try:
            await self._client._send(_calls.destroy_call(self.id))
        except NotFoundError:
            return False
        return True

    async def _apply(self, call: Call) -> models.Sandbox:
        self.info = _base.parse(call, await self._client._send(call), models.Sandbox)
        return self.info


class AsyncFiles:
    """A sandbox's filesystem, as seen by the sandbox user."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        call = _calls.write_file_call(self._sandbox.id, path, data, mode)
        await self._sandbox._client._send(call)

    async def read(self, path: str) -> bytes:
        call = _calls.read_file_call(self._sandbox.id, path)
        return (await self._sandbox._client._send(call)).content

    async def upload_dir(self, local_dir: str | os.PathLike[str], remote_dir: str) -> None:
        call = _calls.put_archive_call(self._sandbox.id, remote_dir, _archive.pack_dir(local_dir))
        await self._sandbox._client._send(call)

    async def download_dir(
        self, remote_dir: str, local_dir: str | os.PathLike[str]
    ) -> builtins.list[str]:
        """Copy `remote_dir`'s contents into `local_dir`; the names refused as unsafe."""
        call = _calls.get_archive_call(self._sandbox.id, remote_dir)
        tar = (await self._sandbox._client._send(call)).content
        return _archive.unpack_into(tar, local_dir, sandbox_id=self._sandbox.id)


class AsyncInteractiveExec:
    """A running command with a live stdin (see `InteractiveExec`); connects when entered
    with `async with` or awaited."""

    def __init__(self, client: AsyncCorral, sandbox_id: str, start: str) -> None:
        _ws.require_websockets()
        self.sandbox_id = sandbox_id
        self.exit_status: ExitStatus | None = None
        self._client = client
        self._start = start
        self._stdin_open = True
        self._stack = contextlib.AsyncExitStack()
        self._ws: ClientConnection | None = None

    def __await__(self) -> Generator[Any, None, AsyncInteractiveExec]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncInteractiveExec:
        return await self._open()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _open(self) -> AsyncInteractiveExec:
        from websockets.asyncio.client import connect, unix_connect
        from websockets.exceptions import ConnectionClosed, WebSocketException

        if self._ws is not None:
            return self
        connection = self._client._connection
        options = _ws.connect_options(connection, self.sandbox_id)
        try:
            opener = unix_connect if "path" in options else connect
            self._ws = await self._stack.enter_async_context(opener(**options))
        except (OSError, WebSocketException) as exc:
            await self._stack.aclose()
            raise _ws.open_error(exc, connection, self.sandbox_id) from exc
        # A refused session's problem frame is raised when the events are read.
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(self._start)
        return self

    async def send(self, data: bytes | str) -> None:
        """Feed `data` to the command's stdin (a str as UTF-8)."""
        if not self._stdin_open:
            raise _ws.stdin_closed(self.sandbox_id)
        chunk = data.encode() if isinstance(data, str) else bytes(data)
        if chunk:
            await self._send(chunk)

    async def close_stdin(self) -> None:
        """Send end-of-file to the command's stdin (harmless when already closed or ended)."""
        from websockets.exceptions import ConnectionClosed

        if self._stdin_open:
            self._stdin_open = False
            with contextlib.suppress(ConnectionClosed):
                await self._connected().send(_ws.EOF_FRAME)

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        """The command's events as they come; the last is its ExitStatus."""
        from websockets.exceptions import ConnectionClosed

        ws = self._connected()
        while self.exit_status is None:
            try:
                message = await ws.recv()
            except ConnectionClosed as exc:
                raise stream_cut(self.sandbox_id) from exc
            event = _ws.decode_frame(
                message, sandbox_id=self.sandbox_id, connection=self._client._connection
            )
            if isinstance(event, ExitStatus):
                self.exit_status = event
            yield event

    async def wait(self) -> ExecResult:
        """Read to the end; the result holds the output not yet iterated over."""
        collector = ResultCollector()
        async for event in self:
            collector.add(event)
        collector.exit_status = self.exit_status
        return collector.result(sandbox_id=self.sandbox_id)

    async def aclose(self) -> None:
        self._stdin_open = False
        await self._stack.aclose()

    def _connected(self) -> ClientConnection:
        if self._ws is None:
            raise InvalidStateError(
                "the interactive exec is not started",
                sandbox_id=self.sandbox_id,
                hint="use `async with sb.exec_interactive(...) as proc:` or await it",
            )
        return self._ws

    async def _send(self, message: bytes | str) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._connected().send(message)
        except ConnectionClosed:
            self._stdin_open = False
            raise _ws.stdin_closed(self.sandbox_id) from None

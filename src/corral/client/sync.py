"""The blocking SDK: `Corral` talks to a Corral server; `Sandbox` drives one sandbox.

with Corral(url, api_key) as c, c.sandbox(template="rust") as sb:
    sb.files.write("/work/main.rs", source)
    result = sb.exec(["rustc", "main.rs"])
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Unpack

import httpx

from corral.api import models
from corral.backends.base import ExecEvent, ExecResult, ExitStatus, SandboxStats
from corral.client import _archive, _base, _calls, _ws
from corral.client._base import DEFAULT_TIMEOUT, BaseClient, Call
from corral.client._calls import ClaimOptions, PoolOptions, RunOptions, SandboxOptions
from corral.client._events import NdjsonDecoder, ResultCollector, stream_cut
from corral.errors import CorralError, NotFoundError

__all__ = ["Corral", "Files", "InteractiveExec", "Sandbox"]


class Corral(BaseClient):
    """A connection to a Corral server.

    `url` and `api_key` default to CORRAL_URL and CORRAL_API_KEY (read from
    `environ`, by default `os.environ`). `timeout` bounds each network wait in
    seconds; creating a sandbox and running commands get longer reads.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout=timeout, environ=environ)
        self._transport = transport or httpx.HTTPTransport(
            uds=self._connection.uds, proxy=self._connection.proxy
        )

    def __enter__(self) -> Corral:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (sandboxes are untouched)."""
        if not self._is_closed:
            self._is_closed = True
            self._transport.close()

    def create(
        self, template: str | os.PathLike[str] = "default", **options: Unpack[SandboxOptions]
    ) -> Sandbox:
        """Create a sandbox from a template name or a local .toml file; returns once it runs.

        Use the result as a context manager to destroy it on the way out.
        """
        call = _calls.create_call(template, options)
        return Sandbox(self, _base.parse(call, self._send(call), models.Sandbox))

    def sandbox(
        self,
        template: str | os.PathLike[str] = "default",
        *,
        from_pool: str | None = None,
        **options: Unpack[SandboxOptions],
    ) -> Sandbox:
        """`create`, named for `with c.sandbox(...) as sb:`; with `from_pool`, `claim`."""
        if from_pool is not None:
            return self.claim(from_pool, **_calls.claim_options(options))
        return self.create(template, **options)

    def run(
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
        """Run a command in a fresh sandbox (or one claimed from warm pool `from_pool`)
        and destroy the sandbox, in one request; returns once it is gone. `env`,
        `cwd`, `stdin` and `timeout` are the command's; `options` the sandbox's (see
        `create`)."""
        collector = ResultCollector()
        for event in self.run_stream(
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
    ) -> Generator[ExecEvent, None, None]:
        """`run`, yielding output events as the command writes them, then its exit."""
        call = _calls.run_call(
            argv, template, pool=from_pool, options=options, env=env, cwd=cwd, stdin=stdin,
            timeout=timeout,
        )  # fmt: skip
        return self._events(call)

    def create_pet(
        self,
        template: str | os.PathLike[str] = "default",
        *,
        volume: str | int | None = None,
        restart: str | None = None,
        **options: Unpack[SandboxOptions],
    ) -> Sandbox:
        """Create a pet: a persistent sandbox named `name` (required) with a volume (`volume`
        bytes, or the template's [volume]), a restart policy ("always" or
        "on-failure") and CPUs of its own; the template's [service] runs in it."""
        call = _calls.pet_create_call(template, volume=volume, restart=restart, options=options)
        return Sandbox(self, _base.parse(call, self._send(call), models.Sandbox))

    def remove_volume(self, name: str) -> None:
        """Delete the kept volume of a destroyed pet `name`, with its data."""
        self._send(_calls.volume_delete_call(name))

    def claim(self, pool: str, **options: Unpack[ClaimOptions]) -> Sandbox:
        """A running sandbox from warm pool `pool`, or created cold when the pool is
        empty (`Sandbox.from_pool` says which); it is yours until destroyed."""
        call = _calls.claim_call(pool, options)
        result = _base.parse(call, self._send(call), models.ClaimResult)
        sandbox = Sandbox(self, result.sandbox)
        sandbox.from_pool = result.from_pool
        return sandbox

    def create_pool(
        self,
        name: str,
        template: str | os.PathLike[str] = "default",
        *,
        size: int,
        **options: Unpack[PoolOptions],
    ) -> models.PoolInfo:
        """Keep `size` sandboxes of `template` ready to claim (made in the background)."""
        call = _calls.pool_create_call(name, template, size, options)
        return _base.parse(call, self._send(call), models.PoolInfo)

    def pools(self) -> builtins.list[models.PoolInfo]:
        call = _calls.pools_call()
        return _base.parse_list(call, self._send(call), models.PoolInfo)

    def pool(self, name: str) -> models.PoolInfo:
        call = _calls.pool_call(name)
        return _base.parse(call, self._send(call), models.PoolInfo)

    def resize_pool(self, name: str, size: int) -> models.PoolInfo:
        call = _calls.pool_resize_call(name, size)
        return _base.parse(call, self._send(call), models.PoolInfo)

    def delete_pool(self, name: str) -> builtins.list[str]:
        """Delete the pool; the ids of the idle members destroyed with it."""
        call = _calls.pool_delete_call(name)
        return _base.parse(call, self._send(call), models.PoolRemoved).destroyed

    def get(self, sandbox_id: str) -> Sandbox:
        """A handle on an existing sandbox, by id or name."""
        call = _calls.get_call(sandbox_id)
        return Sandbox(self, _base.parse(call, self._send(call), models.Sandbox))

    def list(
        self,
        *,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        tenant: str | None = None,
    ) -> builtins.list[Sandbox]:
        """This tenant's sandboxes, filtered by state and labels (`tenant`: admin keys only)."""
        call = _calls.list_call(state, labels, tenant)
        infos = _base.parse_list(call, self._send(call), models.Sandbox)
        return [Sandbox(self, info) for info in infos]

    def templates(self) -> builtins.list[models.TemplateInfo]:
        call = _calls.templates_call()
        return _base.parse_list(call, self._send(call), models.TemplateInfo)

    def health(self) -> models.Health:
        """Whether the server process is up (no API key needed)."""
        call = _calls.health_call()
        return _base.parse(call, self._send(call), models.Health)

    def ready(self) -> models.Health:
        """Whether the server can serve sandboxes; raises the problem it reports if not."""
        call = _calls.ready_call()
        return _base.parse(call, self._send(call), models.Health)

    def tenant(self) -> models.TenantInfo:
        """The key's tenant: its quota and current usage."""
        call = _calls.tenant_call()
        return _base.parse(call, self._send(call), models.TenantInfo)

    def tenants(self) -> builtins.list[models.TenantInfo]:
        """Every tenant (admin keys only)."""
        call = _calls.tenants_call()
        return _base.parse_list(call, self._send(call), models.TenantInfo)

    def _send(self, call: Call) -> httpx.Response:
        with self._response(call) as response:
            response.read()
        return response

    @contextlib.contextmanager
    def _response(self, call: Call) -> Iterator[httpx.Response]:
        """The answer to `call`, its body not read yet; closed on the way out. An error
        answer is read and raised as its Corral exception."""
        request = self._request(call)
        with self._transport_errors(call):
            response = self._transport.handle_request(request)
            response.request = request
            try:
                if not response.is_success:
                    response.read()
                    self._check(call, response)
                yield response
            finally:
                response.close()

    def _chunks(self, call: Call) -> Iterator[bytes]:
        """A streamed response body, chunk by chunk (a pet's log)."""
        with self._response(call) as response:
            yield from response.iter_bytes()

    def _events(self, call: Call) -> Generator[ExecEvent, None, None]:
        decoder = NdjsonDecoder(call.sandbox_id)
        with self._response(call) as response:
            chunks = response.iter_bytes()
            for chunk in chunks:
                yield from decoder.feed(chunk)
                if decoder.exit_status is not None:
                    # Read the body to its end (the server ends it right after the
                    # exit event): an unfinished response closes its connection, and
                    # the next request would pay for a new one. Anything more than a
                    # little is not read: the connection is dropped as before.
                    _base.drain(chunks)
                    return
            yield from decoder.finish()


class Sandbox:
    """One sandbox on the server. As a context manager it is always destroyed on exit."""

    def __init__(self, client: Corral, info: models.Sandbox) -> None:
        self._client = client
        self.info = info
        self.files = Files(self)
        self.from_pool: bool | None = None  # set by a claim: False if created cold

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.info.template} {self.info.state}>"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        except CorralError as error:
            if exc is None:
                raise
            # Keep the body's exception; say that the sandbox may still be there.
            exc.add_note(f"and destroying sandbox {self.id} failed too: {error}")

    def refresh(self) -> models.Sandbox:
        """Fetch the sandbox's current record into `info`."""
        return self._apply(_calls.get_call(self.id))

    def exec(
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
        for event in self.exec_stream(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout):
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
    ) -> Iterator[ExecEvent]:
        """Output chunks as the command produces them, then its ExitStatus.

        Stopping early (or closing the iterator) closes the request.
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
    ) -> InteractiveExec:
        """Start a command over a WebSocket; feed its stdin while reading its output."""
        return InteractiveExec(self._client, self.id, _ws.start_frame(argv, env, cwd, timeout))

    def set_timeout(self, seconds: float) -> models.Sandbox:
        """Have the sandbox reaped `seconds` from now."""
        return self._apply(_calls.timeout_call(self.id, seconds))

    def update(
        self,
        *,
        labels: Mapping[str, str | None] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> models.Sandbox:
        """Merge labels and metadata in; a None value removes that key."""
        return self._apply(_calls.patch_call(self.id, labels, metadata))

    def set_labels(self, labels: Mapping[str, str | None]) -> models.Sandbox:
        return self.update(labels=labels)

    def stats(self) -> SandboxStats:
        call = _calls.stats_call(self.id)
        return _base.parse_stats(call, self._client._send(call))

    def inspect(self) -> models.Inspection:
        """The record, what the backend reports now, and usage while it runs."""
        call = _calls.inspect_call(self.id)
        inspection = _base.parse(call, self._client._send(call), models.Inspection)
        self.info = inspection.sandbox
        return inspection

    def pause(self) -> models.Sandbox:
        return self._apply(_calls.pause_call(self.id))

    def resume(self) -> models.Sandbox:
        return self._apply(_calls.resume_call(self.id))

    def promote(
        self, name: str, *, volume: str | int | None = None, restart: str | None = None
    ) -> models.Sandbox:
        """Make this running sandbox a pet named `name` (see docs/pets.md): without
        `volume` its processes keep running; with one it restarts with its files."""
        return self._apply(_calls.promote_call(self.id, name, volume, restart))

    def restart(self) -> models.Sandbox:
        """Supervise this failed pet again (after fixing what made it crash-loop)."""
        return self._apply(_calls.restart_call(self.id))

    def logs(self, *, follow: bool = False, tail: int | None = None) -> Iterator[bytes]:
        """A pet's log (the last `tail` bytes, or all); with `follow`, what comes
        next too, until the pet is destroyed or the iterator is closed."""
        return self._client._chunks(_calls.logs_call(self.id, follow=follow, tail=tail))

    def kill(self) -> bool:
        """Destroy the sandbox; False when it was already gone."""
        try:
            self._client._send(_calls.destroy_call(self.id))
        except NotFoundError:
            return False
        return True

    def _apply(self, call: Call) -> models.Sandbox:
        self.info = _base.parse(call, self._client._send(call), models.Sandbox)
        return self.info


class Files:
    """A sandbox's filesystem, as seen by the sandbox user."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Create or replace the file at `path` (a str is written as UTF-8)."""
        self._sandbox._client._send(_calls.write_file_call(self._sandbox.id, path, data, mode))

    def read(self, path: str) -> bytes:
        return self._sandbox._client._send(_calls.read_file_call(self._sandbox.id, path)).content

    def upload_dir(self, local_dir: str | os.PathLike[str], remote_dir: str) -> None:
        """Copy the contents of `local_dir` into `remote_dir` (merged with what is there)."""
        call = _calls.put_archive_call(self._sandbox.id, remote_dir, _archive.pack_dir(local_dir))
        self._sandbox._client._send(call)

    def download_dir(
        self, remote_dir: str, local_dir: str | os.PathLike[str]
    ) -> builtins.list[str]:
        """Copy the contents of `remote_dir` into `local_dir`.

        Returns the names of members refused as unsafe (absolute or `..` paths,
        links out of `local_dir`, devices); everything else is written.
        """
        call = _calls.get_archive_call(self._sandbox.id, remote_dir)
        tar = self._sandbox._client._send(call).content
        return _archive.unpack_into(tar, local_dir, sandbox_id=self._sandbox.id)


class InteractiveExec:
    """A running command with a live stdin: `send()`, `close_stdin()`, iterate the events.

    Closing the session (or leaving its `with` block) before the exit event
    ends the command.
    """

    def __init__(self, client: Corral, sandbox_id: str, start: str) -> None:
        _ws.require_websockets()
        from websockets.exceptions import ConnectionClosed, WebSocketException
        from websockets.sync.client import connect, unix_connect

        self.sandbox_id = sandbox_id
        self.exit_status: ExitStatus | None = None
        self._stdin_open = True
        self._closed_error = ConnectionClosed
        self._stack = contextlib.ExitStack()
        self._connection = client._connection
        options = _ws.connect_options(self._connection, sandbox_id)
        try:
            opener = unix_connect if "path" in options else connect
            self._ws = self._stack.enter_context(opener(**options))
        except (OSError, WebSocketException) as exc:
            self._stack.close()
            raise _ws.open_error(exc, client._connection, sandbox_id) from exc
        # A server that refuses the session (bad key) sends its problem and closes at
        # once; that problem is raised when the events are read.
        with contextlib.suppress(ConnectionClosed):
            self._ws.send(start)

    def __enter__(self) -> InteractiveExec:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        """Feed `data` to the command's stdin (a str as UTF-8)."""
        if not self._stdin_open:
            raise _ws.stdin_closed(self.sandbox_id)
        chunk = data.encode() if isinstance(data, str) else bytes(data)
        if chunk:
            self._send(chunk)

    def close_stdin(self) -> None:
        """Send end-of-file to the command's stdin (harmless when already closed or ended)."""
        if self._stdin_open:
            self._stdin_open = False
            with contextlib.suppress(self._closed_error):
                self._ws.send(_ws.EOF_FRAME)

    def __iter__(self) -> Iterator[ExecEvent]:
        """The command's events as they come; the last is its ExitStatus."""
        while self.exit_status is None:
            try:
                message = self._ws.recv()
            except self._closed_error as exc:
                raise stream_cut(self.sandbox_id) from exc
            event = _ws.decode_frame(
                message, sandbox_id=self.sandbox_id, connection=self._connection
            )
            if isinstance(event, ExitStatus):
                self.exit_status = event
            yield event

    def wait(self) -> ExecResult:
        """Read to the end; the result holds the output not yet iterated over."""
        collector = ResultCollector()
        for event in self:
            collector.add(event)
        collector.exit_status = self.exit_status
        return collector.result(sandbox_id=self.sandbox_id)

    def close(self) -> None:
        self._stdin_open = False
        self._stack.close()

    def _send(self, message: bytes | str) -> None:
        try:
            self._ws.send(message)
        except self._closed_error:
            self._stdin_open = False
            raise _ws.stdin_closed(self.sandbox_id) from None

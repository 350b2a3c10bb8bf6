"""Exec: output streamed as NDJSON while the command runs, or over a WebSocket with stdin."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from corral.api.models import (
    CLAIM_FIELDS,
    NDJSON_MEDIA_TYPE,
    SANDBOX_ID_HEADER,
    ExecBody,
    ExecEventBody,
    RunBody,
)
from corral.api.problems import to_problem
from corral.backends.base import ExecEvent, Output
from corral.errors import CorralError, UserError
from corral.runtime.manager import SandboxManager
from corral.server.app import runtime_of
from corral.server.auth import Caller, CallerDep, authenticate
from corral.server.routes.sandboxes import create_record

log = logging.getLogger(__name__)
router = APIRouter(tags=["exec"])


def event_body(event: ExecEvent) -> ExecEventBody:
    if isinstance(event, Output):
        return ExecEventBody(type=event.stream, data=base64.b64encode(event.data).decode())
    return ExecEventBody(
        type="exit",
        exit_code=event.exit_code,
        timed_out=event.timed_out,
        oom_killed=event.oom_killed,
        duration=event.duration,
        reason=event.reason,
    )


def _stdin(body: ExecBody) -> bytes | None:
    try:
        return body.stdin_bytes()
    except (binascii.Error, ValueError):
        raise UserError("stdin is not valid base64", hint="base64-encode stdin bytes") from None


def _start(
    request_or_ws: Request | WebSocket,
    sandbox_id: str,
    body: ExecBody,
    caller: Caller,
    stdin: bytes | AsyncIterator[bytes] | None,
) -> AsyncIterator[ExecEvent]:
    """Check the sandbox and start the command; errors here become a problem response."""
    runtime = runtime_of(request_or_ws.app)
    timeout, cap = body.timeout, runtime.settings.server.max_exec_seconds
    if cap is not None:
        timeout = cap if timeout is None else min(timeout, cap)
    return runtime.manager.exec_stream(
        sandbox_id,
        body.argv,
        env=body.env,
        cwd=body.cwd,
        stdin=stdin,
        timeout=timeout,
        tenant=caller.scope,
    )


@router.post(
    "/sandboxes/{sandbox_id}/exec",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON_MEDIA_TYPE: {}}, "description": "NDJSON events"}},
)
async def exec_command(
    request: Request, sandbox_id: str, body: ExecBody, caller: CallerDep
) -> StreamingResponse:
    """Run a command; each line of the response is an event (stdout/stderr chunks as the
    command writes them, base64), the last one always `exit`. If the client goes away,
    the command is killed."""
    events = _start(request, sandbox_id, body, caller, _stdin(body))
    return _EventStream(_lines(request, events), media_type=NDJSON_MEDIA_TYPE)


@router.post(
    "/run",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON_MEDIA_TYPE: {}}, "description": "NDJSON events"}},
)
async def run_command(request: Request, body: RunBody, caller: CallerDep) -> StreamingResponse:
    """Create a sandbox (or claim one from `pool`), run the command in it, and destroy it
    when the command ends: one request for a short task. The events are those of
    exec; the body ends once the sandbox is gone, and the sandbox is destroyed too
    when the client leaves early. The sandbox's id is in the Corral-Sandbox-Id header."""
    stdin = _stdin(body)
    runtime = runtime_of(request.app)
    if body.pool is not None:
        refused = sorted(body.sandbox.model_fields_set - CLAIM_FIELDS)
        if refused:
            raise UserError(
                f"sandbox.{refused[0]} cannot be set with a pool: the pool fixes it",
                hint=f"with pool, set only sandbox.{', sandbox.'.join(sorted(CLAIM_FIELDS))}",
            )
        claimed = await runtime.pools.claim(
            body.pool,
            tenant=caller.tenant,
            timeout=body.sandbox.timeout,
            labels=body.sandbox.labels,
            metadata=body.sandbox.metadata,
            name=body.sandbox.name,
        )
        record = claimed.record
    else:
        record = await create_record(request, body.sandbox, caller)
    destroy = _destroyer(runtime.manager, record.id)
    try:
        events = _start(request, record.id, body, caller, stdin)
    except BaseException:
        await destroy()
        raise
    return _EventStream(
        _lines(request, events, finally_=destroy),
        media_type=NDJSON_MEDIA_TYPE,
        headers={SANDBOX_ID_HEADER: record.id},
    )


def _destroyer(manager: SandboxManager, sandbox_id: str) -> Callable[[], Awaitable[None]]:
    async def destroy() -> None:
        # Shielded: a cancelled response (the client gone, the server stopping) still
        # releases the sandbox; a failure is logged, and the reaper retries.
        try:
            await asyncio.shield(manager.destroy(sandbox_id))
        except CorralError as error:
            log.warning("run: destroying %s failed: %s", sandbox_id, error)

    return destroy


async def _lines(
    request: Request,
    events: AsyncIterator[ExecEvent],
    finally_: Callable[[], Awaitable[None]] | None = None,
) -> AsyncGenerator[bytes]:
    """`events` as NDJSON lines, the exit event last; the command is killed when the
    client goes away. `finally_` runs once the command is over, before the body ends."""
    # The client leaving must stop the command even while it prints nothing (the
    # ASGI server reports the disconnect only to whoever reads `receive`).
    gone = asyncio.create_task(_disconnected(request))
    try:
        async for event in _until(events, gone):
            yield event_body(event).model_dump_json(exclude_defaults=True).encode() + b"\n"
            if not isinstance(event, Output):
                break  # the exit event is the last: end the body with it, now
    except CorralError as error:
        # Past the status line: report the failure as the stream's last event.
        _, problem = to_problem(error)
        yield json.dumps({"type": "exit", "exit_code": -1, "problem": problem}).encode()
    finally:
        gone.cancel()
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
        if finally_ is not None:
            await finally_()


class _EventStream(StreamingResponse):
    """A StreamingResponse that leaves watching for the client's departure to the
    stream itself (`lines` does): Starlette's own watcher (an anyio task group per
    response, under uvicorn's ASGI 2.3) cost ~0.5 ms an exec and did it twice."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream_response(send)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until(
    events: AsyncIterator[ExecEvent], stop: asyncio.Task[None]
) -> AsyncIterator[ExecEvent]:
    """`events` until they end or `stop` finishes (then the pending read is cancelled,
    which runs the backend's clean-up: the command is killed)."""
    iterator = aiter(events)
    step: asyncio.Future[ExecEvent] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        # However this ends (client gone, cancelled), the pending read is cancelled
        # and awaited, so the generator below can be closed (its command killed).
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step


@router.websocket("/sandboxes/{sandbox_id}/exec/ws")
async def exec_websocket(websocket: WebSocket, sandbox_id: str) -> None:
    """First frame from the client: the ExecBody as JSON. Then binary frames are stdin,
    and the text frame {"type": "eof"} closes stdin. The server sends each event as a
    JSON text frame, the exit event last, then closes. A problem is sent as one JSON
    frame (with a `type` URN) before closing."""
    await websocket.accept()
    try:
        caller = authenticate(websocket, websocket.headers.get("authorization"))  # type: ignore[arg-type]
        try:
            body = ExecBody.model_validate_json(await websocket.receive_text())
        except ValidationError as exc:
            raise UserError(
                f"the first frame is not an exec request: {exc.errors()[0]['msg']}"
            ) from None
        stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

        async def stdin_chunks() -> AsyncIterator[bytes]:
            while (chunk := await stdin_queue.get()) is not None:
                yield chunk

        events = _start(websocket, sandbox_id, body, caller, stdin_chunks())
        reader = asyncio.create_task(_read_stdin(websocket, stdin_queue))
        try:
            async for event in events:
                await websocket.send_text(event_body(event).model_dump_json(exclude_defaults=True))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await reader
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
    except WebSocketDisconnect:
        return
    except CorralError as error:
        _, problem = to_problem(error)
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps(problem))
    with contextlib.suppress(Exception):
        await websocket.close()


async def _read_stdin(websocket: WebSocket, queue: asyncio.Queue[bytes | None]) -> None:
    """Client frames into the command's stdin until `eof` (or the client leaves)."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await queue.put(message["bytes"])
            elif message.get("text") is not None:
                with contextlib.suppress(ValueError):
                    if json.loads(message["text"]).get("type") == "eof":
                        break
    finally:
        await queue.put(None)

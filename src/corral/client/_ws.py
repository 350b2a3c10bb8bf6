"""The interactive exec's WebSocket protocol, shared by both twins (no I/O).

The client sends one text frame with the command (ExecBody without stdin),
then binary frames of stdin, then `{"type": "eof"}`; the server answers with
ExecEventBody text frames, the exit event last, or one problem frame, and closes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from corral.backends.base import ExecEvent
from corral.client._base import Call, Connection, error_for, with_key_hint
from corral.client._calls import exec_body, exec_ws_path
from corral.client._events import decode_event
from corral.errors import (
    BackendUnavailableError,
    CorralError,
    InvalidStateError,
    ServerUnavailableError,
)

# Handshake and close waits; the command itself may run as long as its timeout allows.
OPEN_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
# The text frame that closes the command's stdin.
EOF_FRAME = json.dumps({"type": "eof"})


def require_websockets() -> None:
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(
            "exec_interactive needs the 'websockets' package",
            hint="pip install websockets (or corral[server])",
        ) from None


def connect_options(connection: Connection, sandbox_id: str) -> dict[str, Any]:
    """Keyword arguments for websockets' `connect` / `unix_connect`."""
    headers = connection.headers()
    options: dict[str, Any] = {
        "uri": connection.ws_url(exec_ws_path(sandbox_id)),
        "additional_headers": {k: v for k, v in headers.items() if k != "User-Agent"},
        "user_agent_header": headers["User-Agent"],
        "open_timeout": OPEN_TIMEOUT,
        "close_timeout": CLOSE_TIMEOUT,
    }
    if connection.uds:
        options["path"] = connection.uds
    return options


def start_frame(
    argv: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> str:
    return json.dumps(exec_body(argv, env, cwd, None, timeout))


def decode_frame(message: str | bytes, *, sandbox_id: str, connection: Connection) -> ExecEvent:
    if isinstance(message, bytes):
        raise ServerUnavailableError(
            "the server sent a binary frame on an exec WebSocket",
            sandbox_id=sandbox_id,
            hint="the server may run a different Corral version",
        )
    try:
        return decode_event(message, sandbox_id=sandbox_id)
    except CorralError as error:
        raise with_key_hint(error, connection) from None


def open_error(exc: Exception, connection: Connection, sandbox_id: str) -> CorralError:
    """What a failed WebSocket handshake means, in Corral's terms."""
    from websockets.exceptions import InvalidStatus

    call = Call("GET", exec_ws_path(sandbox_id), sandbox_id=sandbox_id)
    if isinstance(exc, InvalidStatus):
        # The server refused the upgrade with an HTTP answer: read it like any other.
        answer = exc.response
        response = httpx.Response(
            answer.status_code, headers=list(answer.headers.raw_items()), content=bytes(answer.body)
        )
        return error_for(call, response, connection)
    return ServerUnavailableError(
        f"cannot open an exec WebSocket to {connection.display}{call.path}: "
        f"{exc or type(exc).__name__}",
        sandbox_id=sandbox_id,
        hint="check that `corral serve` runs there and that proxies pass WebSockets",
    )


def stdin_closed(sandbox_id: str) -> InvalidStateError:
    return InvalidStateError(
        "the command's stdin is closed (close_stdin() was called, the command exited, "
        "or the server ended the session)",
        sandbox_id=sandbox_id,
        hint="read the remaining events to see how the command ended",
    )

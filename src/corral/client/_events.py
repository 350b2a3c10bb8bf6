"""Exec events on the wire (NDJSON lines, WebSocket frames) turned into Output / ExitStatus.

Output bytes travel base64-encoded, one event per line or frame; the `exit`
event is always last. A stream that ends without it was cut, not finished.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import ValidationError

from corral.api import models
from corral.api.problems import from_problem
from corral.backends.base import ExecEvent, ExecResult, ExitStatus, Output
from corral.errors import CorralError, ServerUnavailableError, UserError

PROBLEM_PREFIX = "urn:corral:problem:"
_VERSION_HINT = "the server may run a different Corral version; upgrade the client or the server"


def argv_list(argv: str | Sequence[str]) -> list[str]:
    """A string is a shell command line; a sequence is the argv itself."""
    if isinstance(argv, str):
        return ["/bin/sh", "-c", argv]
    args = list(argv)
    if not args or not all(isinstance(arg, str) for arg in args):
        raise UserError(
            "argv must be a non-empty list of strings",
            hint='pass e.g. ["ls", "-l"], or a string to run it with /bin/sh -c',
        )
    return args


def stdin_base64(stdin: bytes | str | None) -> str | None:
    if stdin is None:
        return None
    data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
    return base64.b64encode(data).decode("ascii")


def is_problem(body: Any) -> bool:
    return isinstance(body, dict) and str(body.get("type", "")).startswith(PROBLEM_PREFIX)


def problem_error(body: dict[str, Any], *, sandbox_id: str | None) -> CorralError:
    status = body.get("status")
    error = from_problem(status if isinstance(status, int) else 500, body)
    if error.sandbox_id is None:
        error.sandbox_id = sandbox_id
    return error


def decode_event(text: str | bytes, *, sandbox_id: str | None) -> ExecEvent:
    """One NDJSON line or WebSocket text frame as an event; a problem in its place is raised."""
    try:
        body = json.loads(text)
    except ValueError:
        raise _outside_api(f"an exec event is not JSON: {text[:200]!r}", sandbox_id) from None
    if is_problem(body):
        raise problem_error(body, sandbox_id=sandbox_id)
    if isinstance(body, dict) and is_problem(body.get("problem")):
        # A failure after the stream started ends it with an exit event carrying the problem.
        raise problem_error(body["problem"], sandbox_id=sandbox_id)
    try:
        event = models.ExecEventBody.model_validate(body)
    except ValidationError as exc:
        raise _outside_api(f"an exec event is malformed: {exc}", sandbox_id) from None
    if event.type == "exit":
        return ExitStatus(
            exit_code=-1 if event.exit_code is None else event.exit_code,
            timed_out=event.timed_out,
            oom_killed=event.oom_killed,
            duration=event.duration or 0.0,
            reason=event.reason,
        )
    try:
        data = base64.b64decode(event.data or "", validate=True)
    except binascii.Error:
        raise _outside_api("an output event's data is not base64", sandbox_id) from None
    return Output(stream=event.type, data=data)


def stream_cut(sandbox_id: str | None) -> ServerUnavailableError:
    return ServerUnavailableError(
        "the exec stream ended before the command's exit status arrived",
        sandbox_id=sandbox_id,
        hint="the server restarted or a proxy cut the connection; "
        "the command may not have finished - check the sandbox and run it again",
    )


def _outside_api(message: str, sandbox_id: str | None) -> ServerUnavailableError:
    return ServerUnavailableError(message, sandbox_id=sandbox_id, hint=_VERSION_HINT)


class NdjsonDecoder:
    """Splits a byte stream into NDJSON lines (across any chunk boundary) and decodes them."""

    # The server sends output in small chunks; a line this long is not an event.
    max_line = 16 << 20

    def __init__(self, sandbox_id: str | None) -> None:
        self.sandbox_id = sandbox_id
        self.exit_status: ExitStatus | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> Iterator[ExecEvent]:
        """The events completed by `chunk`, one by one (so output before a bad line is
        delivered); nothing after the exit event counts."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        if len(self._pending) > self.max_line:
            raise _outside_api(f"an exec event line is over {self.max_line} bytes", self.sandbox_id)
        return self._decode(lines)

    def finish(self) -> Iterator[ExecEvent]:
        """The events of an unterminated last line; raises when no exit event came."""
        lines, self._pending = [self._pending], b""
        yield from self._decode(lines)
        if self.exit_status is None:
            raise stream_cut(self.sandbox_id)

    def _decode(self, lines: list[bytes]) -> Iterator[ExecEvent]:
        for line in lines:
            if self.exit_status is not None or not line.strip():
                continue
            event = decode_event(line, sandbox_id=self.sandbox_id)
            if isinstance(event, ExitStatus):
                self.exit_status = event
            yield event


class ResultCollector:
    """Gathers a command's events into one ExecResult."""

    def __init__(self) -> None:
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self.exit_status: ExitStatus | None = None

    def add(self, event: ExecEvent) -> None:
        if isinstance(event, Output):
            (self._stdout if event.stream == "stdout" else self._stderr).append(event.data)
        else:
            self.exit_status = event

    def result(self, *, sandbox_id: str | None) -> ExecResult:
        status = self.exit_status
        if status is None:
            raise stream_cut(sandbox_id)
        return ExecResult(
            exit_code=status.exit_code,
            stdout=b"".join(self._stdout),
            stderr=b"".join(self._stderr),
            timed_out=status.timed_out,
            oom_killed=status.oom_killed,
            duration=status.duration,
            reason=status.reason,
        )

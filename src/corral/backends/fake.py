"""An in-memory backend for unit tests of the layers above (runtime, server, CLI).

It runs nothing: commands are answered by a handler (a few shell-like builtins
by default), files live in a dict. Like httpx's MockTransport, it lets the
control plane be tested without a runtime; real backends are tested for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecEvent,
    ExecRequest,
    ExitStatus,
    Output,
    SandboxConfig,
    SandboxStats,
)
from corral.errors import FileTooLargeError, InvalidStateError, NotFoundError, SandboxStartError

__all__ = ["FakeBackend", "FakeSandbox"]

Handler = Callable[["FakeSandbox", ExecRequest], Awaitable[tuple[int, bytes, bytes]]]


@dataclass
class FakeSandbox:
    config: SandboxConfig
    status: BackendStatus = BackendStatus.RUNNING
    files: dict[str, bytes] = field(default_factory=dict)
    execs: list[list[str]] = field(default_factory=list)


async def builtin_handler(sandbox: FakeSandbox, request: ExecRequest) -> tuple[int, bytes, bytes]:
    """echo, true, false, cat (stdin), sleep N, exit N; anything else is 'not found'."""
    name, *args = [*request.argv]
    name = name.rsplit("/", 1)[-1]
    if name == "echo":
        return 0, (" ".join(args) + "\n").encode(), b""
    if name == "true":
        return 0, b"", b""
    if name == "false":
        return 1, b"", b""
    if name == "cat":
        if request.stdin is None or isinstance(request.stdin, bytes):
            return 0, request.stdin or b"", b""
        return 0, b"".join([chunk async for chunk in request.stdin]), b""
    if name in ("sleep", "exit"):
        try:
            number = float(args[0]) if name == "sleep" else int(args[0]) % 256
        except (IndexError, ValueError):
            return 2, b"", f"{name}: needs a number\n".encode()
        if name == "exit":
            return int(number), b"", b""
        if not 0 <= number < 1e6:
            return 1, b"", b"sleep: invalid time interval\n"
        await asyncio.sleep(number)
        return 0, b"", b""
    return 127, b"", f"{name}: command not found\n".encode()


class FakeBackend(Backend):
    """In-memory sandboxes; `fail_create` makes the next creates fail (for cleanup tests)."""

    name: ClassVar[str] = "fake"
    capabilities = frozenset({Capability.PAUSE})
    runtimes: ClassVar[tuple[str, ...]] = ("crun", "runc", "runsc")

    def __init__(self, handler: Handler = builtin_handler) -> None:
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.handler = handler
        self.fail_create = False
        self.destroyed: list[str] = []

    def _get(self, sandbox_id: str) -> FakeSandbox:
        try:
            return self.sandboxes[sandbox_id]
        except KeyError:
            raise NotFoundError(f"no sandbox '{sandbox_id}'", backend=self.name) from None

    async def create(self, config: SandboxConfig) -> None:
        if self.fail_create:
            raise SandboxStartError("fake create failure", sandbox_id=config.sandbox_id)
        if config.sandbox_id in self.sandboxes:
            raise SandboxStartError("already exists", sandbox_id=config.sandbox_id)
        self.sandboxes[config.sandbox_id] = FakeSandbox(config)

    async def exec_stream(self, sandbox_id: str, request: ExecRequest) -> AsyncIterator[ExecEvent]:
        sandbox = self._get(sandbox_id)
        if sandbox.status != BackendStatus.RUNNING:
            raise InvalidStateError(f"sandbox is {sandbox.status}", sandbox_id=sandbox_id)
        sandbox.execs.append(list(request.argv))
        started = time.monotonic()
        try:
            code, out, err = await asyncio.wait_for(self.handler(sandbox, request), request.timeout)
        except TimeoutError:
            yield ExitStatus(
                124,
                timed_out=True,
                duration=time.monotonic() - started,
                reason=f"timed out after {request.timeout:g}s; killed",
            )
            return
        if out:
            yield Output("stdout", out)
        if err:
            yield Output("stderr", err)
        reason = f"command not found: {request.argv[0]}" if code == 127 else None
        yield ExitStatus(code, duration=time.monotonic() - started, reason=reason)

    async def put_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        self._get(sandbox_id).files[path] = data

    async def get_file(self, sandbox_id: str, path: str, max_bytes: int) -> bytes:
        files = self._get(sandbox_id).files
        if path not in files:
            raise NotFoundError(f"cannot access '{path}' in the sandbox", sandbox_id=sandbox_id)
        if len(files[path]) > max_bytes:
            raise FileTooLargeError(f"'{path}' is larger than {max_bytes} bytes")
        return files[path]

    async def stats(self, sandbox_id: str) -> SandboxStats:
        limits = self._get(sandbox_id).config.limits
        return SandboxStats(0, limits.memory, 0.0, 1, limits.pids)

    async def status(self, sandbox_id: str) -> BackendStatus:
        sandbox = self.sandboxes.get(sandbox_id)
        return BackendStatus.MISSING if sandbox is None else sandbox.status

    async def list_sandboxes(self) -> list[str]:
        return sorted(self.sandboxes)

    async def destroy(self, sandbox_id: str) -> None:
        if self.sandboxes.pop(sandbox_id, None) is not None:
            self.destroyed.append(sandbox_id)

    async def pause(self, sandbox_id: str) -> None:
        self._get(sandbox_id).status = BackendStatus.PAUSED

    async def resume(self, sandbox_id: str) -> None:
        self._get(sandbox_id).status = BackendStatus.RUNNING

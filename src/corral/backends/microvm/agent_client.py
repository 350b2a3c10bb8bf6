"""The host side of the guest agent's framed protocol (docs/microvm.md).

Every frame is a 4-byte big-endian length (type byte + payload), a type byte and
the payload. A QEMU VM has several virtio-serial ports; a request takes a free
one (an flock on `port-N.lock`, so other processes driving the same VM take
others), connects to its unix socket and opens with HELLO (magic + nonce): the
guest drops whatever a previous client left half-sent, and the host skips
stale bytes until the echo of its own nonce. Closing the connection mid-request
kills that request's processes in the guest. Firecracker and Cloud Hypervisor
VMs are reached over vsock instead, a connection per request (vsock.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import secrets
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

from corral.backends.base import ExecEvent, ExitStatus, Output
from corral.errors import ExecError

__all__ = ["AgentConnection", "AgentError", "connect", "encode_exec", "hello"]

HELLO_MAGIC = b"CORRAL\x01\x00"
MAX_FRAME = 1 << 20
CHUNK = 256 << 10


class AgentError(Exception):
    """The agent answered a request with an errno (internal; the backend maps it)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message or os.strerror(code))
        self.code = code


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + kind + payload


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">I", len(data)) + data


def encode_exec(
    argv: Sequence[str],
    env: dict[str, str],
    cwd: str,
    uid: int,
    gid: int,
    timeout: float | None,
    has_stdin: bool,
) -> bytes:
    timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
    parts = [struct.pack(">IIII", timeout_ms, uid, gid, int(has_stdin)), _string(cwd)]
    parts.append(struct.pack(">I", len(argv)))
    parts += [_string(arg) for arg in argv]
    parts.append(struct.pack(">I", len(env)))
    parts += [_string(f"{key}={value}") for key, value in env.items()]
    return b"".join(parts)


class AgentConnection:
    """One port of one VM, held (locked and connected) for one request."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lock_fd: int | None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._lock_fd = lock_fd

    async def send(self, kind: bytes, payload: bytes = b"") -> None:
        self.writer.write(frame(kind, payload))
        await self.writer.drain()

    async def receive(self) -> tuple[bytes, bytes]:
        header = await self.reader.readexactly(5)
        (length,) = struct.unpack(">I", header[:4])
        if length < 1 or length > MAX_FRAME + 64:
            raise ExecError(f"the guest agent sent a malformed frame (length {length})")
        payload = await self.reader.readexactly(length - 1)
        return header[4:5], payload

    async def expect_result(self) -> bytes:
        """The payload of an `R` frame after its errno; AgentError when it is not 0."""
        kind, payload = await self.receive()
        if kind != b"R" or len(payload) < 4:
            raise ExecError(f"the guest agent answered {kind!r} where a result was due")
        (code,) = struct.unpack(">I", payload[:4])
        message = payload[4:].decode(errors="replace")
        if code:
            raise AgentError(code, message)
        return payload[4:]

    async def request(self, kind: bytes, payload: bytes = b"") -> tuple[bytes, bytes]:
        await self.send(kind, payload)
        return await self.receive()

    # -- the requests (docs/microvm.md) -----------------------------------------

    async def exec_events(
        self, payload: bytes, stdin: bytes | AsyncIterable[bytes] | None, guard: float | None
    ) -> AsyncGenerator[ExecEvent, None]:
        """Run the encoded exec request; yield its output, then its ExitStatus.

        AgentError when the agent could not start it; TimeoutError when nothing
        ended it by the monotonic time `guard` (the agent enforces the timeout
        itself: this only catches a hung guest).
        """
        started = time.monotonic()
        await self.send(b"E", payload)
        await self.expect_result()
        feeder = asyncio.create_task(self._feed(stdin)) if stdin is not None else None
        try:
            while True:
                left = None if guard is None else max(0.1, guard - time.monotonic())
                kind, data = await asyncio.wait_for(self.receive(), left)
                if kind == b"O":
                    yield Output("stdout", data)
                elif kind == b"E":
                    yield Output("stderr", data)
                elif kind == b"X":
                    code, flags = struct.unpack(">iI", data[:8])
                    yield ExitStatus(
                        exit_code=code,
                        timed_out=bool(flags & 1),
                        oom_killed=bool(flags & 2),
                        duration=time.monotonic() - started,
                        reason=data[8:].decode(errors="replace") or None,
                    )
                    return
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feeder

    async def _feed(self, stdin: bytes | AsyncIterable[bytes]) -> None:
        if isinstance(stdin, bytes):
            stdin = chunks_of(stdin)
        async for chunk in stdin:
            for start in range(0, len(chunk), CHUNK):
                await self.send(b"I", chunk[start : start + CHUNK])
        await self.send(b"i")

    async def put_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        """Write a file as uid:gid; AgentError with the guest's errno on failure."""
        await self.send(b"P", struct.pack(">III", mode, uid, gid) + _string(path))
        async for chunk in chunks_of(data):
            await self.send(b"I", chunk)
        await self.send(b"i")
        await self.expect_result()

    async def get_file(self, path: str, max_bytes: int, uid: int, gid: int) -> bytes:
        """Read a file as uid:gid; AgentError (EFBIG when over `max_bytes`) on failure."""
        await self.send(b"G", struct.pack(">QII", max_bytes, uid, gid) + _string(path))
        await self.expect_result()
        parts: list[bytes] = []
        while True:
            kind, data = await self.receive()
            if kind == b"d":
                return b"".join(parts)
            parts.append(data)

    async def stats(self) -> dict[str, int]:
        """What the agent measures inside the guest (see docs/microvm.md)."""
        kind, payload = await self.request(b"S")
        values: dict[str, int] = {}
        for line in payload.decode(errors="replace").splitlines() if kind == b"S" else []:
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
        return values

    async def set_clock(self) -> None:
        """Set the guest's wall clock to the host's and reseed its RNG (32 fresh bytes):
        every VM restored from one snapshot starts with the same RNG state."""
        now = time.time_ns()
        clock = struct.pack(">QI", now // 1_000_000_000, now % 1_000_000_000)
        await self.send(b"T", clock + secrets.token_bytes(32))
        await self.expect_result()

    async def mount(self, serial: str, fstype: str, target: str, *, read_only: bool) -> None:
        """Mount the disk `serial` filled after boot at `target` (made if missing);
        AgentError with the guest's errno on failure."""
        payload = struct.pack(">I", int(read_only)) + b"".join(
            _string(value) for value in (serial, fstype, target)
        )
        await self.send(b"M", payload)
        await self.expect_result()

    async def flush(self) -> None:
        """Have the guest write its dirty pages out (`sync`): a pet's volume keeps
        what was written before its VM is killed."""
        await self.send(b"F")
        await self.expect_result()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()
        if self._lock_fd is not None:
            os.close(self._lock_fd)


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float) -> bool:
    """Send HELLO, and skip whatever arrives until its echo; False if none came in time."""
    nonce = secrets.token_bytes(8)
    writer.write(frame(b"H", HELLO_MAGIC + nonce))
    await writer.drain()
    echo = frame(b"H", nonce)
    seen = b""
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    while echo not in seen:
        left = until - loop.time()
        if left <= 0:
            return False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return False
        if not chunk:
            raise ConnectionError("the VM closed the port")
        seen = (seen + chunk)[-(65536 + len(echo)) :]
    rest = seen[seen.index(echo) + len(echo) :]
    if rest:  # bytes after the echo belong to no request yet: nothing was sent
        raise ConnectionError("the guest agent sent data after HELLO")
    return True


async def connect(run_dir: Path, ports: int, *, deadline: float = 30.0) -> AgentConnection:
    """A free port of the VM in `run_dir`, connected and greeted; ExecError by `deadline`."""
    until = time.monotonic() + deadline
    last_error = "no port became free"
    attempt = 0
    while time.monotonic() < until:
        for index in _port_order(ports, attempt):
            lock_fd = os.open(run_dir / f"port-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(lock_fd)
                continue
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(run_dir / f"port-{index}.sock"), limit=4 * MAX_FRAME
                )
            except OSError as exc:
                os.close(lock_fd)
                last_error = f"cannot connect to port {index}: {exc}"
                if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    break  # the VM is not (yet) there: wait
                continue
            try:
                for _ in range(8):
                    if await hello(reader, writer, min(2.0, max(0.1, until - time.monotonic()))):
                        return AgentConnection(reader, writer, lock_fd)
                    if time.monotonic() >= until:
                        break
                last_error = f"the guest agent did not answer on port {index}"
            except (ConnectionError, OSError) as exc:
                last_error = f"port {index}: {exc}"
            writer.close()
            os.close(lock_fd)
        attempt += 1
        await asyncio.sleep(0.02)
    raise ExecError(f"the guest agent is unreachable: {last_error}", backend="microvm")


def _port_order(ports: int, attempt: int) -> list[int]:
    start = (os.getpid() + attempt) % ports
    return [(start + offset) % ports for offset in range(ports)]


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]

"""The host side of hybrid vsock (corral.backends.microvm.vsock) against small fake VMMs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from corral.backends.microvm.agent_client import frame
from corral.backends.microvm.vsock import HybridVsockError, connect_vsock, open_vsock
from corral.errors import ExecError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(handler, path=str(path))


async def test_connect_then_ok_hands_over_the_stream(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        writer.write(b"OK 1073741824\nguest bytes")
        await writer.drain()
        writer.close()

    async with await serve(tmp_path / "v.sock", vmm):
        reader, writer = await open_vsock(tmp_path / "v.sock", 1024, timeout=2)
        assert await reader.read() == b"guest bytes"  # nothing of the handshake is left
        writer.close()
    assert seen == [b"CONNECT 1024\n"]


@pytest.mark.parametrize(
    ("answer", "message"),
    [(b"", "nothing listens on guest port 1024"), (b"NOPE\n", "answered CONNECT 1024")],
)
async def test_a_refused_connect_says_why(tmp_path: Path, answer: bytes, message: str) -> None:
    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with await serve(tmp_path / "v.sock", vmm):
        with pytest.raises(HybridVsockError, match=message):
            await open_vsock(tmp_path / "v.sock", 1024, timeout=2)


async def test_the_agent_is_retried_until_it_listens(tmp_path: Path) -> None:
    """As after a boot or a restore: refused (closed) first, then the agent answers HELLO."""
    attempts = 0

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.readline()
        if attempts < 3:
            writer.close()  # no guest listener yet
            return
        writer.write(b"OK 1073741825\n")
        header = await reader.readexactly(5)
        hello = await reader.readexactly(int.from_bytes(header[:4], "big") - 1)
        writer.write(frame(b"H", hello[8:]))  # echo the nonce, as the agent does
        await writer.drain()
        await reader.read()
        writer.close()

    async with await serve(tmp_path / "v.sock", vmm):
        conn = await connect_vsock(tmp_path / "v.sock", deadline=10)
        await conn.close()
    assert attempts == 3


async def test_no_socket_is_an_exec_error_by_the_deadline(tmp_path: Path) -> None:
    with pytest.raises(ExecError, match="unreachable over vsock"):
        await connect_vsock(tmp_path / "missing.sock", deadline=0.3)

"""The guest agent over vsock, through the unix socket Firecracker and Cloud Hypervisor
give a VM's vsock device ("hybrid vsock").

To reach guest port P the host connects to the device's socket, sends
`CONNECT P\n` and reads `OK <host port>\n` once the guest has accepted; from
then on the stream is the guest's. When nothing listens on P in the guest (still
booting, or just restored) the VMM closes the connection instead, so callers
retry until their deadline. Every request gets a connection of its own, so a
restored VM is reached again by simply connecting to its (new) socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from corral.backends.microvm.agent_client import MAX_FRAME, AgentConnection, hello
from corral.errors import ExecError

__all__ = ["AGENT_VSOCK_PORT", "GUEST_CID", "HybridVsockError", "connect_vsock", "open_vsock"]

AGENT_VSOCK_PORT = 1024  # the guest agent's port (kernel cmdline corral.vsock=1024)
GUEST_CID = 3  # the first CID a guest may have (0-2 are reserved)
_HANDSHAKE_LIMIT = 64  # "OK 4294967295\n" with room to spare


class HybridVsockError(ConnectionError):
    """The VMM did not hand over the guest port (refused, closed, or spoke otherwise)."""


async def open_vsock(
    uds: Path, port: int, *, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to guest `port` through the hybrid vsock socket `uds`.

    Raises OSError when the socket cannot be reached, HybridVsockError when the
    VMM does not answer OK within `timeout` seconds.
    """
    reader, writer = await asyncio.open_unix_connection(str(uds), limit=4 * MAX_FRAME)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
        except TimeoutError:
            raise HybridVsockError(f"no answer to CONNECT {port} within {timeout:g}s") from None
        except asyncio.IncompleteReadError:
            raise HybridVsockError(
                f"the VMM closed the connection: nothing listens on guest port {port}"
            ) from None
        except asyncio.LimitOverrunError:
            raise HybridVsockError("the VMM's answer to CONNECT is not a line") from None
        words = line.split()
        if (
            len(line) > _HANDSHAKE_LIMIT
            or len(words) != 2
            or words[0] != b"OK"
            or not words[1].isdigit()
        ):
            raise HybridVsockError(
                f"the VMM answered CONNECT {port} with {line[:_HANDSHAKE_LIMIT]!r}"
            )
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
        raise
    return reader, writer


async def connect_vsock(
    uds: Path, port: int = AGENT_VSOCK_PORT, *, deadline: float = 30.0
) -> AgentConnection:
    """The guest agent on `port`, connected and greeted; ExecError by `deadline` seconds."""
    until = time.monotonic() + deadline
    last_error = "no attempt was made"
    while True:
        left = until - time.monotonic()
        if left <= 0:
            raise ExecError(
                f"the guest agent is unreachable over vsock ({uds}, port {port}): {last_error}",
                backend="microvm",
            )
        try:
            reader, writer = await open_vsock(uds, port, timeout=min(2.0, left))
        except (OSError, HybridVsockError) as exc:
            last_error = str(exc) or type(exc).__name__
            await asyncio.sleep(min(0.02, max(0.0, until - time.monotonic())))
            continue
        try:
            if await hello(reader, writer, min(2.0, max(0.1, until - time.monotonic()))):
                return AgentConnection(reader, writer, None)
            last_error = "the guest agent did not answer HELLO"
        except (ConnectionError, OSError) as exc:
            last_error = f"the connection broke during HELLO: {exc}"
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()

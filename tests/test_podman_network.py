"""The podman backend's networks: `none` by default, `egress` through slirp4netns.

No traffic leaves the box: the only peer is a listener on the host's loopback,
which an egress sandbox reaches at slirp4netns's 10.0.2.2 when the backend
allows it (`egress_host_loopback`, off by default). runsc runs an egress
sandbox with gVisor's host network inside the namespace Podman made for it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import Capability, ExecRequest
from corral.backends.podman import PodmanBackend
from corral.backends.podman.spec import SLIRP_HOST
from corral.errors import UnsupportedError
from tests.conftest import RUNTIMES, Harness, require_binary, require_root

pytestmark = pytest.mark.runtime

# Connects to the listener and prints what it says, or the error's name.
CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        print(s.recv(100).decode().strip())
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


@pytest.fixture(params=RUNTIMES)
async def net(
    request: pytest.FixtureRequest, state_root: Path, default_image: Any
) -> AsyncIterator[Harness]:
    require_root()
    for binary in ("podman", "slirp4netns", "catatonit", str(request.param)):
        require_binary(binary)
    backend = PodmanBackend(state_root, runtime=request.param, egress_host_loopback=True)
    h = Harness(backend, default_image.to_ref(), tuple(default_image.host_mounts), request.param)
    h.state_dir = state_root
    yield h
    for sandbox_id in h.created:
        await backend.destroy(sandbox_id)
    await backend.aclose()


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, str]]:
    """A TCP server on the host's 127.0.0.1 that greets each client with a token."""
    token = secrets.token_hex(8)

    async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{token}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, token


async def connect(backend: PodmanBackend, sandbox_id: str, host: str, port: int) -> str:
    argv = ["python3", "-c", CONNECT, host, str(port)]
    result = await backend.exec(sandbox_id, ExecRequest(argv, timeout=20))
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


def test_egress_is_advertised_on_every_runtime(state_root: Path) -> None:
    require_binary("slirp4netns")
    for runtime in RUNTIMES:
        assert Capability.NETWORK_EGRESS in PodmanBackend(state_root, runtime=runtime).capabilities


async def test_egress_reaches_the_host_loopback_listener(
    net: Harness, listener: tuple[int, str]
) -> None:
    assert isinstance(net.backend, PodmanBackend)
    port, token = listener
    sid = await net.sandbox(network="egress")
    assert await connect(net.backend, sid, SLIRP_HOST, port) == token
    # The sandbox's own loopback is its own: nothing listens there.
    assert (await connect(net.backend, sid, "127.0.0.1", port)).startswith("ConnectionRefusedError")


async def test_no_network_by_default(net: Harness, listener: tuple[int, str]) -> None:
    assert isinstance(net.backend, PodmanBackend)
    port, _token = listener
    sid = await net.sandbox()
    answer = await connect(net.backend, sid, SLIRP_HOST, port)
    # No interface but lo: ENETUNREACH (101) from Linux, EHOSTUNREACH (113) from gVisor.
    assert answer in ("OSError 101", "OSError 113"), answer
    interfaces = await net.backend.exec(sid, ExecRequest(["cat", "/proc/net/dev"]))
    names = {line.split(":")[0].strip() for line in interfaces.stdout.decode().splitlines()[2:]}
    assert names <= {"lo"}, names


async def test_host_loopback_is_closed_unless_allowed(
    state_root: Path, default_image: Any, listener: tuple[int, str]
) -> None:
    require_root()
    require_binary("slirp4netns")
    backend = PodmanBackend(state_root, runtime="crun")  # egress_host_loopback off
    h = Harness(backend, default_image.to_ref(), tuple(default_image.host_mounts), "crun")
    port, token = listener
    try:
        sid = await h.sandbox(network="egress")
        answer = await connect(backend, sid, SLIRP_HOST, port)
        assert answer != token
        assert answer.startswith(("ConnectionRefusedError", "TimeoutError", "OSError")), answer
    finally:
        for sandbox_id in h.created:
            await backend.destroy(sandbox_id)
        await backend.aclose()


@pytest.mark.parametrize("net", ["runsc"], indirect=True)  # crun/runc: test_podman.py
async def test_gvisor_egress_sandbox_refuses_snapshots(net: Harness, tmp_path: Path) -> None:
    assert isinstance(net.backend, PodmanBackend)
    sid = await net.sandbox(network="egress")
    with pytest.raises(UnsupportedError, match="egress sandbox"):
        await net.backend.snapshot(sid, tmp_path / "snap")
    assert not (tmp_path / "snap").exists()
    assert (await net.backend.exec(sid, ExecRequest(["true"]))).ok

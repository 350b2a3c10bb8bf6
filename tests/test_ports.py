"""Published ports: a TCP service inside a sandbox reached from the host's loopback.

`none` sandboxes (oci and podman on crun/runc) publish through Corral's forwarder,
which joins the sandbox's network namespace; podman `egress` sandboxes (also
under runsc) through Podman's own port forwarding. Every listener is on
127.0.0.1 unless the operator allows another address; all traffic stays on the
host's loopback and inside the sandboxes' own namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import Capability, ExecRequest, ExitStatus, Output, PortMapping
from corral.backends.oci import OciBackend
from corral.backends.podman import PodmanBackend
from corral.backends.ports import check_addresses, parse_port, split_port
from corral.client import Corral
from corral.config import Settings
from corral.errors import ConflictError, UnsupportedError, UserError
from corral.runtime.manager import SandboxManager
from tests.conftest import TEST_LABEL, ApiServer, Harness, require_binary, require_root

# An upper-casing echo server inside the sandbox: says "ready", serves N clients.
ECHO = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data.upper())
"""

PAYLOAD = b"corral-" * 150_000  # ~1 MiB: more than any socket buffer holds


# -- parsing and policy (no sandbox) ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", (None, 0, 8080)),
        ("18080:8080", (None, 18080, 8080)),
        ("127.0.0.1:0:80", ("127.0.0.1", 0, 80)),
        ("[::1]:9000:80", ("::1", 9000, 80)),
    ],
)
def test_port_specs_parse(text: str, expected: tuple[str | None, int, int]) -> None:
    assert split_port(text) == expected


@pytest.mark.parametrize("text", ["", "http", "1:2:3:4", "[::1]80", "a:b", "127.0.0.1:x:80"])
def test_bad_port_specs_say_how_to_write_one(text: str) -> None:
    with pytest.raises(UserError, match="not a port to publish") as caught:
        split_port(text)
    assert "HOST:CONTAINER" in str(caught.value)


@pytest.mark.parametrize("text", ["0", "70000", "1:65536", "localhost:1:80"])
def test_out_of_range_ports_and_names_are_refused(text: str) -> None:
    with pytest.raises(UserError):
        parse_port(text)


def test_default_address_is_loopback() -> None:
    assert parse_port("8080") == PortMapping(8080, 0, "127.0.0.1")
    assert Settings.load(environ={}).publish_addresses == ("127.0.0.1",)


def test_addresses_the_operator_did_not_allow_are_refused() -> None:
    check_addresses([PortMapping(80, 0, "127.0.0.1")], ["127.0.0.1"])
    with pytest.raises(UserError, match=r"may not be published on 0\.0\.0\.0") as caught:
        check_addresses([PortMapping(80, 0, "0.0.0.0")], ["127.0.0.1"])
    assert "publish_addresses" in str(caught.value)
    with pytest.raises(UserError, match="published twice"):
        check_addresses([PortMapping(80, 9000), PortMapping(81, 9000)], ["127.0.0.1"])


async def test_manager_refuses_before_creating_anything(state_root: Path) -> None:
    manager = SandboxManager.from_settings(Settings.load(environ={}, state_dir=state_root))
    with pytest.raises(UserError, match=r"0\.0\.0\.0"):
        await manager.create("default", ports=["0.0.0.0:0:80"], labels=TEST_LABEL)
    with pytest.raises(UserError, match="not a port"):
        await manager.create("default", ports=["eighty"], labels=TEST_LABEL)
    assert manager.list(labels=TEST_LABEL) == []


# -- real backends ------------------------------------------------------------------

CASES = [
    ("oci", "crun", "none"),
    ("oci", "runc", "none"),
    ("podman", "crun", "none"),
    ("podman", "runc", "none"),
    ("podman", "crun", "egress"),
    ("podman", "runsc", "egress"),
]


def _backend(kind: str, state_root: Path, runtime: str) -> Any:
    require_root()
    require_binary(runtime)
    if kind == "podman":
        for binary in ("podman", "slirp4netns", "catatonit"):
            require_binary(binary)
        return PodmanBackend(state_root, runtime=runtime)
    return OciBackend(state_root, runtime=runtime)


@pytest.fixture
async def make(state_root: Path, default_image: Any) -> AsyncIterator[Any]:
    """make(kind, runtime) -> a Harness; everything it created is destroyed after."""
    made: list[Harness] = []

    def factory(kind: str, runtime: str) -> Harness:
        backend = _backend(kind, state_root, runtime)
        h = Harness(backend, default_image.to_ref(), tuple(default_image.host_mounts), runtime)
        made.append(h)
        return h

    yield factory
    for h in made:
        for sandbox_id in h.created:
            await h.backend.destroy(sandbox_id)
        with contextlib.suppress(Exception):
            await h.backend.aclose()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the host's TCP listeners on `port` (this network namespace)."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    if width == 8:
                        found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:
                        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                        found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


async def _echo(host_port: int, payload: bytes, deadline: float = 20.0) -> bytes:
    """Send `payload` through the published port, half-close, read the answer;
    retried until the service inside listens."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
            try:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 20)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if answer:
                return answer
        except (ConnectionError, OSError):
            pass
        if loop.time() > end:
            raise AssertionError(f"nothing answered on 127.0.0.1:{host_port}")
        await asyncio.sleep(0.1)


@pytest.mark.runtime
@pytest.mark.parametrize(("kind", "runtime", "network"), CASES, ids=["/".join(c) for c in CASES])
async def test_published_port_reaches_the_service_inside(
    make: Any, kind: str, runtime: str, network: str
) -> None:
    h = make(kind, runtime)
    assert Capability.PUBLISH_PORTS in h.backend.capabilities
    sid = await h.sandbox(network=network, ports=[PortMapping(8000)])
    (published,) = await h.backend.published_ports(sid)
    assert (published.container_port, published.host_ip) == (8000, "127.0.0.1")
    assert published.host_port > 0
    # Loopback only: nothing listens on another address of the host for it.
    assert _listening_addresses(published.host_port) == {"127.0.0.1"}
    server = asyncio.create_task(
        h.backend.exec(sid, ExecRequest(["python3", "-c", ECHO, "8000", "2"], timeout=60))
    )
    try:
        assert await _echo(published.host_port, PAYLOAD) == PAYLOAD.upper()
        assert await _echo(published.host_port, b"second client") == b"SECOND CLIENT"
        result = await asyncio.wait_for(server, 30)
        assert (result.exit_code, result.stdout) == (0, b"ready\n"), result
    finally:
        server.cancel()
    if network == "none":  # publishing gave the sandbox no way out: still only lo
        devices = await h.backend.exec(sid, ExecRequest(["cat", "/proc/net/dev"]))
        names = {line.split(":")[0].strip() for line in devices.stdout.decode().splitlines()[2:]}
        assert names == {"lo"}, names
    await h.backend.destroy(sid)
    h.created.remove(sid)
    with pytest.raises(ConnectionRefusedError):  # the port is released with the sandbox
        socket.create_connection(("127.0.0.1", published.host_port), 2).close()
    assert _listening_addresses(published.host_port) == set()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.runtime
@pytest.mark.parametrize("kind", ["oci", "podman"])
async def test_a_taken_host_port_fails_the_create_and_leaves_nothing(
    make: Any, kind: str, taken_port: int
) -> None:
    h = make(kind, "crun")
    config = h.config(ports=[PortMapping(8000, taken_port)])
    with pytest.raises(ConflictError, match=f"cannot listen on 127.0.0.1:{taken_port}") as caught:
        await h.backend.create(config)
    assert "another host port" in str(caught.value)
    assert config.sandbox_id not in await h.backend.list_sandboxes()
    h.created.remove(config.sandbox_id)


@pytest.mark.runtime
@pytest.mark.parametrize("kind", ["oci", "podman"])
async def test_gvisor_without_a_network_cannot_publish(make: Any, kind: str) -> None:
    h = make(kind, "runsc")
    config = h.config(ports=[PortMapping(8000)])
    with pytest.raises(UnsupportedError, match="gVisor's network stack") as caught:
        await h.backend.create(config)
    assert "crun" in str(caught.value)
    assert config.sandbox_id not in await h.backend.list_sandboxes()
    h.created.remove(config.sandbox_id)


@pytest.mark.runtime
def test_sdk_publishes_on_the_servers_loopback(api_server: ApiServer) -> None:
    with (
        Corral(api_server.url, api_server.key_a, environ={}) as client,
        client.sandbox(ports=["0:8000"], labels=TEST_LABEL, timeout=120) as sb,
    ):
        (published,) = sb.info.ports
        assert (published.container_port, published.host_ip) == (8000, "127.0.0.1")
        assert sb.refresh().ports == sb.info.ports  # kept in the record
        with pytest.raises(UserError, match=r"may not be published on 0\.0\.0\.0"):
            client.create(ports=["0.0.0.0:0:8000"], labels=TEST_LABEL)
        events = sb.exec_stream(["python3", "-c", ECHO, "8000", "1"], timeout=60)
        assert next(events) == Output("stdout", b"ready\n")  # listening inside
        assert asyncio.run(_echo(published.host_port, b"through the server")) == (
            b"THROUGH THE SERVER"
        )
        last = list(events)[-1]
        assert isinstance(last, ExitStatus), last
        assert last.exit_code == 0, last

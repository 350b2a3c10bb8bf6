"""Published ports: parsing `-p` specs, and the forwarder local backends share.

A sandbox without a network of its own (network "none": only loopback inside)
publishes a port through a forwarding process of Corral's (`_sys/portfwd.py`):
it listens on the host (127.0.0.1 unless configured) and connects to the port
inside the sandbox's network namespace. The sandbox still cannot reach out.
`ports.json` in the sandbox's directory records the forwarder and the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from corral._sys import portfwd
from corral.backends.base import PortMapping
from corral.errors import ConflictError, SandboxStartError, UserError

PORTS_FILE = "ports.json"
DEFAULT_ADDRESS = "127.0.0.1"


def parse_port(text: str, *, default_ip: str = DEFAULT_ADDRESS) -> PortMapping:
    """`CONTAINER`, `HOST:CONTAINER` or `IP:HOST:CONTAINER` (IPv6 as `[::1]:H:C`);
    HOST 0 (or left out) picks a free port."""
    host_ip, host_port, container_port = split_port(text)
    return port_mapping(container_port, host_port, host_ip or default_ip)


def split_port(text: str) -> tuple[str | None, int, int]:
    """(IP or None, HOST, CONTAINER) of a `[[IP:]HOST:]CONTAINER` spec, unchecked
    beyond its shape (the SDK sends it; the server checks it)."""
    host_ip = None
    rest = text.strip()
    if rest.startswith("["):
        host_ip, sep, rest = rest[1:].partition("]:")
        if not sep or rest.count(":") != 1:
            raise _bad(text)
    elif rest.count(":") == 2:
        host_ip, rest = rest.split(":", 1)
    parts = rest.split(":")
    if len(parts) > 2:
        raise _bad(text)
    host, container = (parts[0], parts[1]) if len(parts) == 2 else ("0", parts[0])
    try:
        return host_ip, int(host), int(container)
    except ValueError:
        raise _bad(text) from None


def port_mapping(
    container_port: int, host_port: int = 0, host_ip: str = DEFAULT_ADDRESS
) -> PortMapping:
    """A checked PortMapping (ports in range, a literal IP address)."""
    if not 1 <= container_port <= 65535 or not 0 <= host_port <= 65535:
        raise UserError(
            f"port {host_port}:{container_port} is out of range",
            hint="container ports are 1-65535; host ports 1-65535, or 0 for any free one",
        )
    try:
        address = ipaddress.ip_address(host_ip)
    except ValueError:
        raise UserError(
            f"'{host_ip}' is not an IP address", hint="publish on e.g. 127.0.0.1"
        ) from None
    return PortMapping(container_port, host_port, str(address))


def check_addresses(ports: Sequence[PortMapping], allowed: Sequence[str]) -> None:
    """Refuse a port published on an address the operator did not allow."""
    for port in ports:
        if port.host_ip not in allowed:
            raise UserError(
                f"ports may not be published on {port.host_ip} here",
                hint=f"publish on {' or '.join(allowed)} (the operator sets"
                " publish_addresses in Corral's configuration)",
            )
    seen: set[tuple[str, int]] = set()
    for port in ports:
        key = (port.host_ip, port.host_port)
        if port.host_port and key in seen:
            raise UserError(
                f"host port {port.host_ip}:{port.host_port} is published twice",
                hint="give each published port its own host port (or 0)",
            )
        seen.add(key)


def _bad(text: str) -> UserError:
    return UserError(
        f"'{text}' is not a port to publish",
        hint="use CONTAINER, HOST:CONTAINER or IP:HOST:CONTAINER, e.g. 8080 or 18080:8080",
    )


def _mapping_args(ports: Sequence[PortMapping]) -> list[str]:
    args = []
    for port in ports:
        ip = f"[{port.host_ip}]" if ":" in port.host_ip else port.host_ip
        args.append(f"{ip}:{port.host_port}:{port.container_port}")
    return args


async def start_forwarder(
    sandbox_dir: Path, sandbox_id: str, pid: int, ports: Sequence[PortMapping], backend: str
) -> list[PortMapping]:
    """Publish `ports` of the sandbox whose main process is `pid`; returns them as
    bound. ConflictError when a host port is taken (nothing is left listening)."""
    # By path, isolated and without site: it needs only the standard library, and
    # importing the corral package would cost more than the forwarder's whole start.
    argv = [
        sys.executable, "-I", "-S", portfwd.__file__, "--pid", str(pid),
        "--sandbox", sandbox_id, "--dir", str(sandbox_dir), *_mapping_args(ports),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SandboxStartError(
            f"the port forwarder failed (exit {proc.returncode})",
            sandbox_id=sandbox_id,
            backend=backend,
            stderr_tail=err.decode(errors="replace")[-500:],
        ) from None
    if "error" in answer:
        raise ConflictError(
            f"cannot publish the sandbox's ports: {answer['error']}",
            sandbox_id=sandbox_id,
            backend=backend,
            hint="pick another host port, or 0 for any free one",
        )
    bound = [
        PortMapping(p["container_port"], p["host_port"], p["host_ip"]) for p in answer["ports"]
    ]
    record = {"pid": int(answer["pid"]), "ports": [p.as_dict() for p in bound]}
    (sandbox_dir / PORTS_FILE).write_text(json.dumps(record))
    return bound


def read_ports(sandbox_dir: Path) -> list[PortMapping]:
    try:
        record = json.loads((sandbox_dir / PORTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [PortMapping(**p) for p in record.get("ports", [])]


async def stop_forwarder(sandbox_dir: Path, sandbox_id: str) -> None:
    """Stop the sandbox's forwarder (if any): its listeners close before this returns."""
    try:
        pid = int(json.loads((sandbox_dir / PORTS_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        if portfwd.__file__.encode() not in cmdline or sandbox_id.encode() not in cmdline:
            return  # the pid was reused by something else
        os.kill(pid, signal.SIGTERM)
        if not await _exited(pidfd, 2.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await _exited(pidfd, 2.0)
    finally:
        os.close(pidfd)


async def _exited(pidfd: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, lambda: _settle(done))
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

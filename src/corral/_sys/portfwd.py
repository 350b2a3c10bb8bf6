"""Publish TCP ports of one sandbox on the host: a small forwarding process.

`python -I -S portfwd.py --pid PID --sandbox ID IP:HOST:CONTAINER...`
binds every listener in the host's network namespace first (so a port in use
fails the call, nothing half-done), forks, prints `{"pid": N, "ports": [...]}`
with the ports as bound (HOST 0 becomes the port the kernel picked) and exits.
The forked process then joins the network namespace of PID (the sandbox's main
process), drops root for nobody, and for each accepted connection connects to
127.0.0.1:CONTAINER (or [::1]) *inside* the sandbox and copies bytes both ways.
Listening sockets stay in the namespace they were made in, which is the whole
trick: the sandbox needs no network of its own beyond loopback.

It exits when the sandbox's main process exits or on SIGTERM. Kept small: the
imports are what the process needs, as it starts once per sandbox with ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys

CLONE_NEWNET = 0x40000000
NOBODY = 65534
CHUNK = 64 << 10


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _parse(mapping: str) -> tuple[str, int, int]:
    host_ip, host_port, container_port = mapping.rsplit(":", 2)
    return host_ip.strip("[]"), int(host_port), int(container_port)


def _listen(host_ip: str, host_port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    return socket.create_server((host_ip, host_port), family=family, backlog=128)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other side sees EOF, can still answer
    except OSError:
        writer.transport.abort()


async def _connect_inside(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return await asyncio.open_connection("::1", port)


def _handler(port: int):  # type: ignore[no-untyped-def]
    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner_reader, inner_writer = await _connect_inside(port)
        except OSError:
            writer.transport.abort()  # nothing listens inside: the client sees a reset
            return
        try:
            await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))
        finally:
            for w in (writer, inner_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    return forward


async def _serve(listeners: list[tuple[socket.socket, int]], pidfd: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(pidfd, lambda: _settle(stop))
    loop.add_signal_handler(signal.SIGTERM, lambda: _settle(stop))
    servers = [await asyncio.start_server(_handler(port), sock=sock) for sock, port in listeners]
    try:
        await stop
    finally:
        for server in servers:
            server.close()


def main(argv: list[str]) -> int:
    pid = int(argv[argv.index("--pid") + 1])
    mappings = [_parse(a) for a in argv if a.count(":") >= 2]
    listeners: list[tuple[socket.socket, int]] = []
    bound: list[dict[str, int | str]] = []
    for host_ip, host_port, container_port in mappings:
        try:
            sock = _listen(host_ip, host_port)
        except OSError as exc:
            print(json.dumps({"error": f"cannot listen on {host_ip}:{host_port}: {exc.strerror}"}))
            return 1
        listeners.append((sock, container_port))
        bound.append(
            {
                "host_ip": host_ip,
                "host_port": sock.getsockname()[1],
                "container_port": container_port,
            }
        )
    try:
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        print(json.dumps({"error": f"the sandbox's main process {pid} is gone ({exc.strerror})"}))
        return 1
    sys.stdout.flush()
    child = os.fork()
    if child:
        print(json.dumps({"pid": child, "ports": bound}), flush=True)
        return 0
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _setns(netns)
    os.close(netns)
    if os.geteuid() == 0:  # only copies bytes from here on: no privilege needed
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    asyncio.run(_serve(listeners, pidfd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

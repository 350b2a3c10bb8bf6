"""Publish TCP ports of one sandbox on the host: a small forwarding process.

`python -I -S portfwd.py --pid PID --sandbox ID IP:HOST:CONTAINER...`
binds every listener in the host's network namespace first (so a port in use
fails the call, nothing half-done), forks, prints `{"pid": N, "ports": [...]}`
with the ports as bound (HOST 0 becomes the port the kernel picked) and exits.
The forked process then joins the network namespace of PID (the sandbox's main
process), drops root for nobody, and for each accepted connection connects to
127.0.0.1:CONTAINER (or [::1]) *inside* the sandbox and splices bytes both ways
(a thread per direction; splice(2) keeps the copying in the kernel).
Listening sockets stay in the namespace they were made in, which is the whole
trick: the sandbox needs no network of its own beyond loopback.

It exits when the sandbox's main process exits or on SIGTERM. Kept small: the
imports are what the process needs, as it starts once per sandbox with ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
import threading

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


def _pump(source: socket.socket, dest: socket.socket) -> None:
    """Move bytes from `source` to `dest` through a pipe with splice(2): the kernel
    copies, this thread only waits. At EOF, half-close `dest` (it can still answer)."""
    read_end, write_end = os.pipe()
    try:
        while moved := os.splice(source.fileno(), write_end, CHUNK):
            while moved:
                moved -= os.splice(read_end, dest.fileno(), moved)
        dest.shutdown(socket.SHUT_WR)
    except OSError:
        _reset(source)
        _reset(dest)
    finally:
        os.close(read_end)
        os.close(write_end)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)


def _connect_inside(port: int) -> socket.socket:
    """A connection to the port on the sandbox's loopback (IPv4, else IPv6). Numeric
    addresses only: no getaddrinfo, whose codecs would be imported lazily, after
    root (which can read the Python installation) is gone."""
    error: OSError | None = None
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect((address, port))
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


def _forward(client: socket.socket, port: int) -> None:
    with client:
        try:
            inner = _connect_inside(port)
        except OSError:
            _reset(client)  # nothing listens inside: the client sees a reset
            return
        with inner:
            back = threading.Thread(target=_pump, args=(inner, client), daemon=True)
            back.start()
            _pump(client, inner)
            back.join()


def _accept(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            continue  # e.g. the client gave up before the accept
        threading.Thread(target=_forward, args=(client, port), daemon=True).start()


def _serve(listeners: list[tuple[socket.socket, int]], pidfd: int) -> None:
    """Forward until the sandbox's main process exits or SIGTERM comes."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the wakeup fd is what stops us
    for sock, port in listeners:
        threading.Thread(target=_accept, args=(sock, port), daemon=True).start()
    select.select([pidfd, wake_read], [], [])


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
    _serve(listeners, pidfd)
    os._exit(0)  # the forwarding threads end with the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

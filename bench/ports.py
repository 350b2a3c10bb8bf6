"""Published-port benchmark: a TCP echo service inside an `oci` (crun) sandbox reached
through Corral's forwarder on 127.0.0.1, side by side with the same service run
directly on the host's loopback (the raw path), interleaved in one run.

    .venv/bin/python bench/ports.py [--runs N] [--bulk-mib N] [--json OUT]

Per run: connect -> 64-byte round trip -> close (a new connection each time), the
round trip on an open connection, and bulk echo throughput (MiB/s, both ways at
once). Medians, reported as ratios to the raw path. Needs root. No target: the
figures tell a user what the forwarder costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pools import sweep  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from startup import traversable_dir  # noqa: E402

from corral._sys.procs import use_pidfd_child_watcher  # noqa: E402
from corral.backends.base import PortMapping  # noqa: E402
from corral.backends.oci import OciBackend  # noqa: E402
from corral.images import ImageStore  # noqa: E402
from corral.runtime.manager import SandboxManager  # noqa: E402
from corral.store import Store  # noqa: E402

# The same echo service on both paths: threads, one per connection, until killed.
ECHO = """
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(262144):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
server = socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Echo)
print("ready", flush=True)
server.serve_forever()
"""
PORT = 8000
MESSAGE = b"x" * 64


def echo_once(conn: socket.socket) -> None:
    conn.sendall(MESSAGE)
    got = 0
    while got < len(MESSAGE):
        data = conn.recv(4096)
        if not data:
            raise ConnectionResetError("the service closed the connection")
        got += len(data)


def connect_round_trip(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        echo_once(conn)
    return (time.perf_counter() - started) * 1000


def open_round_trips(port: int, count: int) -> float:
    """Median round trip (ms) of `count` 64-byte messages on one connection."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            echo_once(conn)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def bulk(port: int, total: int) -> float:
    """MiB/s of `total` bytes echoed back (sent and read at the same time)."""
    chunk = b"c" * (256 << 10)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:

        def send() -> None:
            sent = 0
            while sent < total:
                conn.sendall(chunk)
                sent += len(chunk)
            conn.shutdown(socket.SHUT_WR)

        started = time.perf_counter()
        sender = threading.Thread(target=send)
        sender.start()
        received = 0
        while data := conn.recv(1 << 20):
            received += len(data)
        sender.join()
        elapsed = time.perf_counter() - started
    assert received == total, (received, total)
    return total / (1 << 20) / elapsed


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            connect_round_trip(port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def measure(runs: int, bulk_mib: int, raw_port: int) -> dict[str, Any]:
    state = traversable_dir("ports")
    store = Store.for_state_dir(state)
    manager = SandboxManager(OciBackend(state), store, ImageStore(state / "images"))
    load_before = os.getloadavg()[0]
    rows: dict[str, dict[str, list[float]]] = {
        "raw": {"connect": [], "rtt": [], "bulk": []},
        "corral": {"connect": [], "rtt": [], "bulk": []},
    }
    try:
        record = await manager.create("default", ports=[PortMapping(PORT)], timeout=600)
        host_port = int(record.spec["ports"][0]["host_port"])
        service = asyncio.create_task(
            manager.exec(record.id, ["python3", "-c", ECHO, str(PORT)], timeout=600)
        )
        await asyncio.to_thread(wait_ready, host_port)
        wait_ready(raw_port)
        for _ in range(runs):
            for name, port in (("raw", raw_port), ("corral", host_port)):
                row = rows[name]
                row["connect"].append(await asyncio.to_thread(connect_round_trip, port))
                row["rtt"].append(await asyncio.to_thread(open_round_trips, port, 200))
                row["bulk"].append(await asyncio.to_thread(bulk, port, bulk_mib << 20))
        service.cancel()
        await manager.destroy(record.id)
    finally:
        for left in manager.list():
            await manager.destroy(left.id)
        await manager.backend.aclose()
        store.close()
        sweep(state)
    medians = {
        name: {metric: statistics.median(values) for metric, values in row.items()}
        for name, row in rows.items()
    }
    return {
        "host": platform.node(),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "runs": runs,
        "bulk_mib": bulk_mib,
        "connect_round_trip_ms": {n: m["connect"] for n, m in medians.items()},
        "open_round_trip_ms": {n: m["rtt"] for n, m in medians.items()},
        "bulk_mib_per_s": {n: m["bulk"] for n, m in medians.items()},
        "ratios": {
            "connect_round_trip": medians["corral"]["connect"] / medians["raw"]["connect"],
            "open_round_trip": medians["corral"]["rtt"] / medians["raw"]["rtt"],
            "bulk_throughput": medians["corral"]["bulk"] / medians["raw"]["bulk"],
        },
    }


def _listening_port(pid: int) -> int:
    """The TCP port process `pid` listens on (read from its sockets' inodes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                return int(fields[1].split(":")[1], 16)
    raise RuntimeError(f"process {pid} listens on no TCP port")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/ports.py needs root (it runs sandboxes)")

    # The raw path: the same service on the host's loopback, on a port it picks.
    raw = subprocess.Popen(
        [sys.executable, "-c", ECHO, "0"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )

    async def run() -> dict[str, Any]:
        use_pidfd_child_watcher()
        return await measure(args.runs, args.bulk_mib, _listening_port(raw.pid))

    try:
        assert raw.stdout is not None
        assert raw.stdout.readline() == b"ready\n"
        result = asyncio.run(run())
    finally:
        raw.kill()
        raw.wait()
    table = Table(title=f"published port, oci/crun (medians of {args.runs} runs)")
    for column in ("", "raw loopback", "Corral forwarder", "ratio"):
        table.add_column(column)
    for label, key, fmt, ratio in (
        ("connect + 64 B round trip (ms)", "connect_round_trip_ms", "{:.3f}", "connect_round_trip"),
        ("64 B round trip, open conn (ms)", "open_round_trip_ms", "{:.3f}", "open_round_trip"),
        ("bulk echo (MiB/s)", "bulk_mib_per_s", "{:.0f}", "bulk_throughput"),
    ):
        figures = result[key]
        table.add_row(
            label,
            fmt.format(figures["raw"]),
            fmt.format(figures["corral"]),
            f"{result['ratios'][ratio]:.2f}x",
        )
    console = Console()
    console.print(table)
    console.print(f"load average before/after: {result['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

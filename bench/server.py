"""Server benchmark: create -> first exec result -> destroy through the SDK against a
running `corral serve`, side by side with the in-process Python API and raw crun,
interleaved in one run; then sustained throughput with 1, 8 and 32 concurrent clients.
The SDK does it two ways: three requests (`with c.sandbox() as sb: sb.exec(...)`) and
one (`c.run(...)`, POST /v1/run: the server creates, runs and destroys).

    .venv/bin/python bench/server.py [--runs N] [--seconds S] [--clients 1,8,32] [--json OUT]

Needs root. Targets: the server adds <= 5 ms at p50 over the in-process path, and
sustains >= 40 create+exec+destroy per second on our 2-core machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from startup import limits_of, prepare_raw_bundle, traversable_dir  # noqa: E402
from tests.server_harness import ServerProcess  # noqa: E402

from corral import AsyncCorral, Corral  # noqa: E402
from corral._sys import cgroups  # noqa: E402
from corral._sys.procs import use_pidfd_child_watcher  # noqa: E402
from corral.backends.oci import OciBackend  # noqa: E402
from corral.backends.oci.runtimes import get_runtime  # noqa: E402
from corral.images import ImageStore  # noqa: E402
from corral.runtime.manager import SandboxManager  # noqa: E402
from corral.spec.template import load_template  # noqa: E402
from corral.store import Store  # noqa: E402

OVERHEAD_TARGET_MS = 5.0
THROUGHPUT_TARGET = 40.0
LABELS = {"corral.bench": "server"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Rig:
    """One server (its own state dir), one in-process manager (another), raw bundles."""

    def __init__(self, clients: list[int]) -> None:
        self.server_dir = traversable_dir("server")
        self.local_dir = traversable_dir("local")
        self.server = ServerProcess(self.server_dir, config="[server]\nreap_interval = 1.0\n")
        self.key = self.server.tenant("bench")
        self.server.start()
        self.sdk = Corral(self.server.url, self.key, timeout=120)
        template = load_template("default")
        images = ImageStore(self.local_dir / "images")
        self.image = images.build(template)
        self.backend = OciBackend(self.local_dir)
        self.manager = SandboxManager(self.backend, Store.for_state_dir(self.local_dir), images)
        crun = get_runtime("crun")
        # One raw bundle per concurrent slot (each has its own container name and cgroup).
        self.raw = [
            prepare_raw_bundle(
                self.local_dir / f"raw{slot}",
                crun,
                self.image,
                template,
                self.backend.cgroup_parent,
            )
            for slot in range(max(clients))
        ]
        _ = limits_of

    # -- one cycle each --------------------------------------------------------

    def raw_cycle(self, slot: int = 0) -> tuple[float, float]:
        started = time.perf_counter()
        proc = subprocess.run(self.raw[slot].run_argv(), capture_output=True, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"raw crun run failed: {proc.stderr.decode()[-500:]}")
        return elapsed, elapsed

    async def api_cycle(self) -> tuple[float, float]:
        started = time.perf_counter()
        record = await self.manager.create("default", labels=LABELS)
        try:
            result = await self.manager.exec(record.id, ["/bin/true"])
            first_result = time.perf_counter() - started
            if not result.ok:
                raise RuntimeError(f"exec failed: {result}")
        finally:
            await self.manager.destroy(record.id)
        return first_result, time.perf_counter() - started

    def sdk_cycle(self, client: Corral | None = None) -> tuple[float, float]:
        client = client or self.sdk
        started = time.perf_counter()
        with client.sandbox(labels=LABELS) as sandbox:
            result = sandbox.exec(["/bin/true"])
            first_result = time.perf_counter() - started
            if not result.ok:
                raise RuntimeError(f"exec failed: {result}")
        return first_result, time.perf_counter() - started

    def run_cycle(self, client: Corral | None = None) -> tuple[float, float]:
        """The same cycle in one request: the exit event is the first result, and the
        body ends once the server has destroyed the sandbox."""
        client = client or self.sdk
        started = time.perf_counter()
        first_result = 0.0
        for event in client.run_stream(["/bin/true"], labels=LABELS):
            first_result = time.perf_counter() - started
            if getattr(event, "exit_code", 0) != 0:
                raise RuntimeError(f"run failed: {event}")
        return first_result, time.perf_counter() - started

    # -- throughput --------------------------------------------------------------

    def sdk_throughput(self, clients: int, seconds: float, *, one_request: bool = False) -> float:
        deadline = time.perf_counter() + seconds
        done = [0] * clients
        cycle = self.run_cycle if one_request else self.sdk_cycle

        def worker(slot: int) -> None:
            with Corral(self.server.url, self.key, timeout=120) as client:
                while time.perf_counter() < deadline:
                    cycle(client)
                    done[slot] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, range(clients)))
        return sum(done) / (time.perf_counter() - started)

    def sdk_async_throughput(self, clients: int, seconds: float) -> float:
        """`clients` AsyncCorral clients as tasks in one event loop (as the in-process
        workers run): what an agent platform driving many sandboxes would use, and a
        client process that does not spend its CPU on 32 threads fighting for the GIL."""

        async def run() -> float:
            deadline = time.perf_counter() + seconds
            done = 0

            async def worker() -> None:
                nonlocal done
                async with AsyncCorral(self.server.url, self.key, timeout=120) as client:
                    while time.perf_counter() < deadline:
                        async with client.sandbox(labels=LABELS) as sandbox:
                            result = await sandbox.exec(["/bin/true"])
                            if not result.ok:
                                raise RuntimeError(f"exec failed: {result}")
                        done += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return done / (time.perf_counter() - started)

        return asyncio.run(run())

    def api_throughput(self, clients: int, seconds: float) -> float:
        async def run() -> float:
            deadline = time.perf_counter() + seconds
            done = 0

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    await self.api_cycle()
                    done += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return done / (time.perf_counter() - started)

        return asyncio.run(run())

    def raw_throughput(self, clients: int, seconds: float) -> float:
        deadline = time.perf_counter() + seconds
        done = [0] * clients
        lock = threading.Lock()

        def worker(slot: int) -> None:
            while time.perf_counter() < deadline:
                self.raw_cycle(slot)
                with lock:
                    done[slot] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, range(clients)))
        return sum(done) / (time.perf_counter() - started)

    def close(self) -> list[str]:
        self.sdk.close()
        leftovers = [s.id for s in Corral(self.server.url, self.key).list()]
        self.server.close()
        self.manager.store.close()
        for directory in (self.server_dir, self.local_dir):
            # The state dir's cgroup parent (the raw bundles' too), now empty.
            leftovers += [str(p) for p in cgroups.remove(OciBackend(directory).cgroup_parent)]
            shutil.rmtree(directory, ignore_errors=True)
        return leftovers


def measure(args: argparse.Namespace) -> dict[str, Any]:
    clients = [int(c) for c in args.clients.split(",")]
    rig = Rig(clients)
    latency: dict[str, dict[str, list[float]]] = {
        k: {"first": [], "total": []} for k in ("raw", "api", "sdk", "run")
    }
    throughput: dict[str, dict[int, float]] = {
        "raw": {}, "api": {}, "sdk": {}, "sdk_async": {}, "run": {}
    }  # fmt: skip
    try:
        for warm in range(3):  # the first of each pays one-time costs
            rig.raw_cycle(), asyncio.run(rig.api_cycle()), rig.sdk_cycle(), rig.run_cycle()
            _ = warm
        steps: list[tuple[str, Callable[[], tuple[float, float]]]] = [
            ("raw", rig.raw_cycle),
            ("api", lambda: asyncio.run(rig.api_cycle())),
            ("sdk", rig.sdk_cycle),
            ("run", rig.run_cycle),
        ]
        for _ in range(args.runs):
            random.shuffle(steps)
            for key, step in steps:
                first, total = step()
                latency[key]["first"].append(first)
                latency[key]["total"].append(total)
        for count in clients:
            throughput["raw"][count] = rig.raw_throughput(count, args.seconds)
            throughput["api"][count] = rig.api_throughput(count, args.seconds)
            throughput["sdk"][count] = rig.sdk_throughput(count, args.seconds)
            throughput["sdk_async"][count] = rig.sdk_async_throughput(count, args.seconds)
            throughput["run"][count] = rig.sdk_throughput(count, args.seconds, one_request=True)
    finally:
        leftovers = rig.close()
    if leftovers:
        raise RuntimeError(f"left behind: {leftovers}")
    summary: dict[str, Any] = {"latency_ms": {}, "throughput_per_s": throughput}
    for key, series in latency.items():
        summary["latency_ms"][key] = {
            part: {
                "p50": statistics.median(values) * 1000,
                "p99": percentile(values, 0.99) * 1000,
            }
            for part, values in series.items()
        }
    sdk, api = summary["latency_ms"]["sdk"], summary["latency_ms"]["api"]
    run = summary["latency_ms"]["run"]
    summary["server_overhead_p50_ms"] = sdk["total"]["p50"] - api["total"]["p50"]
    summary["server_overhead_first_result_p50_ms"] = sdk["first"]["p50"] - api["first"]["p50"]
    summary["run_overhead_p50_ms"] = run["total"]["p50"] - api["total"]["p50"]
    summary["run_overhead_first_result_p50_ms"] = run["first"]["p50"] - api["first"]["p50"]
    # The same, as the median of each round's difference (the paths of a round ran
    # back to back): the host's speed drifts over a run, which this cancels.
    summary["paired_overhead_p50_ms"] = {
        key: {
            part: statistics.median(
                (ours - theirs) * 1000
                for ours, theirs in zip(latency[key][part], latency["api"][part], strict=True)
            )
            for part in ("first", "total")
        }
        for key in ("sdk", "run")
    }
    summary["targets"] = {
        "overhead_ms<=5 (three requests)": summary["server_overhead_p50_ms"] <= OVERHEAD_TARGET_MS,
        "overhead_ms<=5 (one request)": summary["run_overhead_p50_ms"] <= OVERHEAD_TARGET_MS,
        "throughput>=40/s (three requests)": max(
            max(throughput["sdk"].values()), max(throughput["sdk_async"].values())
        )
        >= THROUGHPUT_TARGET,
        "throughput>=40/s (one request)": max(throughput["run"].values()) >= THROUGHPUT_TARGET,
    }
    summary["host"] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "runs": args.runs,
        "seconds_per_throughput_cell": args.seconds,
    }
    return summary


def report(summary: dict[str, Any]) -> None:
    console = Console()
    table = Table(title="create -> first exec result -> destroy (ms)")
    for column in ("path", "first result p50", "p99", "full cycle p50", "p99", "vs raw crun"):
        table.add_column(column, justify="right")
    raw = summary["latency_ms"]["raw"]["total"]["p50"]
    names = {
        "raw": "raw `crun run`",
        "api": "in-process API",
        "sdk": "SDK -> corral serve (3 requests)",
        "run": "SDK run -> corral serve (1 request)",
    }
    for key, name in names.items():
        row = summary["latency_ms"][key]
        table.add_row(
            name,
            f"{row['first']['p50']:.1f}",
            f"{row['first']['p99']:.1f}",
            f"{row['total']['p50']:.1f}",
            f"{row['total']['p99']:.1f}",
            f"{row['total']['p50'] / raw:.2f}x",
        )
    console.print(table)
    tput = Table(title="sustained create+exec+destroy per second")
    tput.add_column("clients", justify="right")
    names["sdk"] = "SDK (threads) -> serve"
    names["sdk_async"] = "AsyncCorral (tasks) -> serve"
    names["run"] = "SDK run (threads) -> serve"
    keys = ("raw", "api", "sdk", "sdk_async", "run")
    for key in keys:
        tput.add_column(names[key], justify="right")
    tput.add_column("best sdk / in-process", justify="right")
    for count in summary["throughput_per_s"]["sdk"]:
        values = [summary["throughput_per_s"][k][count] for k in keys]
        best = max(values[2:]) / values[1]
        tput.add_row(str(count), *(f"{v:.1f}" for v in values), f"{best:.2f}")
    console.print(tput)
    console.print(
        f"server overhead at p50: {summary['server_overhead_p50_ms']:.1f} ms (full cycle),"
        f" {summary['server_overhead_first_result_p50_ms']:.1f} ms (to first result); one"
        f" request: {summary['run_overhead_p50_ms']:.1f} / "
        f"{summary['run_overhead_first_result_p50_ms']:.1f} ms; targets: {summary['targets']}"
    )
    paired = summary["paired_overhead_p50_ms"]
    console.print(
        "median of paired differences (full cycle / first result):"
        f" three requests {paired['sdk']['total']:.1f} / {paired['sdk']['first']:.1f} ms,"
        f" one request {paired['run']['total']:.1f} / {paired['run']['first']:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/server.py needs root (it runs real sandboxes)", file=sys.stderr)
        return 2
    use_pidfd_child_watcher()  # as the CLI does: no thread per runtime call
    summary = measure(args)
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

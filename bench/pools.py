"""Warm-pool benchmark at the Python API (oci backend, crun): claim -> first exec result
latency against cold create -> first exec on the same backend, interleaved in one
run; then claims per second (concurrent claimants on a filled pool).

    .venv/bin/python bench/pools.py [--runs N] [--claims N] [--clients N] [--json OUT]

Needs root. Targets on our 2-core machines: claim -> first exec p50 <= 5 ms and
>= 500 claims/s. Between timed claims the pool is refilled outside the clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from startup import leaks, traversable_dir  # noqa: E402

from corral._sys import cgroups  # noqa: E402
from corral._sys.procs import use_pidfd_child_watcher  # noqa: E402
from corral.backends.oci import OciBackend  # noqa: E402
from corral.images import ImageStore  # noqa: E402
from corral.runtime.manager import SandboxManager  # noqa: E402
from corral.runtime.pools import PoolManager  # noqa: E402
from corral.store import Store  # noqa: E402

LATENCY_TARGET_MS = 5.0
CLAIMS_TARGET = 500.0
ARGV = ["/bin/true"]
POOL_SIZE = 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def sweep(state: Path) -> None:
    """Remove the run's state dir and cgroup parent, unless something of it is left
    (then say what, and keep it for a look)."""
    cgroup_parent = OciBackend(state).cgroup_parent
    left = leaks(state, cgroup_parent)
    if left:
        Console(stderr=True).print(f"left after the run (kept {state}): {', '.join(left)}")
        return
    cgroups.remove(cgroup_parent)
    shutil.rmtree(state, ignore_errors=True)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(values_ms),
        "p99_ms": percentile(values_ms, 0.99),
        "min_ms": min(values_ms),
    }


async def measure(runs: int, claims: int, clients: int) -> dict[str, Any]:
    state = traversable_dir("pools")
    store = Store.for_state_dir(state)
    manager = SandboxManager(OciBackend(state), store, ImageStore(state / "images"))
    pools = PoolManager(manager, concurrency=2)
    # A few members, so the one claimed has idled a while (as in a pool at work)
    # rather than being the member the previous refill just made.
    await pools.add("bench", size=POOL_SIZE, fill=True)
    load_before = os.getloadavg()[0]
    pooled: list[float] = []
    cold: list[float] = []
    try:
        for _ in range(runs):
            # Pool hit: claim a ready (primed) member, run the first command.
            started = time.perf_counter()
            claim = await pools.claim("bench", timeout=60)
            result = await manager.exec(claim.record.id, ARGV)
            pooled.append((time.perf_counter() - started) * 1000)
            assert claim.from_pool, claim
            assert result.exit_code == 0, result
            await manager.destroy(claim.record.id)
            # Cold: create the same sandbox, run the first command.
            started = time.perf_counter()
            record = await manager.create("default", timeout=60)
            result = await manager.exec(record.id, ARGV)
            cold.append((time.perf_counter() - started) * 1000)
            assert result.exit_code == 0, result
            await manager.destroy(record.id)
            await pools.refill()  # outside the clock
        # Claims per second: `clients` tasks claim from a pool filled to `claims`.
        pools.resize("bench", claims)
        await pools.refill()
        assert pools.get("bench").idle == claims
        pools.resize("bench", 0)
        got: list[str] = []
        remaining = [claims]

        async def claimant() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                claim = await pools.claim("bench", timeout=60)
                assert claim.from_pool, "the pool was filled to the number of claims"
                got.append(claim.record.id)

        started = time.perf_counter()
        await asyncio.gather(*(claimant() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        assert len(got) == len(set(got)) == claims, "each member exactly once"
        rate = claims / elapsed
    finally:
        for record in manager.list():
            await manager.destroy(record.id)
        for status in pools.list():
            await pools.remove(status.pool.name)
        await manager.backend.aclose()
        manager.store.close()
        sweep(state)
    pool_stats, cold_stats = summary(pooled), summary(cold)
    return {
        "host": platform.node(),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "runs": runs,
        "pool_claim_first_exec": pool_stats,
        "cold_create_first_exec": cold_stats,
        "speedup_p50": cold_stats["p50_ms"] / pool_stats["p50_ms"],
        "claims": claims,
        "clients": clients,
        "claims_per_second": rate,
        "targets": {
            "claim_first_exec_p50_ms": LATENCY_TARGET_MS,
            "claims_per_second": CLAIMS_TARGET,
            "met": pool_stats["p50_ms"] <= LATENCY_TARGET_MS and rate >= CLAIMS_TARGET,
        },
    }


async def measure_snapshot(backend_name: str, runs: int) -> dict[str, Any]:
    """A snapshot pool (members wait snapshotted) on podman/runsc or the microVM
    backend (QEMU): claim (restore) -> first exec against cold create -> first exec
    on the same backend."""
    from corral.backends.registry import load_backend
    from corral.config import Settings

    state = traversable_dir("pools-snap")
    store = Store.for_state_dir(state)
    settings = Settings.model_validate(
        {"state_dir": state, "backend": backend_name, "podman": {"runtime": "runsc"}}
    )
    manager = SandboxManager(load_backend(settings), store, ImageStore(state / "images"))
    runtime = "runsc" if backend_name == "podman" else None
    pools = PoolManager(manager)
    restored: list[float] = []
    cold: list[float] = []
    try:
        await pools.add("snap", size=1, snapshot=True, runtime=runtime, fill=True)
        assert pools.get("snap").idle == 1, pools.get("snap").error
        for _ in range(runs):
            started = time.perf_counter()
            claim = await pools.claim("snap", timeout=60)
            result = await manager.exec(claim.record.id, ARGV)
            restored.append((time.perf_counter() - started) * 1000)
            assert claim.from_pool, claim
            assert result.exit_code == 0, result
            await manager.destroy(claim.record.id)
            started = time.perf_counter()
            record = await manager.create("default", runtime=runtime, timeout=60)
            result = await manager.exec(record.id, ARGV)
            cold.append((time.perf_counter() - started) * 1000)
            assert result.exit_code == 0, result
            await manager.destroy(record.id)
            await pools.refill()
    finally:
        for status in pools.list():
            await pools.remove(status.pool.name)
        for record in manager.list():
            await manager.destroy(record.id)
        await manager.backend.aclose()
        store.close()
        sweep(state)
    restore_stats, cold_stats = summary(restored), summary(cold)
    return {
        "snapshot_claim_first_exec": restore_stats,
        "cold_create_first_exec": cold_stats,
        "speedup_p50": cold_stats["p50_ms"] / restore_stats["p50_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--claims", type=int, default=200, help="pool size for claims/s")
    parser.add_argument("--clients", type=int, default=8, help="concurrent claimants")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument(
        "--snapshot-runs", type=int, default=0, help="also a podman/runsc snapshot pool"
    )
    parser.add_argument(
        "--microvm-runs", type=int, default=0, help="also a microVM (QEMU) snapshot pool"
    )
    args = parser.parse_args()
    use_pidfd_child_watcher()
    report = asyncio.run(measure(args.runs, args.claims, args.clients))
    if args.snapshot_runs:
        report["podman_runsc_snapshot_pool"] = asyncio.run(
            measure_snapshot("podman", args.snapshot_runs)
        )
    if args.microvm_runs:
        report["microvm_snapshot_pool"] = asyncio.run(
            measure_snapshot("microvm", args.microvm_runs)
        )
    table = Table("path (oci/crun unless named)", "p50 ms", "p99 ms", "min ms")
    for label, key in (
        ("pool claim -> first exec", "pool_claim_first_exec"),
        ("cold create -> first exec", "cold_create_first_exec"),
    ):
        stats = report[key]
        table.add_row(
            label, f"{stats['p50_ms']:.2f}", f"{stats['p99_ms']:.2f}", f"{stats['min_ms']:.2f}"
        )
    for name, key in (
        ("podman/runsc", "podman_runsc_snapshot_pool"),
        ("microvm/qemu", "microvm_snapshot_pool"),
    ):
        snap = report.get(key)
        if snap is None:
            continue
        for label, path in (
            ("snapshot pool claim -> first exec", "snapshot_claim_first_exec"),
            ("cold create -> first exec", "cold_create_first_exec"),
        ):
            stats = snap[path]
            table.add_row(
                f"{name}: {label}",
                f"{stats['p50_ms']:.2f}",
                f"{stats['p99_ms']:.2f}",
                f"{stats['min_ms']:.2f}",
            )
        console_note = f"{name} snapshot pool {snap['speedup_p50']:.1f}x faster than cold at p50"
        report.setdefault("notes", []).append(console_note)
    console = Console()
    console.print(table)
    for note in report.get("notes", []):
        console.print(note)
    console.print(
        f"pool is {report['speedup_p50']:.1f}x faster at p50; "
        f"{report['claims_per_second']:.0f} claims/s ({report['claims']} claims, "
        f"{report['clients']} claimants); targets met: {report['targets']['met']}; "
        f"load average {report['load_average']['before']:.1f} -> "
        f"{report['load_average']['after']:.1f} (other work on the host slows every path)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

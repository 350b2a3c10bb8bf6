"""MicroVM start-up under QEMU: cold boot vs snapshot restore, beside the raw QEMU command.

Rows (medians over interleaved rounds, milliseconds):
- raw qemu boot -> marker: the same argv Corral runs (kernel, initramfs, disks,
  flags), started in the foreground, timed to the agent's "ready" line on the
  serial console. The baseline for cold boot.
- corral cold create -> first exec: MicrovmBackend.create() then `/bin/true`.
- corral restore -> first exec: restore() from a snapshot of an idle booted
  VM, then `/bin/true`.
Also the RSS of QEMU for an idle cold-booted VM and an idle restored one.

    sudo .venv/bin/python bench/microvm.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from corral._sys import cgroups
from corral.backends.base import ExecRequest, SandboxConfig, SandboxLimits
from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.backend import AGENT_PORTS
from corral.backends.microvm.qemu import command_line
from corral.images import ImageStore
from corral.spec.template import load_template

LIMITS = SandboxLimits(vcpus=1, memory=256 << 20, pids=128, disk=64 << 20)
MARKER = b"corral-agent: ready"


def rss_kib(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def raw_boot(backend: MicrovmBackend, template_id: str, work: Path) -> float:
    """The sandbox's own QEMU argv, foreground and without Corral, timed to the marker."""
    meta = backend._meta(template_id)
    run_dir = work / f"raw-{secrets.token_hex(3)}"
    run_dir.mkdir()
    overlay = run_dir / "scratch.qcow2"
    shutil.copyfile(backend._dir(template_id) / "scratch.qcow2", overlay)
    spec = meta.vm
    drives = tuple(
        dataclasses.replace(d, path=str(overlay)) if d.serial == "scratch" else d
        for d in spec.drives
    )
    argv = command_line(dataclasses.replace(spec, drives=drives), run_dir)
    cut = argv.index("-daemonize")
    argv = argv[:cut]  # foreground: no pid file, no fork
    console = run_dir / "console.log"
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        while True:
            if console.exists() and MARKER in console.read_bytes():
                return (time.perf_counter() - started) * 1000
            if proc.returncode is not None:
                raise RuntimeError(f"raw QEMU exited {proc.returncode}")
            if time.perf_counter() - started > 180:
                raise RuntimeError("raw QEMU never printed the marker")
            await asyncio.sleep(0.002)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


async def cold(backend: MicrovmBackend, config: SandboxConfig) -> tuple[float, int]:
    started = time.perf_counter()
    await backend.create(config)
    result = await backend.exec(config.sandbox_id, ExecRequest(["/bin/true"]))
    elapsed = (time.perf_counter() - started) * 1000
    assert result.exit_code == 0, result
    await asyncio.sleep(1)
    rss = rss_kib(backend._qemu_pid(config.sandbox_id))
    await backend.destroy(config.sandbox_id)
    return elapsed, rss


async def restored(backend: MicrovmBackend, snapshot: Path) -> tuple[float, int]:
    sid = f"bench-r-{secrets.token_hex(3)}"
    started = time.perf_counter()
    try:
        await backend.restore(sid, snapshot)
        result = await backend.exec(sid, ExecRequest(["/bin/true"]))
        elapsed = (time.perf_counter() - started) * 1000
        assert result.exit_code == 0, result
        await asyncio.sleep(1)
        return elapsed, rss_kib(backend._qemu_pid(sid))
    finally:
        await backend.destroy(sid)


async def measure(runs: int, warmup: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="corral-bench-microvm-", dir="/var/tmp"))
    work.chmod(0o755)
    backend = MicrovmBackend(work / "state")
    image = ImageStore(work / "images").build(load_template("default"))

    def config(sandbox_id: str) -> SandboxConfig:
        return SandboxConfig(sandbox_id, image.to_ref(), LIMITS, mounts=list(image.host_mounts))

    template_id = "bench-template"
    snapshot = work / "snapshot"
    rows: dict[str, list[float]] = {"raw": [], "cold": [], "restore": []}
    rss: dict[str, list[int]] = {"cold": [], "restore": []}
    try:
        await backend.create(config(template_id))  # also builds the bundle
        await backend.snapshot(template_id, snapshot, keep_running=True)
        rng = random.Random(7)
        for round_index in range(warmup + runs):
            order = ["raw", "cold", "restore"]
            rng.shuffle(order)
            for row in order:
                if row == "raw":
                    value = await raw_boot(backend, template_id, work)
                elif row == "cold":
                    value, kib = await cold(backend, config(f"bench-c-{secrets.token_hex(3)}"))
                else:
                    value, kib = await restored(backend, snapshot)
                if round_index >= warmup:
                    rows[row].append(value)
                    if row != "raw":
                        rss[row].append(kib)
            print(
                f"round {round_index + 1}/{warmup + runs}: "
                + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in rows.items() if v),
                flush=True,
            )
    finally:
        for sid in await backend.list_sandboxes():
            await backend.destroy(sid)
        cgroups.remove(backend.cgroup_parent)  # the run's now-empty cgroup parent
        shutil.rmtree(work, ignore_errors=True)
    medians = {row: statistics.median(values) for row, values in rows.items()}
    return {
        "runs": runs,
        "medians_ms": medians,
        "samples_ms": rows,
        "cold_over_raw": medians["cold"] / medians["raw"],
        "cold_over_restore": medians["cold"] / medians["restore"],
        "idle_rss_mib": {k: statistics.median(v) / 1024 for k, v in rss.items()},
        "load_average": os.getloadavg(),
        "ports": AGENT_PORTS,
        "accelerator": backend_accelerator(),
    }


def backend_accelerator() -> str:
    from corral.backends.microvm.host import accelerator

    accel = accelerator()
    return f"{accel.name} ({accel.reason})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(measure(args.runs, args.warmup))
    medians = report["medians_ms"]
    print(f"\naccelerator: {report['accelerator']}; load average {report['load_average']}")
    print(f"{'row':44} {'median ms':>10} {'x raw':>7}")
    names = {
        "raw": "raw qemu boot -> console marker",
        "cold": "corral cold create -> first exec",
        "restore": "corral snapshot restore -> first exec",
    }
    for row, name in names.items():
        print(f"{name:44} {medians[row]:10.0f} {medians[row] / medians['raw']:7.2f}")
    print(f"cold / restore: {report['cold_over_restore']:.1f}x faster to restore")
    rss = report["idle_rss_mib"]
    print(f"idle QEMU RSS: cold-booted {rss['cold']:.0f} MiB, restored {rss['restore']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

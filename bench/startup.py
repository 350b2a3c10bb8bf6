"""Cold-start benchmark: a raw OCI runtime vs Corral's Python API vs the `corral` CLI,
and (`--backend podman`) raw `podman run --rm` vs the podman backend.

Every measurement runs interleaved (shuffled order each round) in one process, so
host noise lands on all rows alike. Needs root. See bench/README.md for the rows.

    .venv/bin/python bench/startup.py [--runs N] [--runtime crun|runc|runsc ...]
        [--backend oci|podman ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from corral._sys import cgroups, mounts
from corral.backends.base import ExecRequest, SandboxConfig, SandboxLimits
from corral.backends.oci import OciBackend
from corral.backends.oci.bundle import UID_BASE, make_config
from corral.backends.oci.runtimes import RUNTIMES, OciRuntime, get_runtime
from corral.backends.podman import PodmanBackend
from corral.cli.cmdserver import stop_server
from corral.cli.launcher import SOCKET_NAME
from corral.images import Image, ImageStore
from corral.runtime.manager import SandboxManager, new_sandbox_id
from corral.spec.template import Template, load_template
from corral.store import Store

TEMPLATE = "default"
LABELS = {"corral.bench": "startup"}
API_TARGET_RATIO = 2.0  # create -> first exec result, against the raw runtime's cold start
CLI_TARGET_MS = 150.0  # `corral run -- /bin/true`, crun
PODMAN_TARGET_RATIO = 1.10  # podman backend create/exec/destroy, against raw `podman run --rm`
BACKENDS = ("oci", "podman")
VENV_BIN = Path(sys.executable).parent

Samples = dict[str, list[float]]  # row key -> seconds


# -- setup -----------------------------------------------------------------------


def traversable_dir(prefix: str) -> Path:
    """A fresh dir under /var/tmp that a user-namespaced runtime can traverse."""
    path = Path(tempfile.mkdtemp(prefix=f"corral-bench-{prefix}-", dir="/var/tmp"))
    path.chmod(0o755)
    return path


def limits_of(template: Template) -> SandboxLimits:
    """The limits SandboxManager.create gives a sandbox of `template` (no overrides)."""
    res = template.resources
    return SandboxLimits(
        vcpus=float(res.vcpus), memory=res.memory, pids=res.pids, disk=res.disk, cpuset=res.cpuset
    )


@dataclass(frozen=True)
class RawBundle:
    """A prepared bundle that runs /bin/true with a sandbox's rootfs, mounts and limits."""

    runtime: OciRuntime
    root: Path  # the runtime's --root
    bundle: Path
    container: str
    cgroup: str

    def run_argv(self) -> list[str]:
        return self.runtime.command(self.root, "run", "--bundle", str(self.bundle), self.container)


def prepare_raw_bundle(
    base: Path, runtime: OciRuntime, image: Image, template: Template, cgroup_parent: str
) -> RawBundle:
    """Write the bundle once: `make_config` as the backend would, args ["/bin/true"].

    The scratch is a plain directory (the backend mounts a tmpfs there) and the
    /.corral support dir holds a copy of catatonit as the backend's does; the
    runtime only binds them, so they cost it the same.
    """
    userns = runtime.user_namespace
    host_id = image.uid + (UID_BASE if userns else 0)
    token = secrets.token_hex(4)
    directory = base / "raw" / runtime.name
    support = directory / "support"
    support.mkdir(parents=True)
    shutil.copy2(shutil.which("catatonit") or "/usr/libexec/podman/catatonit", support / "init")
    scratch = directory / "scratch"
    for sub, mode in (("tmp", 0o1777), ("home", 0o755), ("work", 0o755)):
        path = scratch / sub
        path.mkdir(parents=True)
        os.chown(path, host_id, host_id)
        path.chmod(mode)
    sandbox_id = f"bench-raw-{runtime.name}-{token}"
    config = SandboxConfig(
        sandbox_id=sandbox_id,
        image=image.to_ref(),
        limits=limits_of(template),
        mounts=list(image.host_mounts),
        labels=LABELS,
        runtime=runtime.name,
    )
    cgroup = f"{cgroup_parent}/{sandbox_id}"  # beside the backend's sandboxes
    spec = make_config(
        config,
        scratch=str(scratch),
        support_dir=str(support),
        cgroup_path=cgroup,
        user_namespace=userns,
    )
    spec["process"]["args"] = ["/bin/true"]
    bundle = directory / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    root = directory / "root"
    root.mkdir()
    return RawBundle(runtime, root, bundle, sandbox_id, cgroup)


@dataclass
class Bench:
    """What every measurement shares: one state dir (store, images, sandboxes)."""

    state_dir: Path
    template: Template
    image: Image
    backend: OciBackend
    manager: SandboxManager
    raw: dict[str, RawBundle]
    child_env: dict[str, str]  # for the Python children: the CLI and `python -c`
    podman: PodmanBackend | None = None  # with --backend podman
    podman_image: str = ""  # the image's name in the podman backend's storage
    samples: Samples = field(default_factory=dict)
    sandbox_ids: set[str] = field(default_factory=set)  # every id handed out, for the leak check

    def record(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def record_steps(
        self,
        prefix: str,
        started: float,
        created: float,
        executed: float,
        destroy_started: float,
        done: float,
    ) -> None:
        """Record the create, exec and destroy steps of one cold start and their sums."""
        self.record(f"{prefix}/create", created - started)
        self.record(f"{prefix}/exec", executed - created)
        self.record(f"{prefix}/destroy", done - destroy_started)
        self.record(f"{prefix}/create_exec", executed - started)
        self.record(f"{prefix}/total", done - started)


def child_environment(state_dir: Path, bytecode_cache: bool) -> dict[str, str]:
    """The environment of the CLI and `python -c` children.

    With `bytecode_cache`, .pyc files go to a prefix dir under the state dir (filled
    by the warm-up rounds), as an installed corral would have them, even where
    PYTHONDONTWRITEBYTECODE is set and src/corral has no __pycache__.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_CONFIG"] = str(state_dir / "no-config.toml")  # ignore /etc/corral
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(state_dir / "pycache")
    return env


def open_bench(
    state_dir: Path, runtimes: list[str], *, bytecode_cache: bool, podman: bool
) -> Bench:
    template = load_template(TEMPLATE)
    images = ImageStore(state_dir / "images")  # where the CLI looks, so it hits the cache
    image = images.build(template)
    backend = OciBackend(state_dir)
    manager = SandboxManager(backend, Store.for_state_dir(state_dir), images)
    raw = {
        name: prepare_raw_bundle(
            state_dir, get_runtime(name), image, template, backend.cgroup_parent
        )
        for name in runtimes
    }
    env = child_environment(state_dir, bytecode_cache)
    bench = Bench(state_dir, template, image, backend, manager, raw, env)
    if podman:
        bench.podman = PodmanBackend(state_dir)
        # Loaded once, before any round: both podman rows start from the loaded image.
        load = bench.podman.images.ensure(image.to_ref(), "bench-load")
        bench.podman_image = asyncio.run(load)
    return bench


# -- measurements ----------------------------------------------------------------


def _check(proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-800:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")


def _timed_subprocess(argv: list[str], what: str, env: dict[str, str] | None = None) -> float:
    # Blocking on purpose: nothing else runs meanwhile, and a thread hop would add to the figure.
    started = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env)
    elapsed = time.perf_counter() - started
    _check(proc, what)
    return elapsed


async def measure_raw(bench: Bench, runtime: str) -> None:
    """`<runtime> run` in the foreground: create, start, wait, delete (it deletes itself)."""
    raw = bench.raw[runtime]
    bench.record(f"{runtime}/raw", _timed_subprocess(raw.run_argv(), f"raw {runtime} run"))


async def measure_backend(bench: Bench, runtime: str) -> None:
    config = SandboxConfig(
        sandbox_id=new_sandbox_id(),
        image=bench.image.to_ref(),
        limits=limits_of(bench.template),
        mounts=list(bench.image.host_mounts),
        labels=LABELS,
        runtime=runtime,
    )
    backend = bench.backend
    bench.sandbox_ids.add(config.sandbox_id)
    started = time.perf_counter()
    try:
        await backend.create(config)
        created = time.perf_counter()
        result = await backend.exec(config.sandbox_id, ExecRequest(["/bin/true"]))
        executed = time.perf_counter()
        if not result.ok:
            raise RuntimeError(f"backend exec /bin/true: exit {result.exit_code} {result.stderr!r}")
    finally:
        destroy_started = time.perf_counter()
        await backend.destroy(config.sandbox_id)
    done = time.perf_counter()
    prefix = f"{runtime}/backend"
    bench.record_steps(prefix, started, created, executed, destroy_started, done)


async def measure_manager(bench: Bench, runtime: str) -> None:
    manager = bench.manager
    started = time.perf_counter()
    record = await manager.create(TEMPLATE, runtime=runtime, labels=LABELS)
    created = time.perf_counter()
    bench.sandbox_ids.add(record.id)
    try:
        result = await manager.exec(record.id, ["/bin/true"])
        executed = time.perf_counter()
        if not result.ok:
            raise RuntimeError(f"manager exec /bin/true: exit {result.exit_code} {result.stderr!r}")
    finally:
        destroy_started = time.perf_counter()
        await manager.destroy(record.id)
    done = time.perf_counter()
    prefix = f"{runtime}/manager"
    bench.record_steps(prefix, started, created, executed, destroy_started, done)


async def measure_cli(bench: Bench, runtime: str) -> None:
    """`corral run -- /bin/true` as a user types it (through the warm command server)
    and with the command server off (every import paid in the process)."""
    argv = [
        str(VENV_BIN / "corral"),
        *("--state-dir", str(bench.state_dir), "--backend", "oci", "--runtime", runtime),
        *("run", "--", "/bin/true"),
    ]
    served = {**bench.child_env, "CORRAL_CLI_SERVER": "require"}
    elapsed = _timed_subprocess(argv, f"corral run ({runtime})", env=served)
    bench.record(f"{runtime}/cli", elapsed)
    direct = {**bench.child_env, "CORRAL_CLI_SERVER": "0"}
    elapsed = _timed_subprocess(argv, f"corral run, no server ({runtime})", env=direct)
    bench.record(f"{runtime}/cli_direct", elapsed)


def start_command_server(bench: Bench) -> None:
    """Start the state dir's command server the way a first `corral` call does; wait."""
    subprocess.run(
        [str(VENV_BIN / "corral"), "--state-dir", str(bench.state_dir), "images", "ls"],
        env={**bench.child_env, "CORRAL_CLI_SERVER": "1"},
        capture_output=True,
        check=True,
    )
    deadline = time.monotonic() + 60
    while not (bench.state_dir / SOCKET_NAME).exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the CLI command server did not come up within 60 s")
        time.sleep(0.05)


async def measure_python(bench: Bench, key: str, code: str) -> None:
    argv = [sys.executable, "-c", code]
    elapsed = _timed_subprocess(argv, f"python -c {code!r}", env=bench.child_env)
    bench.record(key, elapsed)


def podman_raw_argv(bench: Bench, runtime: str) -> list[str]:
    """`podman run --rm` of the backend's loaded image under Corral's podman config.

    Only what /bin/true needs from the image: the host mounts (its /usr) and the
    runtime; Podman's defaults (containers.conf: no network, the ulimits) do the rest.
    """
    assert bench.podman is not None
    argv = ["run", "--rm", "--runtime", runtime, "--pull", "never"]
    argv += [
        "--label",
        "corral.bench=startup",
        "--cgroup-parent",
        raw_podman_cgroup(bench.state_dir),
    ]
    for mount in bench.image.host_mounts:
        argv += ["--volume", f"{mount.source}:{mount.target}:ro"]
    return bench.podman.podman.command(*argv, bench.podman_image, "/bin/true")


def raw_podman_cgroup(state_dir: Path) -> str:
    """The cgroup parent of the raw podman runs: like the backend's, one per state dir."""
    return f"/corral-bench-raw-{state_dir.name}"


async def measure_podman_raw(bench: Bench, runtime: str) -> None:
    assert bench.podman is not None
    argv = podman_raw_argv(bench, runtime)
    elapsed = _timed_subprocess(argv, f"raw podman run ({runtime})", env=bench.podman.podman.env)
    bench.record(f"{runtime}/podman_raw", elapsed)


async def measure_podman_backend(bench: Bench, runtime: str) -> None:
    """The podman backend's create -> first exec result -> destroy."""
    assert bench.podman is not None
    config = SandboxConfig(
        sandbox_id=new_sandbox_id(),
        image=bench.image.to_ref(),
        limits=limits_of(bench.template),
        mounts=list(bench.image.host_mounts),
        labels=LABELS,
        runtime=runtime,
    )
    backend = bench.podman
    bench.sandbox_ids.add(config.sandbox_id)
    started = time.perf_counter()
    try:
        await backend.create(config)
        created = time.perf_counter()
        result = await backend.exec(config.sandbox_id, ExecRequest(["/bin/true"]))
        executed = time.perf_counter()
        if not result.ok:
            raise RuntimeError(f"podman exec /bin/true: exit {result.exit_code} {result.stderr!r}")
    finally:
        destroy_started = time.perf_counter()
        await backend.destroy(config.sandbox_id)
    done = time.perf_counter()
    bench.record_steps(f"{runtime}/podman", started, created, executed, destroy_started, done)


def round_steps(
    bench: Bench, runtimes: list[str], backends: list[str]
) -> list[Callable[[], Awaitable[None]]]:
    steps: list[Callable[[], Awaitable[None]]] = []
    measures: list[Callable[[Bench, str], Awaitable[None]]] = []
    if "oci" in backends:
        steps.append(lambda: measure_python(bench, "python/pass", "pass"))
        steps.append(lambda: measure_python(bench, "python/import_cli", "import corral.cli.main"))
        measures += [measure_raw, measure_backend, measure_manager, measure_cli]
    if "podman" in backends:
        measures += [measure_podman_raw, measure_podman_backend]
    for runtime in runtimes:
        for measure in measures:
            steps.append(functools.partial(measure, bench, runtime))
    return steps


async def run_rounds(
    bench: Bench, runtimes: list[str], backends: list[str], runs: int, warmup: int
) -> None:
    steps = round_steps(bench, runtimes, backends)
    shuffle = random.Random(0).shuffle
    with Console(stderr=True).status("measuring") as status:
        for number in range(warmup + runs):
            if number == warmup:
                bench.samples.clear()  # warm-up rounds fill caches; they are not recorded
            status.update(f"round {number + 1}/{warmup + runs} ({warmup} warm-up)")
            shuffle(steps)
            for step in steps:
                await step()


# -- cleanup ---------------------------------------------------------------------


async def destroy_sandboxes(state_dir: Path, sandbox_ids: set[str]) -> None:
    backend = OciBackend(state_dir)
    podman = PodmanBackend(state_dir)
    for sandbox_id in sorted(sandbox_ids):
        if podman.podman.storage_conf.exists():  # podman's part first: its container
            await podman.destroy(sandbox_id)
        await backend.destroy(sandbox_id)
    await podman.aclose()  # an API service the sweep started


def delete_podman_raw(state_dir: Path) -> list[str]:
    """Remove raw `podman run --rm` containers an interrupted run left, and their cgroups."""
    podman = PodmanBackend(state_dir).podman
    if not podman.storage_conf.exists():
        return []
    listed = subprocess.run(
        podman.command("ps", "--all", "--quiet", "--filter", "label=corral.bench=startup"),
        env=podman.env,
        capture_output=True,
        text=True,
    )
    left = [f"raw podman container {name}" for name in listed.stdout.split()]
    if left:
        remove = podman.command("rm", "--force", "--time", "0", *listed.stdout.split())
        subprocess.run(remove, env=podman.env, capture_output=True)
    busy = cgroups.remove(raw_podman_cgroup(state_dir))
    return left + [f"cgroup {path} busy" for path in busy]


def delete_raw(raw: dict[str, RawBundle]) -> list[str]:
    """Delete any raw container or cgroup still there (a run interrupted midway)."""
    left = []
    for bundle in raw.values():
        runtime = bundle.runtime
        state = runtime.command(bundle.root, "state", bundle.container)
        if subprocess.run(state, capture_output=True).returncode == 0:
            left.append(f"raw container {bundle.container}")
            delete = runtime.command(bundle.root, "delete", runtime.force_flag, bundle.container)
            subprocess.run(delete, capture_output=True)
        if cgroups.cgroup_dirs(bundle.cgroup):
            left.append(f"cgroup {bundle.cgroup}")
            cgroups.remove(bundle.cgroup)
    return left


def leaks(state_dir: Path, cgroup_parent: str) -> list[str]:
    """Cgroups, mounts and processes of this run still there after the sweep.

    Every cgroup under `cgroup_parent` is ours: the backend keys it by the state dir.
    """
    found = [f"cgroup {cgroup_parent}/{name}" for name in sorted(cgroups.children(cgroup_parent))]
    found += [f"mount {point}" for point in mounts.mounts_under(state_dir)]
    marker = str(state_dir).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"process {pid}: {command}")
    return found


def clean_up(state_dir: Path, bench: Bench | None) -> list[str]:
    """Sweep the state dir, check for leaks; remove the dir and our cgroup parent if clean."""
    raw = bench.raw if bench else {}
    stop_server(state_dir)  # the CLI command server of this state dir, if one is up
    leftovers: set[str] = set()  # sandboxes still on disk or in the store (e.g. a killed CLI)
    if (state_dir / "sandboxes").is_dir():
        leftovers |= {p.name for p in (state_dir / "sandboxes").iterdir()}
    if bench is not None:
        leftovers |= bench.manager.store.ids()
        bench.manager.store.close()
    cgroup_parent = OciBackend(state_dir).cgroup_parent
    leftovers |= cgroups.children(cgroup_parent) - {b.container for b in raw.values()}
    asyncio.run(destroy_sandboxes(state_dir, leftovers))
    if bench is not None and bench.podman is not None:
        asyncio.run(bench.podman.aclose())  # the podman API services it started
    left = [f"sandbox {sandbox_id}" for sandbox_id in sorted(leftovers)] + delete_raw(raw)
    left += delete_podman_raw(state_dir)
    remaining = leaks(state_dir, cgroup_parent)
    console = Console(stderr=True)
    if left:
        console.print(f"swept after the run: {', '.join(left)}")
    if remaining:
        console.print(f"[red]LEAKED[/]: {'; '.join(remaining)} (state dir {state_dir} kept)")
        return remaining
    busy = cgroups.remove(cgroup_parent)  # the (now empty) per-state-dir parent
    shutil.rmtree(state_dir, ignore_errors=True)
    if busy:
        return [f"cgroup {path} busy" for path in busy]
    count = len(bench.sandbox_ids) if bench else 0
    console.print(
        f"cleanup: nothing left ({count} sandboxes made through the API, all gone;"
        f" cgroup parent {cgroup_parent} removed)",
        soft_wrap=True,
    )
    return []


# -- report ----------------------------------------------------------------------


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    runtime: str | None = None
    detail: bool = False  # a step of the row above
    baseline: str = "raw"  # the row's raw counterpart: `<runtime>/<baseline>`


def rows_for(runtimes: list[str], backends: list[str]) -> list[Row]:
    rows: list[Row] = []
    for rt in runtimes if "podman" in backends else []:
        raw = f"raw `podman run --rm --runtime {rt} IMAGE /bin/true`"
        rows.append(Row(f"{rt}/podman_raw", raw, rt, baseline="podman_raw"))
        for step in ("create_exec", "total", "create", "exec", "destroy"):
            label = {
                "create_exec": "PodmanBackend: create -> 1st exec result",
                "total": "PodmanBackend: create + exec + destroy",
            }.get(step, f"  {step}")
            detail = step not in ("create_exec", "total")
            rows.append(Row(f"{rt}/podman/{step}", label, rt, detail, baseline="podman_raw"))
    for rt in runtimes if "oci" in backends else []:
        raw = "runsc --network=none --platform=ptrace run" if rt == "runsc" else f"{rt} run"
        rows.append(Row(f"{rt}/raw", f"raw `{raw}` (create, start, wait, delete)", rt))
        for layer, name in (("manager", "SandboxManager"), ("backend", "OciBackend")):
            rows.append(Row(f"{rt}/{layer}/create_exec", f"{name}: create -> 1st exec result", rt))
            rows.append(Row(f"{rt}/{layer}/total", f"{name}: create + exec + destroy", rt))
            for step in ("create", "exec", "destroy"):
                rows.append(Row(f"{rt}/{layer}/{step}", f"  {step}", rt, detail=True))
        rows.append(Row(f"{rt}/cli", "CLI `corral run -- /bin/true` (wall, command server)", rt))
        rows.append(Row(f"{rt}/cli_direct", "CLI, command server off (wall)", rt))
    if "oci" in backends:
        rows.append(Row("python/pass", "`python -c pass` (wall)"))
        rows.append(Row("python/import_cli", "`python -c 'import corral.cli.main'` (wall)"))
    return rows


def summarize(samples: Samples) -> dict[str, dict[str, Any]]:
    return {
        key: {
            "median_ms": statistics.median(values) * 1e3,
            "p90_ms": p90(values) * 1e3,
            "min_ms": min(values) * 1e3,
            "samples_ms": [round(v * 1e3, 3) for v in values],
        }
        for key, values in samples.items()
    }


def targets(
    summary: dict[str, dict[str, Any]], runtimes: list[str], backends: list[str]
) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for rt in runtimes if "podman" in backends else []:
        raw = summary[f"{rt}/podman_raw"]["median_ms"]
        value = summary[f"{rt}/podman/total"]["median_ms"]
        checks.append(
            {
                "name": f"podman/{rt} backend: create + exec + destroy"
                f" <= {PODMAN_TARGET_RATIO:g}x raw `podman run --rm`",
                "value_ms": value,
                "limit_ms": PODMAN_TARGET_RATIO * raw,
                "ok": value <= PODMAN_TARGET_RATIO * raw,
            }
        )
    for rt in runtimes if "oci" in backends else []:
        raw = summary[f"{rt}/raw"]["median_ms"]
        for layer in ("manager", "backend"):
            value = summary[f"{rt}/{layer}/create_exec"]["median_ms"]
            checks.append(
                {
                    "name": f"{rt} {layer}: create -> 1st exec <= {API_TARGET_RATIO:g}x raw {rt}",
                    "value_ms": value,
                    "limit_ms": API_TARGET_RATIO * raw,
                    "ok": value <= API_TARGET_RATIO * raw,
                }
            )
    if "crun" in runtimes and "oci" in backends:
        value = summary["crun/cli"]["median_ms"]
        checks.append(
            {
                "name": f"crun CLI: `corral run -- /bin/true` <= {CLI_TARGET_MS:g} ms",
                "value_ms": value,
                "limit_ms": CLI_TARGET_MS,
                "ok": value <= CLI_TARGET_MS,
            }
        )
    return checks


def print_report(
    summary: dict[str, dict[str, Any]],
    runtimes: list[str],
    backends: list[str],
    checks: list[dict[str, Any]],
) -> None:
    console = Console(width=None if sys.stdout.isatty() else 120)
    crun_raw = summary.get("crun/raw", {}).get("median_ms")
    table = Table(title="Cold start of /bin/true (ms)")
    table.add_column("row")
    table.add_column("rt")
    table.add_column("median", justify="right")
    table.add_column("p90", justify="right")
    table.add_column("x raw crun", justify="right")
    table.add_column("x own raw", justify="right")
    for row in rows_for(runtimes, backends):
        if row.key not in summary:
            continue
        median = summary[row.key]["median_ms"]
        own_raw = (
            summary.get(f"{row.runtime}/{row.baseline}", {}).get("median_ms")
            if row.runtime
            else None
        )
        table.add_row(
            row.label,
            row.runtime or "-",
            f"{median:.1f}",
            f"{summary[row.key]['p90_ms']:.1f}",
            f"{median / crun_raw:.2f}" if crun_raw and not row.detail else "",
            f"{median / own_raw:.2f}" if own_raw and not row.detail else "",
            style="dim" if row.detail else None,
        )
    console.print(table)
    for check in checks:
        verdict = "[green]PASS[/]" if check["ok"] else "[red]FAIL[/]"
        console.print(
            f"{verdict} {check['name']}: {check['value_ms']:.1f} ms"
            f" (limit {check['limit_ms']:.1f} ms)"
        )
    for line in cli_breakdown(summary, runtimes) if "oci" in backends else []:
        console.print(line, soft_wrap=True)


def cli_breakdown(summary: dict[str, dict[str, Any]], runtimes: list[str]) -> list[str]:
    """Where the CLI's wall time goes, from the medians of the other rows."""
    median = {key: value["median_ms"] for key, value in summary.items()}
    start = median["python/pass"]
    imports = median["python/import_cli"] - start
    lines = []
    for rt in runtimes:
        api = median[f"{rt}/manager/total"]
        direct = median[f"{rt}/cli_direct"]
        served = median[f"{rt}/cli"]
        lines.append(
            f"CLI {rt}, server off: {direct:.0f} ms ~ interpreter start {start:.0f}"
            f" + import corral.cli.main {imports:.0f} + SandboxManager create/exec/destroy"
            f" {api:.0f} + the rest {direct - start - imports - api:.0f}"
        )
        lines.append(
            f"CLI {rt}, command server: {served:.0f} ms ~ SandboxManager create/exec/destroy"
            f" {api:.0f} + client start, fork and argument parsing {served - api:.0f}"
        )
    return lines


def host_facts(runtimes: list[str], backends: list[str], bytecode_cache: bool) -> dict[str, Any]:
    versions = {}
    for name in [*runtimes, *(["podman"] if "podman" in backends else [])]:
        proc = subprocess.run([name, "--version"], capture_output=True, text=True)
        lines = (proc.stdout or proc.stderr).splitlines()
        versions[name] = lines[0] if proc.returncode == 0 and lines else "?"
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "bytecode_cache": bytecode_cache,
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "loadavg_after": os.getloadavg(),
        "runtimes": versions,
    }


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded rounds (default 2)")
    parser.add_argument(
        "--runtime",
        action="append",
        choices=sorted(RUNTIMES),
        help="OCI runtime to measure; repeat for several (default: crun)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="backend to measure against its raw runtime; repeat for both (default: oci)",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument(
        "--no-bytecode-cache",
        dest="bytecode_cache",
        action="store_false",
        help="run the Python children with the environment as is (see README)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("bench/startup.py needs root (cgroups, mounts, OCI runtimes)\n")
        return 2
    runtimes: list[str] = list(dict.fromkeys(args.runtime or ["crun"]))
    backends: list[str] = list(dict.fromkeys(args.backend or ["oci"]))
    for name in runtimes:
        get_runtime(name).binary()  # fail early, naming the package to install
    if "podman" in backends and shutil.which("podman") is None:
        sys.stderr.write("--backend podman needs podman: apt-get install podman\n")
        return 2
    # SIGTERM unwinds like Ctrl-C, so every finally (and the sweep) still runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    state_dir = traversable_dir("state")
    bench: Bench | None = None
    interrupted = False
    try:
        podman = "podman" in backends
        bench = open_bench(state_dir, runtimes, bytecode_cache=args.bytecode_cache, podman=podman)
        if "oci" in backends:
            start_command_server(bench)
        asyncio.run(run_rounds(bench, runtimes, backends, args.runs, args.warmup))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        remaining = clean_up(state_dir, bench)
    if interrupted or bench is None:
        sys.stderr.write("interrupted: no figures\n")
        return 130
    summary = summarize(bench.samples)
    checks = targets(summary, runtimes, backends)
    print_report(summary, runtimes, backends, checks)
    cache = "cached under the state dir" if args.bytecode_cache else "as the environment has it"
    print(
        f"host: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at the end;"
        f" .pyc of the Python children: {cache}"
    )
    if args.json:
        payload = {
            "runs": args.runs,
            "warmup": args.warmup,
            "runtimes": runtimes,
            "backends": backends,
            "template": TEMPLATE,
            "host": host_facts(runtimes, backends, args.bytecode_cache),
            "results": summary,
            "targets": checks,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if not remaining else 1


if __name__ == "__main__":
    sys.exit(main())

"""Read and remove a sandbox's cgroups on v1, hybrid or unified (v2) hosts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = (
    *("memory", "cpu", "cpuacct", "cpuset", "pids", "devices", "freezer", "blkio", "hugetlb"),
    *("net_cls", "net_prio", "perf_event", "rdma", "misc", "systemd"),
)


def is_unified(root: Path = CGROUP_ROOT) -> bool:
    """True when the host runs cgroup v2 only (no v1 memory hierarchy)."""
    return (root / "cgroup.controllers").exists()


# The host's cgroup mode does not change while we run.
_HOST_UNIFIED = is_unified()


@dataclass(frozen=True, slots=True)
class CgroupReading:
    memory_bytes: int
    memory_limit: int
    cpu_seconds: float
    pids: int
    pids_limit: int
    oom_kills: int


def _read(path: Path, default: str = "0") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _int(text: str, default: int = 0) -> int:
    return int(text) if text.isdigit() else default


def _keyed(path: Path, key: str) -> int:
    for line in _read(path, "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value)
    return 0


def oom_kills(cgroup: str, root: Path = CGROUP_ROOT) -> int:
    """How many processes the kernel OOM-killed in this cgroup so far."""
    # Read twice around every exec: plain strings and bytes, and the host's cgroup
    # mode looked up once (pathlib and a stat per call tripled its cost).
    rel = cgroup.lstrip("/")
    unified = _HOST_UNIFIED if root == CGROUP_ROOT else is_unified(root)
    name = f"{rel}/memory.events" if unified else f"memory/{rel}/memory.oom_control"
    try:
        with open(f"{root}/{name}", "rb") as events:
            text = events.read()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"oom_kill":
            return int(value) if value.isdigit() else 0
    return 0


def read(cgroup: str, root: Path = CGROUP_ROOT) -> CgroupReading:
    """Current usage and limits of `cgroup` (a path like /corral/sb-1234)."""
    rel = cgroup.lstrip("/")
    if is_unified(root):
        base = root / rel
        usage = _keyed(base / "cpu.stat", "usage_usec") / 1e6
        limit = _read(base / "memory.max", "max")
        pids_max = _read(base / "pids.max", "max")
        return CgroupReading(
            memory_bytes=_int(_read(base / "memory.current")),
            memory_limit=_int(limit, -1),
            cpu_seconds=usage,
            pids=_int(_read(base / "pids.current")),
            pids_limit=_int(pids_max, -1),
            oom_kills=_keyed(base / "memory.events", "oom_kill"),
        )
    memory = root / "memory" / rel
    pids = root / "pids" / rel
    return CgroupReading(
        memory_bytes=_int(_read(memory / "memory.usage_in_bytes")),
        memory_limit=_int(_read(memory / "memory.limit_in_bytes"), -1),
        cpu_seconds=_int(_read(root / "cpuacct" / rel / "cpuacct.usage")) / 1e9,
        pids=_int(_read(pids / "pids.current")),
        pids_limit=_int(_read(pids / "pids.max", "max"), -1),
        oom_kills=_keyed(memory / "memory.oom_control", "oom_kill"),
    )


def cgroup_dirs(cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Every directory that exists for `cgroup` across the mounted hierarchies."""
    rel = cgroup.lstrip("/")
    candidates = [root / rel] if is_unified(root) else [root / c / rel for c in V1_CONTROLLERS]
    candidates.append(root / "unified" / rel)
    return [path for path in candidates if path.is_dir()]


def remove(cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Remove the cgroup's directories (children first). Returns those that stay busy."""
    busy: list[Path] = []
    for top in cgroup_dirs(cgroup, root):
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                busy.append(Path(dirpath))
    return busy


def children(parent: str, root: Path = CGROUP_ROOT) -> set[str]:
    """Names of the child cgroups of `parent` in any hierarchy (for leak checks and gc)."""
    rel = parent.lstrip("/")
    tops = [root / rel] if is_unified(root) else [root / c / rel for c in V1_CONTROLLERS]
    names: set[str] = set()
    for top in tops:
        if top.is_dir():
            names.update(p.name for p in top.iterdir() if p.is_dir())
    return names


def pids(cgroup: str, root: Path = CGROUP_ROOT) -> list[int]:
    """Host pids of every process in `cgroup` (and its children)."""
    rel = cgroup.lstrip("/")
    top = root / rel if is_unified(root) else root / "pids" / rel
    found: list[int] = []
    for dirpath, _dirs, _files in os.walk(top):
        try:
            found.extend(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            continue
    return found

"""The host cgroup around one VM's QEMU process: CPU quota, memory and thread caps,
and the host CPUs it may run on (a pet's pinned cpuset).

Inside the guest the agent enforces the sandbox's pids and memory limits; out
here the host holds QEMU itself, so a fractional `vcpus` becomes a CPU quota
and a runaway QEMU cannot take the host's memory. Works on cgroup v1 (hybrid)
and v2 hosts; the cgroup sits beside the oci backend's under /corral/<install>.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from corral._sys import cgroups

__all__ = ["HostCgroup"]

_PERIOD_US = 100_000
# QEMU's own memory beyond guest RAM: TCG's translation cache (64 MiB), device
# state, thread stacks, migration buffers.
OVERHEAD_BYTES = 384 << 20
QEMU_THREADS = 512


class HostCgroup:
    def __init__(self, path: str, root: Path = cgroups.CGROUP_ROOT) -> None:
        self.path = path
        self.root = root
        self.unified = cgroups.is_unified(root)

    def _dirs(self) -> dict[str, Path]:
        rel = self.path.lstrip("/")
        if self.unified:
            return {"all": self.root / rel}
        return {c: self.root / c / rel for c in ("cpu", "cpuacct", "cpuset", "memory", "pids")}

    def create(self, *, vcpus: float, memory: int, cpuset: str | None = None) -> None:
        """Make the cgroup with a CPU quota of `vcpus`, room for `memory` of guest RAM
        and, with `cpuset`, only those host CPUs."""
        quota = max(1000, math.ceil(vcpus * _PERIOD_US))
        limit = memory + OVERHEAD_BYTES
        for name, directory in self._dirs().items():
            if name != "all" and not (self.root / name).is_dir():
                continue  # a v1 controller this host does not mount
            directory.mkdir(parents=True, exist_ok=True)
            if self.unified:
                _enable_controllers(directory)
                if cpuset:
                    _write(directory / "cpuset.cpus", cpuset)
                _write(directory / "cpu.max", f"{quota} {_PERIOD_US}")
                _write(directory / "memory.max", str(limit))
                _write(directory / "pids.max", str(QEMU_THREADS))
            elif name == "cpu":
                _write(directory / "cpu.cfs_period_us", str(_PERIOD_US))
                _write(directory / "cpu.cfs_quota_us", str(quota))
            elif name == "memory":
                _write(directory / "memory.limit_in_bytes", str(limit))
                with contextlib.suppress(OSError):
                    _write(directory / "memory.memsw.limit_in_bytes", str(limit))
            elif name == "pids":
                _write(directory / "pids.max", str(QEMU_THREADS))
            elif name == "cpuset":
                _inherit_cpuset(self.root / "cpuset", directory)
                if cpuset:
                    _write(directory / "cpuset.cpus", cpuset)

    def set_cpuset(self, cpuset: str) -> None:
        """Move every QEMU thread onto host CPUs `cpuset` now (OSError if refused)."""
        directory = self._dirs()["all" if self.unified else "cpuset"]
        _write(directory / "cpuset.cpus", cpuset)

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid to, to join (see `join`)."""
        return [str(d / "cgroup.procs") for d in self._dirs().values() if d.is_dir()]

    def cpu_seconds(self) -> float:
        return cgroups.read(self.path, self.root).cpu_seconds

    def memory_bytes(self) -> int:
        return cgroups.read(self.path, self.root).memory_bytes


def join(procs_files: list[str]) -> None:
    """Move the calling process into the cgroup (run in the child before exec)."""
    pid = str(os.getpid()).encode()
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def _enable_controllers(directory: Path) -> None:
    for parent in reversed(directory.parents):
        control = parent / "cgroup.subtree_control"
        if parent == directory or not control.exists():
            continue
        with contextlib.suppress(OSError):
            _write(control, "+cpu +memory +pids")
        with contextlib.suppress(OSError):
            _write(control, "+cpuset")


def _inherit_cpuset(top: Path, directory: Path) -> None:
    """cgroup v1 makes a cpuset group with no CPUs and no memory nodes, and a
    process cannot join it: give each level under `top` its parent's."""
    levels = [directory, *directory.parents]
    for level in reversed(levels[: levels.index(top)]):
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (level / name).read_text().strip():
                _write(level / name, (level.parent / name).read_text().strip())


def _write(path: Path, value: str) -> None:
    path.write_text(value)

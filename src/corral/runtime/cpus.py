"""What the host can give pets: whole CPUs pinned to one pet each, and memory that
is never overcommitted (the sum of pets' limits stays within the pets' budget).

Both are derived from the live pet records, so they survive server restarts and
need no table of their own; the caller holds the allocation lock while it picks
and inserts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corral.errors import QuotaExceededError

__all__ = ["PetCapacity", "format_cpus", "parse_cpus"]

# Memory the host keeps for itself (kernel, server, ephemeral sandboxes).
HOST_MEMORY_RESERVE = 0.25


def parse_cpus(text: str | None) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5}; None or '' -> set()."""
    cpus: set[int] = set()
    for part in (text or "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def host_memory() -> int:
    with open("/proc/meminfo", encoding="ascii") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal missing from /proc/meminfo")


@dataclass(frozen=True, slots=True)
class PetCapacity:
    """The CPUs pets may be pinned to and the memory pets may take in all."""

    cpus: frozenset[int]
    memory: int

    @classmethod
    def of_host(cls) -> PetCapacity:
        return cls(
            frozenset(os.sched_getaffinity(0)),
            int(host_memory() * (1 - HOST_MEMORY_RESERVE)),
        )

    def pick_cpus(self, vcpus: float, taken: Iterable[int], asked: str | None = None) -> str:
        """A cpuset of ceil(vcpus) CPUs no other pet holds (or `asked`, if all free);
        QuotaExceededError naming what is taken when there are not enough."""
        busy = set(taken)
        free = sorted(self.cpus - busy)
        if asked is not None:
            wanted = parse_cpus(asked)
            if not wanted <= self.cpus:
                raise QuotaExceededError(
                    f"cpuset '{asked}' is not on this host (pets may use CPUs"
                    f" {format_cpus(self.cpus)})",
                    hint="leave cpuset out to have free CPUs picked",
                )
            if wanted & busy:
                raise QuotaExceededError(
                    f"CPUs {format_cpus(wanted & busy)} are pinned to other pets",
                    hint=f"free CPUs: {format_cpus(free) or 'none'}; leave cpuset out to"
                    " have free ones picked",
                )
            return format_cpus(wanted)
        count = max(1, math.ceil(vcpus - 1e-9))
        if count > len(free):
            raise QuotaExceededError(
                f"a pet needs {count} CPU(s) of its own and {len(free)} of this host's"
                f" {len(self.cpus)} are free (pinned: {format_cpus(busy) or 'none'})",
                hint="destroy a pet, or ask for fewer vCPUs",
            )
        return format_cpus(free[:count])

    def check_memory(self, memory: int, reserved: Sequence[int]) -> None:
        """QuotaExceededError when `memory` more would overcommit the pets' budget."""
        used = sum(reserved)
        if used + memory > self.memory:
            raise QuotaExceededError(
                f"a pet of {memory >> 20} MiB would overcommit memory: pets hold"
                f" {used >> 20} MiB of the {self.memory >> 20} MiB this host gives pets",
                hint="destroy a pet, or ask for less memory",
            )

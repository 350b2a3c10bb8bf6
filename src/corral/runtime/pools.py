"""Warm pools: sandboxes kept ready per (template, runtime, resources), handed out by claim.

`PoolManager` runs beside a `SandboxManager` (in `corral serve`, or in any program
using the Python API): it refills pools in the background, replaces members past
their idle age, and claims - an atomic take of a ready member from the store, or a
cold create when the pool is empty (`Claim.from_pool` says which).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from corral.backends.base import Capability
from corral.errors import CorralError, QuotaExceededError, UnsupportedError, UserError
from corral.runtime.admission import limits_for
from corral.runtime.manager import SandboxManager
from corral.runtime.owners import owner_alive, this_process
from corral.runtime.state import SandboxState
from corral.spec.template import Template, load_template, parse_template
from corral.store import ClaimChanges, Pool, SandboxRecord
from corral.store.pools import merged_labels

log = logging.getLogger("corral.pools")


@runtime_checkable
class Primes(Protocol):
    """A backend that can make a sandbox's first command start faster (the oci
    backend keeps a standby process waiting inside it for that command)."""

    async def prime(self, sandbox_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Claim:
    """A claimed sandbox: from the pool, or cold-created when the pool was empty."""

    record: SandboxRecord
    pool: str
    from_pool: bool
    seconds: float  # how long the claim took


@dataclass(frozen=True, slots=True)
class PoolStatus:
    pool: Pool
    idle: int  # members ready to be claimed
    starting: int  # members being created
    error: str | None = None  # why the last refill in this process fell short


ClaimObserver = Callable[[Claim], None]
# How long a claim may use a pool definition it read before (see PoolManager._pool).
POOL_CACHE_SECONDS = 2.0


class PoolManager:
    """Warm pools over one SandboxManager: add/list/remove, claim, refill.

    `start()` runs the refill loop as a task (woken early by every claim);
    `async with PoolManager(manager):` starts and stops it. `interval` is the
    longest wait between passes; `concurrency` bounds creates per pool and pass.
    """

    def __init__(
        self,
        manager: SandboxManager,
        *,
        interval: float = 1.0,
        concurrency: int = 2,
        observers: Iterable[ClaimObserver] = (),
    ) -> None:
        self.manager = manager
        self.store = manager.store
        self.interval = interval
        self.concurrency = concurrency
        self.observers = list(observers)
        self.errors: dict[tuple[str, str], str] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refilling: set[tuple[str, str]] = set()
        self._cached: dict[tuple[str, str], tuple[Pool, float]] = {}
        self.snapshots_dir = manager.images.root.parent / "pool-snapshots"

    async def __aenter__(self) -> PoolManager:
        self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- pools ----------------------------------------------------------------

    async def add(
        self,
        name: str,
        template: str | Path | Template = "default",
        *,
        size: int,
        tenant: str = "local",
        runtime: str | None = None,
        memory: str | int | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        disk: str | int | None = None,
        cpuset: str | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        max_idle: float | None = None,
        snapshot: bool = False,
        fill: bool = False,
    ) -> Pool:
        """Define a pool of `size` members of `template` (its whole definition is kept,
        so later edits of the template file do not change the pool). `fill` waits
        until the members are ready; otherwise the refill loop makes them. With
        `snapshot` (backends with Capability.SNAPSHOT) members wait snapshotted,
        holding no memory or CPU, and a claim restores one."""
        spec = template if isinstance(template, Template) else load_template(template)
        backend = self.manager.backend
        if snapshot and Capability.SNAPSHOT not in backend.capabilities:
            raise UnsupportedError(
                f"backend '{backend.name}' cannot snapshot sandboxes",
                backend=backend.name,
                hint="leave out snapshot (members then wait running)",
            )
        if spec.kind != "ephemeral":
            raise UserError(
                f"template '{spec.name}' is persistent; pools hold ephemeral sandboxes",
                hint="create pets one by one, or use an ephemeral template",
            )
        if max_idle is not None and max_idle <= 0:
            raise UserError("the maximum idle age must be positive", hint="e.g. --max-idle 600")
        runtime = self.manager._choose_runtime(spec, runtime)
        resources = {"memory": memory, "cpus": cpus, "pids": pids, "disk": disk, "cpuset": cpuset}
        limits_for(spec, **resources)  # a bad size is the caller's error now, not at refill
        pool = Pool(
            tenant=tenant,
            name=name,
            template=spec.name,
            target_size=size,
            runtime=runtime,
            spec={
                "backend": self.manager.backend.name,
                "template_spec": spec.model_dump(mode="json"),
                "resources": {k: v for k, v in resources.items() if v is not None},
                "env": dict(env or {}),
                "labels": dict(labels or {}),
                "snapshot": snapshot,
            },
            max_idle_seconds=max_idle,
        )
        self.store.pools.add(pool)
        if fill:
            await self.refill_pool(pool, self.store.pools.members(tenant, name))
        else:
            self.wake()
        return pool

    def get(self, name: str, *, tenant: str = "local") -> PoolStatus:
        pool = self.store.pools.get(tenant, name)
        return self._status(pool, self.store.pools.members(tenant, name))

    def list(self, *, tenant: str | None = None) -> builtins.list[PoolStatus]:
        members = _by_pool(self.store.pools.all_members())
        return [
            self._status(pool, members.get((pool.tenant, pool.name), []))
            for pool in self.store.pools.list(tenant)
        ]

    def resize(self, name: str, size: int, *, tenant: str = "local") -> PoolStatus:
        self.store.pools.resize(tenant, name, size)
        self.wake()
        return self.get(name, tenant=tenant)

    async def remove(self, name: str, *, tenant: str = "local") -> builtins.list[str]:
        """Delete the pool and destroy its idle members (claimed ones are not its
        any more); the ids destroyed. Members still starting go at the next pass."""
        self.store.pools.remove(tenant, name)
        self.errors.pop((tenant, name), None)
        self._cached.pop((tenant, name), None)
        destroyed = []
        for member in self.store.pools.members(tenant, name):
            if await self._discard(member):
                destroyed.append(member.id)
        return destroyed

    def _pool(self, tenant: str, name: str, *, fresh: bool = False) -> Pool:
        """The pool's definition, read at most every POOL_CACHE_SECONDS for claims
        (it only changes by resize, which claims do not read). A claim's member
        comes from the store's compare-and-set, never from this cache."""
        key = (tenant, name)
        cached = self._cached.get(key)
        now = time.monotonic()
        if not fresh and cached is not None and now - cached[1] < POOL_CACHE_SECONDS:
            return cached[0]
        pool = self.store.pools.get(tenant, name)
        self._cached[key] = (pool, now)
        return pool

    def _status(self, pool: Pool, members: builtins.list[SandboxRecord]) -> PoolStatus:
        states = [m.state for m in members]
        snapshotting = states.count(SandboxState.RUNNING) if pool.snapshot else 0
        return PoolStatus(
            pool,
            idle=states.count(pool.ready_state),
            starting=states.count(SandboxState.CREATING) + snapshotting,
            error=self.errors.get((pool.tenant, pool.name)),
        )

    # -- claim ------------------------------------------------------------------

    async def claim(
        self,
        pool_name: str,
        *,
        tenant: str = "local",
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        metadata: Mapping[str, object] | None = None,
        name: str | None = None,
    ) -> Claim:
        """A running sandbox for `tenant`, out of the pool for good: the oldest ready
        member (taken atomically in the store), or, when none is ready, a cold create
        with the pool's settings. The claimant's timeout, labels, metadata and name
        are set on it either way."""
        started = time.perf_counter()
        pool = self._pool(tenant, pool_name)
        if timeout is not None and timeout <= 0:
            raise UserError("a timeout must be positive", hint="e.g. 600 (seconds)")
        seconds = timeout if timeout is not None else float(pool.spec["template_spec"]["timeout"])
        changes = ClaimChanges(
            name=name,
            labels=merged_labels(pool, labels),
            metadata=dict(metadata or {}),
            expires_at=time.time() + seconds,
        )
        record = self.store.pools.claim(tenant, pool_name, changes, state=pool.ready_state)
        if record is not None and pool.snapshot:
            record = await self._restore(record)
        from_pool = record is not None
        if record is None:
            pool = self._pool(tenant, pool_name, fresh=True)  # NotFoundError if removed
            record = await self._create(
                pool, timeout=seconds, labels=changes.labels, metadata=changes.metadata, name=name
            )
        self.wake()  # replace the member taken (or the one that was missing)
        claim = Claim(record, pool_name, from_pool, time.perf_counter() - started)
        for observer in self.observers:
            observer(claim)
        return claim

    # -- refill -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="corral-pools")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """Run the next refill pass now (after a claim, a new pool, a resize)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.refill()
            except CorralError as error:
                log.warning("pool refill pass failed: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def refill(self) -> dict[str, builtins.list[str]]:
        """One pass over this backend's pools: drop failed members, replace those past
        the idle age, destroy members of removed pools and above target, and create
        members up to each pool's target. The ids touched, by what happened."""
        report: dict[str, builtins.list[str]] = {"created": [], "discarded": []}
        pools = {(p.tenant, p.name): p for p in self.store.pools.list()}
        members = _by_pool(self.store.pools.all_members())
        for key, orphans in members.items():
            if key not in pools:
                for member in orphans:
                    if member.backend == self.manager.backend.name and await self._discard(member):
                        report["discarded"].append(member.id)
        for key, pool in pools.items():
            if pool.backend not in (None, self.manager.backend.name):
                continue
            try:
                await self.refill_pool(pool, members.get(key, []), report)
            except CorralError as error:
                log.warning("refilling pool %s/%s failed: %s", pool.tenant, pool.name, error)
        return report

    async def refill_pool(
        self,
        pool: Pool,
        members: builtins.list[SandboxRecord],
        report: dict[str, builtins.list[str]] | None = None,
    ) -> None:
        """Bring one pool to its target (see `refill`)."""
        key = (pool.tenant, pool.name)
        if key in self._refilling:
            return  # a pass in this process is already on it
        self._refilling.add(key)
        report = {"created": [], "discarded": []} if report is None else report
        try:
            now = time.time()
            ready: builtins.list[SandboxRecord] = []
            stale: builtins.list[SandboxRecord] = []
            coming = 0
            for member in members:
                if member.state == pool.ready_state:
                    aged = pool.max_idle_seconds is not None and (
                        now - member.created_at > pool.max_idle_seconds
                    )
                    (stale if aged else ready).append(member)
                elif member.state == SandboxState.CREATING and owner_alive(member.owner):
                    coming += 1
                elif member.state == SandboxState.RUNNING and owner_alive(member.owner):
                    coming += 1  # a snapshot pool's member being snapshotted
                elif member.state != SandboxState.CREATING:
                    stale.append(member)  # failed (or lost): replaced below
            excess = len(ready) + coming - pool.target_size
            if excess > 0:
                stale.extend(ready[:excess])
            for member in stale:
                if await self._discard(member):
                    report["discarded"].append(member.id)
            missing = pool.target_size - min(len(ready) + coming, pool.target_size)
            while missing > 0:
                batch = min(missing, self.concurrency)
                results = await asyncio.gather(
                    *(self._create(pool, member=True) for _ in range(batch)),
                    return_exceptions=True,
                )
                failures = [r for r in results if isinstance(r, BaseException)]
                report["created"].extend(r.id for r in results if isinstance(r, SandboxRecord))
                missing -= batch
                if failures:
                    first = failures[0]
                    if not isinstance(first, CorralError):
                        raise first
                    self.errors[key] = str(first)
                    if not isinstance(first, QuotaExceededError):
                        log.warning("pool %s/%s: a member failed: %s", *key, first)
                    return
            self.errors.pop(key, None)
        finally:
            self._refilling.discard(key)

    async def _create(self, pool: Pool, *, member: bool = False, **claimant: Any) -> SandboxRecord:
        template = parse_template(dict(pool.spec["template_spec"]), source=f"<pool {pool.name}>")
        resources = dict(pool.spec.get("resources", {}))
        record = await self.manager.create(
            template,
            runtime=pool.runtime,
            env=dict(pool.spec.get("env", {})),
            tenant=pool.tenant,
            pool=pool.name if member else None,
            **(claimant if claimant else {"labels": dict(pool.spec.get("labels", {}))}),
            **resources,
        )
        backend = self.manager.backend
        if member and pool.snapshot:
            return await self._snapshot(record)
        if member and isinstance(backend, Primes):
            try:
                await backend.prime(record.id)
            except CorralError as error:  # the member still works, only its first exec is slower
                log.warning("priming %s failed: %s", record.id, error)
        return record

    async def _discard(self, member: SandboxRecord) -> bool:
        """Destroy an idle member if it is still idle (taken with the claim's CAS)."""
        assert member.pool is not None
        if not self.store.pools.take(member.id, member.tenant, member.pool, owner=this_process()):
            return False
        with contextlib.suppress(CorralError):
            await self.manager.destroy(member.id)
        shutil.rmtree(self.snapshots_dir / member.id, ignore_errors=True)
        return True

    async def _snapshot(self, member: SandboxRecord) -> SandboxRecord:
        """Snapshot a new member of a snapshot pool: it waits STOPPED until claimed.
        On failure it is destroyed and the error raised."""
        self.store.update(member.id, owner=this_process())  # refills elsewhere: not stale
        try:
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
            await self.manager.backend.snapshot(member.id, self.snapshots_dir / member.id)
        except BaseException:
            await asyncio.shield(self._discard(member))
            raise
        return self.store.update(member.id, state=SandboxState.STOPPED, owner=None)

    async def _restore(self, record: SandboxRecord) -> SandboxRecord | None:
        """Bring a claimed snapshot-pool member back RUNNING; None (and it destroyed)
        when the backend cannot, so the claim falls back to a cold create."""
        source = self.snapshots_dir / record.id
        try:
            await self.manager.backend.restore(record.id, source)
        except CorralError as error:
            log.warning("restoring %s failed, creating cold instead: %s", record.id, error)
            with contextlib.suppress(CorralError):
                self.store.update(record.id, state=SandboxState.DESTROYING)
                await self.manager.destroy(record.id)
            return None
        finally:
            shutil.rmtree(source, ignore_errors=True)
        return self.store.update(record.id, state=SandboxState.RUNNING)


def _by_pool(
    members: builtins.list[SandboxRecord],
) -> dict[tuple[str, str], builtins.list[SandboxRecord]]:
    grouped: dict[tuple[str, str], builtins.list[SandboxRecord]] = {}
    for member in members:
        if member.pool is not None:
            grouped.setdefault((member.tenant, member.pool), []).append(member)
    return grouped

"""Warm pools in the store: their definitions, and the atomic claim of an idle member.

A member idles with `sandboxes.pool` set to its pool's name. Claiming it is one
compare-and-set (`pool = NAME` -> NULL) in a single statement, so a member is
handed out once, whichever process or replica asks.
"""

from __future__ import annotations

import builtins
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError

from corral.errors import ConflictError, NotFoundError, StoreError, UserError
from corral.store.schema import pools, sandboxes

if TYPE_CHECKING:
    from corral.store.db import SandboxRecord, Store

_POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# A claim retries when another claimant took the member it aimed at; each retry
# aims at a member that was idle a moment ago, so this bound is only reached when
# the pool is drained faster than it can be read (the claim then falls back cold).
_CLAIM_ATTEMPTS = 64


@dataclass(frozen=True, slots=True)
class Pool:
    """A warm pool: what its members are made of, and how many to keep ready."""

    tenant: str
    name: str
    template: str
    target_size: int
    runtime: str | None = None
    # The create options every member gets: template_spec, backend, limits, env, labels.
    spec: Mapping[str, Any] = field(default_factory=dict)
    max_idle_seconds: float | None = None
    created_at: float = field(default_factory=time.time)

    @property
    def backend(self) -> str | None:
        backend = self.spec.get("backend")
        return None if backend is None else str(backend)

    @property
    def snapshot(self) -> bool:
        """Members wait snapshotted (STOPPED, restored on claim) instead of running."""
        return bool(self.spec.get("snapshot", False))

    @property
    def ready_state(self) -> str:
        """The state of a member ready to be claimed."""
        return "stopped" if self.snapshot else "running"


@dataclass(frozen=True, slots=True)
class ClaimChanges:
    """What a claim writes on the member it takes: the claimant's view of it."""

    owner: str | None = None
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None


def _pool(row: Any) -> Pool:
    data = dict(row._mapping)
    data["spec"] = json.loads(data["spec"])
    return Pool(**data)


class Pools:
    """Pool rows and the member operations that must be atomic (claim, take)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, pool: Pool) -> Pool:
        if not _POOL_NAME.fullmatch(pool.name):
            raise UserError(
                f"'{pool.name}' is not a valid pool name",
                hint="use lowercase letters, digits, '.', '_' and '-' (at most 63)",
            )
        if pool.target_size < 0:
            raise UserError("a pool's size cannot be negative", hint="e.g. --size 4")
        values = {
            "tenant": pool.tenant,
            "name": pool.name,
            "template": pool.template,
            "runtime": pool.runtime,
            "spec": json.dumps(dict(pool.spec), sort_keys=True),
            "target_size": pool.target_size,
            "max_idle_seconds": pool.max_idle_seconds,
            "created_at": pool.created_at,
        }
        try:
            with self.store._begin() as conn:
                conn.execute(pools.insert().values(**values))
        except StoreError as error:
            if isinstance(error.__cause__, IntegrityError):
                raise ConflictError(
                    f"a pool named '{pool.name}' already exists",
                    hint="choose another name, or remove the pool first (`corral pool rm`)",
                ) from None
            raise
        return pool

    def get(self, tenant: str, name: str) -> Pool:
        query = select(pools).where((pools.c.tenant == tenant) & (pools.c.name == name))
        with self.store._begin() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no pool '{name}'", hint="list pools with `corral pool ls`")
        return _pool(row)

    def list(self, tenant: str | None = None) -> builtins.list[Pool]:
        query = select(pools).order_by(pools.c.tenant, pools.c.name)
        if tenant is not None:
            query = query.where(pools.c.tenant == tenant)
        with self.store._begin() as conn:
            return [_pool(row) for row in conn.execute(query)]

    def resize(self, tenant: str, name: str, target_size: int) -> Pool:
        if target_size < 0:
            raise UserError("a pool's size cannot be negative", hint="e.g. --size 4")
        statement = (
            pools.update()
            .where((pools.c.tenant == tenant) & (pools.c.name == name))
            .values(target_size=target_size)
        )
        with self.store._begin() as conn:
            if conn.execute(statement).rowcount == 0:
                raise NotFoundError(f"no pool '{name}'", hint="list pools with `corral pool ls`")
        return self.get(tenant, name)

    def remove(self, tenant: str, name: str) -> None:
        """Delete the pool's row; its idle members stay until taken (see `take`)."""
        statement = pools.delete().where((pools.c.tenant == tenant) & (pools.c.name == name))
        with self.store._begin() as conn:
            if conn.execute(statement).rowcount == 0:
                raise NotFoundError(f"no pool '{name}'", hint="list pools with `corral pool ls`")

    def members(self, tenant: str, name: str) -> builtins.list[SandboxRecord]:
        """The sandboxes idling in the pool (any state: creating ones count as coming)."""
        from corral.store.db import _row_to_record

        query = (
            select(sandboxes)
            .where((sandboxes.c.tenant == tenant) & (sandboxes.c.pool == name))
            .order_by(sandboxes.c.created_at, sandboxes.c.id)
        )
        with self.store._begin() as conn:
            return [_row_to_record(row) for row in conn.execute(query)]

    def all_members(self) -> builtins.list[SandboxRecord]:
        """Every sandbox idling in any pool (one query for a refill pass)."""
        from corral.store.db import _row_to_record

        query = (
            select(sandboxes)
            .where(sandboxes.c.pool.is_not(None))
            .order_by(sandboxes.c.created_at, sandboxes.c.id)
        )
        with self.store._begin() as conn:
            return [_row_to_record(row) for row in conn.execute(query)]

    def claim(
        self, tenant: str, name: str, changes: ClaimChanges, *, state: str = "running"
    ) -> SandboxRecord | None:
        """Take the oldest member in `state` (ready) out of the pool and write `changes`
        on it, atomically; None when the pool has no ready member left."""
        from corral.store.db import _row_to_record

        params = {
            "c_tenant": tenant,
            "c_pool": name,
            "c_state": state,
            "c_name": changes.name,
            "c_owner": changes.owner,
            "c_labels": json.dumps(dict(changes.labels), sort_keys=True),
            "c_meta": json.dumps(dict(changes.metadata), sort_keys=True),
            "c_expires": changes.expires_at,
            "c_now": time.time(),
        }
        for _attempt in range(_CLAIM_ATTEMPTS):
            try:
                with self.store._begin() as conn:
                    row = conn.execute(_CLAIM, params).first()
                    left = 0 if row is not None else conn.execute(_IDLE_COUNT, params).scalar()
            except StoreError as error:
                if isinstance(error.__cause__, IntegrityError) and changes.name:
                    raise ConflictError(
                        f"a sandbox named '{changes.name}' already exists",
                        hint="choose another name, or destroy the other sandbox first",
                    ) from None
                raise
            if row is not None:
                return _row_to_record(row)
            if not left:
                return None
        return None

    def take(self, sandbox_id: str, tenant: str, name: str, *, owner: str) -> bool:
        """Take one member out of its pool to destroy it (aged out, over target, pool
        removed): the same compare-and-set as a claim, so a claimant never gets a
        member that is being destroyed. False when someone else got it first."""
        statement = (
            sandboxes.update()
            .where(
                (sandboxes.c.id == sandbox_id)
                & (sandboxes.c.tenant == tenant)
                & (sandboxes.c.pool == name)
                # A member still being created is left to its creator; the next
                # refill pass takes it once it runs.
                & (sandboxes.c.state != "creating")
            )
            .values(pool=None, state="destroying", owner=owner, updated_at=time.time())
        )
        with self.store._begin() as conn:
            return bool(conn.execute(statement).rowcount)


# The claim, built once (a claim is on the hot path: building the statement costs
# more than running it). The compare-and-set: `pool = :c_pool` is checked again on
# the row being updated, so two claimants that picked the same member cannot both get
# it (PostgreSQL re-evaluates the condition after the first commits; SQLite runs the
# statement under its write lock). The loser retries with the next member.
_READY = (
    (sandboxes.c.tenant == bindparam("c_tenant"))
    & (sandboxes.c.pool == bindparam("c_pool"))
    & (sandboxes.c.state == bindparam("c_state"))
)
OLDEST_READY = (
    select(sandboxes.c.id).where(_READY).order_by(sandboxes.c.created_at, sandboxes.c.id).limit(1)
)  # served by the index ix_sandboxes_pool_claim alone
_OLDEST = OLDEST_READY.scalar_subquery()
_CLAIM = (
    sandboxes.update()
    .where((sandboxes.c.id == _OLDEST) & _READY)
    .values(
        pool=None,
        name=bindparam("c_name"),
        owner=bindparam("c_owner"),
        labels=bindparam("c_labels"),
        meta=bindparam("c_meta"),
        expires_at=bindparam("c_expires"),
        updated_at=bindparam("c_now"),
    )
    .returning(*sandboxes.c)
)
_IDLE_COUNT = select(func.count()).where(_READY)


def merged_labels(pool: Pool, labels: Mapping[str, str] | None) -> dict[str, str]:
    """A claimed member's labels: the pool's, then the claimant's on top."""
    return {**dict(pool.spec.get("labels", {})), **dict(labels or {})}

"""Sandbox records: one row per sandbox, so every process sees the same state.

SQLite in the state directory by default (WAL, busy timeout), PostgreSQL
through the same Core statements for a cluster. Migrations are Alembic's; a
database already at HEAD_REVISION skips importing Alembic (CLI start-up time).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Update, bindparam, case, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from corral.errors import ConflictError, NotFoundError, StoreError
from corral.store.pools import Pools
from corral.store.schema import HEAD_REVISION, sandboxes, tenants
from corral.store.tenants import Tenants


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    """What the store knows about one sandbox."""

    id: str
    template: str
    backend: str
    state: str
    tenant: str = "local"
    name: str | None = None
    runtime: str | None = None
    kind: str = "ephemeral"
    image_digest: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    owner: str | None = None
    pool: str | None = None  # the warm pool it idles in, until claimed
    restarts: int = 0  # restarts by its restart policy (persistent sandboxes)

    @property
    def limits(self) -> Mapping[str, Any]:
        limits: Mapping[str, Any] = self.spec.get("limits", {})
        return limits

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "template": self.template,
            "backend": self.backend,
            "runtime": self.runtime,
            "state": self.state,
            "kind": self.kind,
            "image_digest": self.image_digest,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "labels": dict(self.labels),
            "spec": dict(self.spec),
            "error": self.error,
            "metadata": dict(self.metadata),
        }


def _row_to_record(row: Any) -> SandboxRecord:
    data = dict(row._mapping)
    data["labels"] = json.loads(data["labels"])
    data["spec"] = json.loads(data["spec"])
    data["metadata"] = json.loads(data.pop("meta"))
    return SandboxRecord(**data)


def _columns(values: Mapping[str, Any]) -> dict[str, Any]:
    """Record fields as column values (JSON columns serialized)."""
    columns = dict(values)
    for key in ("labels", "spec"):
        if key in columns:
            columns[key] = json.dumps(dict(columns[key]), sort_keys=True)
    if "metadata" in columns:
        columns["meta"] = json.dumps(dict(columns.pop("metadata")), sort_keys=True)
    return columns


@dataclass(frozen=True, slots=True)
class Usage:
    """What a tenant's live sandboxes hold."""

    sandboxes: int = 0
    vcpus: float = 0.0
    memory: int = 0


# States whose sandboxes count against a tenant's quota.
LIVE_STATES = ("creating", "running", "paused", "stopped")


class Store:
    """Sandbox records behind SQLAlchemy Core; safe to use from several processes."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = create_engine(url)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"cannot open the store at {url}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrate()
        self.tenants = Tenants(self)
        self.pools = Pools(self)

    @classmethod
    def open(cls, database_url: str | None, state_dir: Path) -> Store:
        """The configured database, else SQLite in the state directory."""
        return cls(database_url) if database_url else cls.for_state_dir(state_dir)

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> Store:
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{state_dir / 'corral.db'}")

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"store error: {exc}", hint="check the database") from exc

    def _migrate(self) -> None:
        try:
            with self.engine.connect() as conn:
                current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError:
            current = None
        if current == HEAD_REVISION:
            return
        from alembic import command
        from alembic.config import Config

        with self._begin() as conn:
            config = Config()
            config.set_main_option("script_location", "corral.store:migrations")
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """StoreError unless the database answers."""
        with self._begin() as conn:
            conn.execute(text("SELECT 1"))

    # -- sandboxes ------------------------------------------------------------

    def insert(
        self, record: SandboxRecord, *, check: Callable[[Usage], None] | None = None
    ) -> None:
        """Add `record`. `check` sees the tenant's usage in the same transaction (with
        the tenant's row locked where the database can) and raises to refuse."""
        values = _columns(record.to_json())
        values["updated_at"] = record.updated_at
        values["owner"] = record.owner
        values["pool"] = record.pool
        values["restarts"] = record.restarts
        try:
            with self._begin() as conn:
                if check is not None:
                    # A no-op write first: it takes the tenant's row lock (PostgreSQL)
                    # or the database's write lock (SQLite) before usage is read, so
                    # concurrent creates of one tenant check their quota one by one.
                    conn.execute(
                        tenants.update()
                        .where(tenants.c.name == record.tenant)
                        .values(name=tenants.c.name)
                    )
                    check(self._usage(conn, record.tenant))
                conn.execute(_INSERT, values)  # the columns come with the values
        except StoreError as error:
            if isinstance(error.__cause__, IntegrityError) and record.name:
                raise ConflictError(
                    f"a sandbox named '{record.name}' already exists",
                    hint="choose another name, or destroy the other sandbox first",
                ) from None
            raise

    def usage(self, tenant: str) -> Usage:
        with self._begin() as conn:
            return self._usage(conn, tenant)

    @staticmethod
    def _usage(conn: Connection, tenant: str) -> Usage:
        rows = conn.execute(
            select(sandboxes.c.spec).where(
                (sandboxes.c.tenant == tenant) & sandboxes.c.state.in_(LIVE_STATES)
            )
        )
        count, vcpus, memory = 0, 0.0, 0
        for (spec,) in rows:
            limits = json.loads(spec).get("limits", {})
            count += 1
            vcpus += float(limits.get("vcpus", 0))
            memory += int(limits.get("memory", 0))
        return Usage(count, vcpus, memory)

    def get(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        with self._begin() as conn:
            if tenant is None:
                row = conn.execute(_GET, {"g_key": sandbox_id}).first()
            else:
                row = conn.execute(_GET_OWN, {"g_key": sandbox_id, "g_tenant": tenant}).first()
        if row is None:
            raise NotFoundError(
                f"no sandbox '{sandbox_id}'",
                sandbox_id=sandbox_id,
                hint="list sandboxes with `corral ls`",
            )
        return _row_to_record(row)

    def list(
        self,
        *,
        tenant: str | None = None,
        states: tuple[str, ...] | None = None,
        label: tuple[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        backend: str | None = None,
        expired_before: float | None = None,
        kind: str | None = None,
    ) -> list[SandboxRecord]:
        query = select(sandboxes).order_by(sandboxes.c.created_at, sandboxes.c.id)
        if kind is not None:
            query = query.where(sandboxes.c.kind == kind)
        if tenant is not None:
            query = query.where(sandboxes.c.tenant == tenant)
        if states:
            query = query.where(sandboxes.c.state.in_(states))
        if backend is not None:
            query = query.where(sandboxes.c.backend == backend)
        if expired_before is not None:
            query = query.where(sandboxes.c.expires_at <= expired_before)
        with self._begin() as conn:
            records = [_row_to_record(row) for row in conn.execute(query)]
        wanted = dict(labels or {})
        if label is not None:
            wanted[label[0]] = label[1]
        return [r for r in records if all(r.labels.get(k) == v for k, v in wanted.items())]

    def update(self, sandbox_id: str, **changes: Any) -> SandboxRecord:
        changes = _columns(changes)
        changes["updated_at"] = time.time()
        params = {f"u_{column}": value for column, value in changes.items()}
        params["u_key"] = sandbox_id
        with self._begin() as conn:
            row = conn.execute(_update_statement(tuple(changes)), params).first()
        if row is None:
            raise NotFoundError(f"no sandbox '{sandbox_id}'", sandbox_id=sandbox_id)
        return _row_to_record(row)

    def mark_destroying(
        self, sandbox_id: str, owner: str, *, tenant: str | None = None
    ) -> SandboxRecord | None:
        """Move the sandbox with this id (of `tenant`, when given) to DESTROYING with
        `owner` in one statement; one already DESTROYING keeps its owner. The record
        as it was, or None when no such id is in a state that may be destroyed (a
        name, an unknown id: the caller looks it up to say why)."""
        params = {"d_key": sandbox_id, "d_owner": owner, "d_now": time.time()}
        statement = _MARK_DESTROYING
        if tenant is not None:
            statement, params["d_tenant"] = _MARK_OWN_DESTROYING, tenant
        with self._begin() as conn:
            row = conn.execute(statement, params).first()
        return None if row is None else _row_to_record(row)

    def delete(self, sandbox_id: str) -> None:
        with self._begin() as conn:
            conn.execute(_DELETE, {"x_key": sandbox_id})

    def ids(self) -> set[str]:
        with self._begin() as conn:
            return {row[0] for row in conn.execute(select(sandboxes.c.id))}


# The lookup every verb starts with, built once: building the statement costs more
# than running it (~0.1 ms of each exec's 0.3 ms of store time).
_GET = select(sandboxes).where(
    (sandboxes.c.id == bindparam("g_key")) | (sandboxes.c.name == bindparam("g_key"))
)
_GET_OWN = _GET.where(sandboxes.c.tenant == bindparam("g_tenant"))
_INSERT = sandboxes.insert()
_DELETE = sandboxes.delete().where(sandboxes.c.id == bindparam("x_key"))


@functools.lru_cache(maxsize=64)
def _update_statement(columns: tuple[str, ...]) -> Update:
    """UPDATE of `columns` (bound as u_<column>) on the row with id u_key, built once
    per set of columns."""
    return (
        sandboxes.update()
        .where(sandboxes.c.id == bindparam("u_key"))
        .values({column: bindparam(f"u_{column}") for column in columns})
        .returning(*sandboxes.c)
    )


# Destroy's first step, in place of a read and a write: every state but DESTROYED
# may go to DESTROYING (runtime/state.py), and a second destroy leaves the first's
# owner and time alone.
_DESTROYABLE = ("creating", "running", "paused", "stopped", "failed", "destroying")
_was_destroying = sandboxes.c.state == "destroying"
_MARK_DESTROYING = (
    sandboxes.update()
    .where((sandboxes.c.id == bindparam("d_key")) & sandboxes.c.state.in_(_DESTROYABLE))
    .values(
        state="destroying",
        owner=case((_was_destroying, sandboxes.c.owner), else_=bindparam("d_owner")),
        updated_at=case((_was_destroying, sandboxes.c.updated_at), else_=bindparam("d_now")),
    )
    .returning(*sandboxes.c)
)
_MARK_OWN_DESTROYING = _MARK_DESTROYING.where(sandboxes.c.tenant == bindparam("d_tenant"))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


__all__ = ["LIVE_STATES", "SandboxRecord", "Store", "Usage", "replace"]

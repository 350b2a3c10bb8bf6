"""Sandbox records: one row per sandbox, so every process sees the same state.

SQLite in the state directory by default (WAL, busy timeout), PostgreSQL
through the same Core statements for a cluster. Migrations are Alembic's; a
database already at HEAD_REVISION skips importing Alembic (CLI start-up time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from corral.errors import NotFoundError, StoreError
from corral.store.schema import HEAD_REVISION, sandboxes


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
        }


def _row_to_record(row: Any) -> SandboxRecord:
    data = dict(row._mapping)
    data["labels"] = json.loads(data["labels"])
    data["spec"] = json.loads(data["spec"])
    return SandboxRecord(**data)


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

    # -- sandboxes ------------------------------------------------------------

    def insert(self, record: SandboxRecord) -> None:
        values = record.to_json()
        values["labels"] = json.dumps(values["labels"], sort_keys=True)
        values["spec"] = json.dumps(values["spec"], sort_keys=True)
        values["updated_at"] = record.updated_at
        with self._begin() as conn:
            conn.execute(sandboxes.insert().values(**values))

    def get(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        query = select(sandboxes).where(
            (sandboxes.c.id == sandbox_id) | (sandboxes.c.name == sandbox_id)
        )
        if tenant is not None:
            query = query.where(sandboxes.c.tenant == tenant)
        with self._begin() as conn:
            row = conn.execute(query).first()
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
    ) -> list[SandboxRecord]:
        query = select(sandboxes).order_by(sandboxes.c.created_at)
        if tenant is not None:
            query = query.where(sandboxes.c.tenant == tenant)
        if states:
            query = query.where(sandboxes.c.state.in_(states))
        with self._begin() as conn:
            records = [_row_to_record(row) for row in conn.execute(query)]
        if label is not None:
            records = [r for r in records if r.labels.get(label[0]) == label[1]]
        return records

    def update(self, sandbox_id: str, **changes: Any) -> SandboxRecord:
        changes["updated_at"] = time.time()
        if "labels" in changes:
            changes["labels"] = json.dumps(dict(changes["labels"]), sort_keys=True)
        statement = (
            sandboxes.update()
            .where(sandboxes.c.id == sandbox_id)
            .values(**changes)
            .returning(*sandboxes.c)
        )
        with self._begin() as conn:
            row = conn.execute(statement).first()
        if row is None:
            raise NotFoundError(f"no sandbox '{sandbox_id}'", sandbox_id=sandbox_id)
        return _row_to_record(row)

    def delete(self, sandbox_id: str) -> None:
        with self._begin() as conn:
            conn.execute(sandboxes.delete().where(sandboxes.c.id == sandbox_id))

    def ids(self) -> set[str]:
        with self._begin() as conn:
            return {row[0] for row in conn.execute(select(sandboxes.c.id))}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


__all__ = ["SandboxRecord", "Store", "replace"]

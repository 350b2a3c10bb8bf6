"""Table definitions (SQLAlchemy Core). Change them only together with a migration."""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, MetaData, String, Table, Text

metadata = MetaData()

sandboxes = Table(
    "sandboxes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, default="local"),
    Column("name", String(128), nullable=True),
    Column("template", String(255), nullable=False),
    Column("backend", String(64), nullable=False),
    Column("runtime", String(64), nullable=True),
    Column("state", String(32), nullable=False),
    Column("kind", String(32), nullable=False, default="ephemeral"),
    Column("image_digest", String(80), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("labels", Text, nullable=False, default="{}"),
    Column("spec", Text, nullable=False, default="{}"),
    Column("error", Text, nullable=True),
)
Index("ix_sandboxes_state", sandboxes.c.state)
Index("ix_sandboxes_tenant", sandboxes.c.tenant)

# The newest migration; the store skips Alembic entirely when the database has it.
HEAD_REVISION = "0001"

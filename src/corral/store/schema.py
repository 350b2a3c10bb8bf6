"""Table definitions (SQLAlchemy Core). Change them only together with a migration."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

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
    # Free-form JSON the caller attached (labels are for filtering, this is for the rest).
    Column("meta", Text, nullable=False, default="{}"),
    # "host:pid" of the process in the middle of creating/destroying it; a record left
    # in a transition by a process that is gone is settled by reconcile.
    Column("owner", String(160), nullable=True),
    # The warm pool this sandbox idles in, unclaimed (NULL once claimed or never pooled).
    Column("pool", String(128), nullable=True),
    # Times a persistent sandbox's main process was restarted by its restart policy.
    Column("restarts", Integer, nullable=False, default=0),
)
Index("ix_sandboxes_state", sandboxes.c.state)
Index("ix_sandboxes_tenant", sandboxes.c.tenant)
# Names are unique per tenant (NULL names never clash).
Index("ux_sandboxes_tenant_name", sandboxes.c.tenant, sandboxes.c.name, unique=True)
# A pool claim's lookup: the oldest ready member of one tenant's pool, straight from
# the index (a pool-only index lost to the tenant index: every claim scanned all of
# the tenant's sandboxes and sorted them).
Index(
    "ix_sandboxes_pool_claim",
    sandboxes.c.pool,
    sandboxes.c.tenant,
    sandboxes.c.state,
    sandboxes.c.created_at,
    sandboxes.c.id,
)

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("max_sandboxes", Integer, nullable=True),  # NULL: no limit
    Column("max_vcpus", Float, nullable=True),
    Column("max_memory", BigInteger, nullable=True),  # bytes
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # the public part of the key
    Column("tenant", String(64), ForeignKey("tenants.name"), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("admin", Boolean, nullable=False, default=False),
    Column("description", String(255), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)
Index("ix_api_keys_tenant", api_keys.c.tenant)

pools = Table(
    "pools",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("template", String(255), nullable=False),
    Column("runtime", String(64), nullable=True),
    # JSON: the create options every member gets (limits, env, template_spec, ...)
    Column("spec", Text, nullable=False, default="{}"),
    Column("target_size", Integer, nullable=False),
    Column("max_idle_seconds", Float, nullable=True),  # NULL: members never age out
    Column("created_at", Float, nullable=False),
)

# The newest migration; the store skips Alembic entirely when the database has it.
HEAD_REVISION = "0004"

"""The state store: sandbox records in SQLite (default) or PostgreSQL, via SQLAlchemy Core."""

from corral.store.db import LIVE_STATES, SandboxRecord, Store, Usage
from corral.store.pools import ClaimChanges, Pool, Pools
from corral.store.tenants import ApiKey, Quota, Tenant, Tenants

__all__ = [
    "LIVE_STATES",
    "ApiKey",
    "ClaimChanges",
    "Pool",
    "Pools",
    "Quota",
    "SandboxRecord",
    "Store",
    "Tenant",
    "Tenants",
    "Usage",
]

"""The state store: sandbox records in SQLite (default) or PostgreSQL, via SQLAlchemy Core."""

from corral.store.db import SandboxRecord, Store

__all__ = ["SandboxRecord", "Store"]

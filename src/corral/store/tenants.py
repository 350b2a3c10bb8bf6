"""Tenants, their quotas and their API keys.

A key is `crl_<id>_<secret>`: the id is stored in the clear to find the row, the
secret only as a SHA-256 digest. The secret carries 256 random bits, so a fast
hash is enough (no password stretching needed), and comparison is constant-time.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, select, update

from corral.errors import AuthenticationError, ConflictError, NotFoundError, UserError
from corral.store.schema import api_keys, sandboxes, tenants

if TYPE_CHECKING:
    from corral.store.db import Store

_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_KEY = re.compile(r"crl_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits on a tenant's live sandboxes; None means no limit."""

    max_sandboxes: int | None = None
    max_vcpus: float | None = None
    max_memory: int | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    created_at: float
    quota: Quota


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's public facts (never its secret)."""

    id: str
    tenant: str
    admin: bool
    description: str
    created_at: float
    revoked_at: float | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tenants:
    """Tenant and key operations over a Store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, quota: Quota = Quota()) -> Tenant:
        if not _TENANT_NAME.fullmatch(name):
            raise UserError(
                f"'{name}' is not a tenant name",
                hint="use lowercase letters, digits, '.', '_' and '-' (max 63)",
            )
        if self.find(name) is not None:
            raise ConflictError(f"tenant '{name}' already exists", hint="pick another name")
        now = time.time()
        with self.store._begin() as conn:
            conn.execute(
                tenants.insert().values(name=name, created_at=now, **_quota_columns(quota))
            )
        return Tenant(name, now, quota)

    def find(self, name: str) -> Tenant | None:
        with self.store._begin() as conn:
            row = conn.execute(_TENANT_ROW, {"t_name": name}).first()
        return None if row is None else _tenant(row)

    def get(self, name: str) -> Tenant:
        tenant = self.find(name)
        if tenant is None:
            raise NotFoundError(f"no tenant '{name}'", hint="list them with `corral tenants ls`")
        return tenant

    def list(self) -> list[Tenant]:
        with self.store._begin() as conn:
            return [_tenant(row) for row in conn.execute(select(tenants).order_by(tenants.c.name))]

    def set_quota(self, name: str, quota: Quota) -> Tenant:
        self.get(name)
        with self.store._begin() as conn:
            conn.execute(
                update(tenants).where(tenants.c.name == name).values(**_quota_columns(quota))
            )
        return self.get(name)

    def remove(self, name: str) -> None:
        """Remove a tenant and its keys; refused while it still owns sandboxes."""
        self.get(name)
        with self.store._begin() as conn:
            owned = conn.execute(
                select(func.count()).select_from(sandboxes).where(sandboxes.c.tenant == name)
            ).scalar_one()
            if owned:
                raise ConflictError(
                    f"tenant '{name}' still owns {owned} sandbox(es)",
                    hint="destroy them first (`corral ls --tenant NAME`)",
                )
            conn.execute(delete(api_keys).where(api_keys.c.tenant == name))
            conn.execute(delete(tenants).where(tenants.c.name == name))

    # -- keys -----------------------------------------------------------------

    def create_key(self, tenant: str, *, admin: bool = False, description: str = "") -> str:
        """A new key for `tenant`; the returned plaintext is shown once and never stored."""
        self.get(tenant)
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.store._begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key_id,
                    tenant=tenant,
                    secret_sha256=_digest(secret),
                    admin=admin,
                    description=description[:255],
                    created_at=time.time(),
                )
            )
        return f"crl_{key_id}_{secret}"

    def authenticate(self, key: str) -> ApiKey:
        """The key's facts; AuthenticationError for a malformed, unknown or revoked key."""
        match = _KEY.fullmatch(key.strip())
        refused = AuthenticationError(
            "the API key is not valid", hint="pass a key from `corral keys create TENANT`"
        )
        if match is None:
            raise refused
        key_id, secret = match.groups()
        with self.store._begin() as conn:
            row = conn.execute(_KEY_ROW, {"k_id": key_id}).first()
        if row is None or row.revoked_at is not None:
            raise refused
        if not hmac.compare_digest(row.secret_sha256, _digest(secret)):
            raise refused
        return _key(row)

    def list_keys(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with self.store._begin() as conn:
            return [_key(row) for row in conn.execute(query)]

    def revoke_key(self, key_id: str) -> None:
        with self.store._begin() as conn:
            done = conn.execute(
                update(api_keys)
                .where((api_keys.c.id == key_id) & api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            ).rowcount
        if not done:
            raise NotFoundError(f"no active key '{key_id}'", hint="list keys with `corral keys ls`")


# Built once: every API request checks its key, every create reads its tenant's
# quota, and building a statement costs more than running it.
_KEY_ROW = select(api_keys).where(api_keys.c.id == bindparam("k_id"))
_TENANT_ROW = select(tenants).where(tenants.c.name == bindparam("t_name"))


def _quota_columns(quota: Quota) -> dict[str, Any]:
    return {
        "max_sandboxes": quota.max_sandboxes,
        "max_vcpus": quota.max_vcpus,
        "max_memory": quota.max_memory,
    }


def _tenant(row: Any) -> Tenant:
    return Tenant(row.name, row.created_at, Quota(row.max_sandboxes, row.max_vcpus, row.max_memory))


def _key(row: Any) -> ApiKey:
    return ApiKey(
        row.id, row.tenant, bool(row.admin), row.description, row.created_at, row.revoked_at
    )

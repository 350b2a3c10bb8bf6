"""The store on SQLite and on a real PostgreSQL server: same Core statements, same
migrations, same guarantees (names unique per tenant, quotas checked atomically)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from corral.errors import AuthenticationError, ConflictError, NotFoundError, QuotaExceededError
from corral.store import Quota, SandboxRecord, Store, Usage
from corral.store.schema import HEAD_REVISION


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    yield store
    store.close()


def record(sandbox_id: str, tenant: str = "t1", **fields: object) -> SandboxRecord:
    values: dict[str, object] = {
        "id": sandbox_id,
        "template": "default",
        "backend": "oci",
        "state": "running",
        "tenant": tenant,
        "spec": {"limits": {"vcpus": 1.0, "memory": 256 << 20}},
    }
    values.update(fields)
    return SandboxRecord(**values)  # type: ignore[arg-type]


def test_migrations_reach_head_and_reopen_cheaply(database_url: str) -> None:
    first = Store(database_url)
    with first.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD_REVISION
        )
        tables = {"sandboxes", "tenants", "api_keys"}
        if first.engine.dialect.name == "postgresql":
            rows = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))
        else:
            rows = conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))
        assert tables <= {row[0] for row in rows}
    first.close()
    Store(database_url).close()  # at head: opens without running Alembic again


def test_records_round_trip_and_filter(store: Store) -> None:
    store.insert(record("sb-1", labels={"team": "ml", "job": "x"}, metadata={"pr": 7}))
    store.insert(record("sb-2", tenant="t2", state="paused", expires_at=100.0))
    store.insert(record("sb-3", name="svc", expires_at=10_000.0))
    got = store.get("sb-1")
    assert (got.labels, got.metadata, got.limits["memory"]) == (
        {"team": "ml", "job": "x"},
        {"pr": 7},
        256 << 20,
    )
    assert store.get("svc", tenant="t1").id == "sb-3"
    with pytest.raises(NotFoundError):
        store.get("sb-1", tenant="t2")  # another tenant's id is simply not there
    assert [r.id for r in store.list(tenant="t1")] == ["sb-1", "sb-3"]
    assert [r.id for r in store.list(labels={"team": "ml"})] == ["sb-1"]
    assert [r.id for r in store.list(states=("paused",))] == ["sb-2"]
    assert [r.id for r in store.list(expired_before=1000.0)] == ["sb-2"]
    updated = store.update("sb-1", labels={"team": "infra"}, metadata={}, state="paused")
    assert (updated.labels, updated.metadata, updated.state) == ({"team": "infra"}, {}, "paused")
    store.delete("sb-1")
    assert store.ids() == {"sb-2", "sb-3"}


def test_names_are_unique_per_tenant(store: Store) -> None:
    store.insert(record("sb-1", name="api"))
    store.insert(record("sb-2", tenant="t2", name="api"))  # another tenant: fine
    store.insert(record("sb-3"))
    store.insert(record("sb-4"))  # unnamed sandboxes never clash
    with pytest.raises(ConflictError, match="named 'api' already exists"):
        store.insert(record("sb-5", name="api"))
    assert "sb-5" not in store.ids()


def test_mark_destroying_is_one_step_and_keeps_the_first_owner(store: Store) -> None:
    store.insert(record("sb-1", name="svc"))
    assert store.mark_destroying("sb-1", "host:2", tenant="t2") is None  # not t2's
    assert store.mark_destroying("svc", "host:2") is None  # names go the long way
    assert store.mark_destroying("sb-9", "host:2") is None
    first = store.mark_destroying("sb-1", "host:1", tenant="t1")
    assert first is not None
    assert (first.state, first.owner) == ("destroying", "host:1")
    again = store.mark_destroying("sb-1", "host:2")
    assert again is not None
    assert (again.owner, again.updated_at) == ("host:1", first.updated_at)
    store.update("sb-1", state="destroyed")
    assert store.mark_destroying("sb-1", "host:2") is None


def test_usage_counts_live_sandboxes(store: Store) -> None:
    store.insert(record("sb-1"))
    store.insert(record("sb-2", state="paused"))
    store.insert(record("sb-3", state="failed"))
    store.insert(record("sb-4", tenant="t2"))
    assert store.usage("t1") == Usage(2, 2.0, 512 << 20)


def test_quota_holds_under_concurrent_inserts(store: Store) -> None:
    store.tenants.add("t1", Quota(max_sandboxes=3))

    def at_most_three(usage: Usage) -> None:
        if usage.sandboxes + 1 > 3:
            raise QuotaExceededError("over")

    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def insert(n: int) -> None:
        start.wait()
        try:
            store.insert(record(f"sb-{n}"), check=at_most_three)
            result = "ok"
        except QuotaExceededError:
            result = "quota"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=insert, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ok"] * 3 + ["quota"] * 5
    assert len(store.list(tenant="t1")) == 3


def test_tenants_and_keys(store: Store) -> None:
    tenants = store.tenants
    tenants.add("acme", Quota(max_sandboxes=5, max_memory=1 << 30))
    with pytest.raises(ConflictError):
        tenants.add("acme")
    with pytest.raises(Exception, match="not a tenant name"):
        tenants.add("Bad Name")
    key = tenants.create_key("acme", description="ci")
    admin = tenants.create_key("acme", admin=True)
    assert key.startswith("crl_")
    facts = tenants.authenticate(key)
    assert (facts.tenant, facts.admin, facts.description) == ("acme", False, "ci")
    assert tenants.authenticate(admin).admin
    stored = " ".join(str(k) for k in tenants.list_keys())
    assert key.split("_", 2)[2] not in stored  # only the digest is kept
    for bad in ("", "crl_x", key[:-1] + ("A" if key[-1] != "A" else "B"), "Bearer " + key):
        with pytest.raises(AuthenticationError):
            tenants.authenticate(bad)
    tenants.revoke_key(facts.id)
    with pytest.raises(AuthenticationError):
        tenants.authenticate(key)
    with pytest.raises(NotFoundError):
        tenants.revoke_key(facts.id)
    assert tenants.set_quota("acme", Quota(max_vcpus=2.5)).quota == Quota(max_vcpus=2.5)
    store.insert(record("sb-1", tenant="acme"))
    with pytest.raises(ConflictError, match="still owns 1 sandbox"):
        tenants.remove("acme")
    store.delete("sb-1")
    tenants.remove("acme")
    assert tenants.find("acme") is None
    assert tenants.list_keys("acme") == []


def test_an_unreachable_database_is_a_store_error() -> None:
    from corral.errors import StoreError

    with pytest.raises(StoreError, match="store error"):
        Store("postgresql+psycopg://nobody@/nothing?host=/nonexistent-dir&connect_timeout=2")


def test_a_claim_finds_the_oldest_ready_member_from_the_index_alone(tmp_path: Path) -> None:
    """SQLite's plan for the claim's lookup: one index search, no table scan or sort
    (with a pool-only index it searched the tenant index and sorted every sandbox
    of the tenant on each claim)."""
    from corral.store.pools import OLDEST_READY

    store = Store(f"sqlite:///{tmp_path / 'corral.db'}")
    for i in range(20):
        store.insert(record(f"sb-{i}"))
    compiled = OLDEST_READY.compile(dialect=store.engine.dialect)
    values = compiled.params | {"c_tenant": "t1", "c_pool": "p", "c_state": "running"}
    assert compiled.positiontup is not None
    with store.engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + compiled.string,
            tuple(values[name] for name in compiled.positiontup),
        ).all()
    store.close()
    details = [row[3] for row in plan]
    assert details == [
        "SEARCH sandboxes USING COVERING INDEX ix_sandboxes_pool_claim"
        " (pool=? AND tenant=? AND state=?)"
    ], details

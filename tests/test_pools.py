"""Warm pools over the fake backend: refill, idle age, claims never handed out twice
(threads, tasks, two stores on one database), empty-pool fallback, quota, reconcile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backends.base import BackendStatus, Capability
from corral.backends.fake import FakeBackend
from corral.errors import (
    ConflictError,
    InvalidStateError,
    NotFoundError,
    QuotaExceededError,
    SandboxStartError,
    UnsupportedError,
    UserError,
)
from corral.images import ImageStore
from corral.runtime.manager import SandboxManager
from corral.runtime.pools import Claim, PoolManager
from corral.runtime.state import SandboxState
from corral.store import ClaimChanges, Quota, Store


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    return ImageStore(tmp_path_factory.mktemp("images"))


@pytest.fixture
def manager(tmp_path: Path, images: ImageStore) -> Iterator[SandboxManager]:
    store = Store.for_state_dir(tmp_path)
    yield SandboxManager(FakeBackend(), store, images)
    store.close()


@pytest.fixture
def pools(manager: SandboxManager) -> PoolManager:
    return PoolManager(manager, interval=0.05)


def fake(manager: SandboxManager) -> FakeBackend:
    assert isinstance(manager.backend, FakeBackend)
    return manager.backend


async def test_add_fills_to_target_and_members_do_not_expire(pools: PoolManager) -> None:
    await pools.add("py", "default", size=3, memory="128M", labels={"team": "a"}, fill=True)
    status = pools.get("py")
    assert (status.idle, status.starting, status.error) == (3, 0, None)
    members = pools.store.pools.members("local", "py")
    assert {m.pool for m in members} == {"py"}
    assert all(m.expires_at is None for m in members), "idle members have no timeout"
    assert await pools.manager.reap(now=time.time() + 10**6) == []
    assert all(m.limits["memory"] == 128 << 20 for m in members)
    assert [p.pool.name for p in pools.list()] == ["py"]


async def test_claim_hands_out_a_member_and_the_pool_refills(pools: PoolManager) -> None:
    await pools.add("py", size=2, labels={"team": "a"}, fill=True)
    before = {m.id for m in pools.store.pools.members("local", "py")}
    claim = await pools.claim("py", timeout=30, labels={"job": "1"}, metadata={"n": 1}, name="j1")
    assert claim.from_pool
    assert claim.record.id in before
    record = pools.manager.get("j1")
    assert record.id == claim.record.id
    assert record.pool is None
    assert record.labels == {"team": "a", "job": "1"}
    assert record.metadata == {"n": 1}
    assert record.expires_at is not None
    assert 0 < record.expires_at - time.time() <= 30
    result = await pools.manager.exec(record.id, ["echo", "hi"])
    assert result.stdout == b"hi\n"
    assert pools.get("py").idle == 1
    report = await pools.refill()
    assert len(report["created"]) == 1
    assert report["created"][0] not in before
    assert pools.get("py").idle == 2
    # The claimed sandbox is the claimant's now: reaped by its timeout, not refilled.
    assert await pools.manager.reap(now=time.time() + 31) == [record.id]
    assert pools.get("py").idle == 2


async def test_idle_member_cannot_be_used_before_its_claim(pools: PoolManager) -> None:
    await pools.add("py", size=1, fill=True)
    (member,) = pools.store.pools.members("local", "py")
    with pytest.raises(InvalidStateError, match="idles in pool 'py'"):
        await pools.manager.exec(member.id, ["true"])


async def test_empty_pool_falls_back_to_a_cold_create(pools: PoolManager) -> None:
    await pools.add("py", size=0, memory="64M", labels={"team": "a"})
    claim = await pools.claim("py", labels={"job": "2"}, timeout=5)
    assert not claim.from_pool
    assert claim.record.pool is None
    assert claim.record.state == SandboxState.RUNNING
    assert claim.record.labels == {"team": "a", "job": "2"}
    assert claim.record.limits["memory"] == 64 << 20
    with pytest.raises(NotFoundError, match="no pool 'nope'"):
        await pools.claim("nope")


async def test_never_handed_out_twice_under_concurrent_tasks(pools: PoolManager) -> None:
    await pools.add("py", size=6, fill=True)
    members = {m.id for m in pools.store.pools.members("local", "py")}
    claims = await asyncio.gather(*(pools.claim("py") for _ in range(10)))
    hits = [c.record.id for c in claims if c.from_pool]
    assert sorted(hits) == sorted(members), "each member exactly once"
    assert sum(not c.from_pool for c in claims) == 4
    assert len({c.record.id for c in claims}) == 10


async def test_never_handed_out_twice_across_threads_and_stores(
    pools: PoolManager, tmp_path: Path
) -> None:
    """Claims from 8 threads, each with its own Store on the same database (as
    separate processes or replicas would be): every member goes to one claimant."""
    await pools.add("py", size=20, fill=True)
    members = {m.id for m in pools.store.pools.members("local", "py")}
    won: list[str] = []
    lock = threading.Lock()

    def claimant() -> None:
        store = Store(pools.store.url)
        try:
            for _ in range(5):
                record = store.pools.claim("local", "py", ClaimChanges(expires_at=time.time()))
                if record is not None:
                    with lock:
                        won.append(record.id)
        finally:
            store.close()

    threads = [threading.Thread(target=claimant) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won) == sorted(members)


async def test_members_past_idle_age_are_replaced(pools: PoolManager) -> None:
    await pools.add("py", size=2, max_idle=0.2, fill=True)
    old = {m.id for m in pools.store.pools.members("local", "py")}
    await asyncio.sleep(0.3)
    report = await pools.refill()
    assert set(report["discarded"]) == old
    new = {m.id for m in pools.store.pools.members("local", "py")}
    assert len(new) == 2
    assert not new & old
    assert set(fake(pools.manager).destroyed) == old


async def test_background_loop_refills_after_claims(pools: PoolManager) -> None:
    async with pools:
        await pools.add("py", size=2)
        await _until(lambda: pools.get("py").idle == 2)
        first = await pools.claim("py")
        assert first.from_pool
        await _until(lambda: pools.get("py").idle == 2)
    assert pools._task is None


async def test_members_count_against_quota(pools: PoolManager) -> None:
    store = pools.store
    store.tenants.add("t1", Quota(max_sandboxes=3))
    await pools.add("py", size=5, tenant="t1", fill=True)
    status = pools.get("py", tenant="t1")
    assert status.idle == 3
    assert status.error is not None
    assert "quota" in status.error
    assert store.usage("t1").sandboxes == 3
    with pytest.raises(QuotaExceededError):
        await pools.manager.create(tenant="t1")
    # A claim takes a member (no new quota needed); the cold fallback is refused.
    for _ in range(3):
        assert (await pools.claim("py", tenant="t1")).from_pool
    with pytest.raises(QuotaExceededError):
        await pools.claim("py", tenant="t1")


async def test_pools_are_per_tenant(pools: PoolManager) -> None:
    await pools.add("py", size=1, tenant="a", fill=True)
    with pytest.raises(NotFoundError):
        await pools.claim("py", tenant="b")
    with pytest.raises(NotFoundError):
        await pools.remove("py", tenant="b")
    await pools.add("py", size=1, tenant="b", fill=True)
    assert {p.pool.tenant for p in pools.list()} == {"a", "b"}
    assert [p.pool.tenant for p in pools.list(tenant="b")] == ["b"]
    with pytest.raises(ConflictError):
        await pools.add("py", size=1, tenant="a")


async def test_remove_destroys_idle_members_only(pools: PoolManager) -> None:
    await pools.add("py", size=3, fill=True)
    claim = await pools.claim("py")
    destroyed = await pools.remove("py")
    assert len(destroyed) == 2
    assert claim.record.id not in destroyed
    assert [r.id for r in pools.manager.list()] == [claim.record.id]
    assert pools.list() == []
    with pytest.raises(NotFoundError):
        pools.get("py")


async def test_resize_trims_and_grows(pools: PoolManager) -> None:
    await pools.add("py", size=4, fill=True)
    pools.resize("py", 1)
    report = await pools.refill()
    assert len(report["discarded"]) == 3
    assert pools.get("py").idle == 1
    pools.resize("py", 2)
    await pools.refill()
    assert pools.get("py").idle == 2


async def test_lost_member_is_dropped_by_reconcile_and_refilled(pools: PoolManager) -> None:
    await pools.add("py", size=2, fill=True)
    lost, kept = pools.store.pools.members("local", "py")
    del fake(pools.manager).sandboxes[lost.id]  # e.g. a host reboot
    report = await pools.manager.reconcile()
    assert report["lost"] == [lost.id]
    with pytest.raises(NotFoundError):
        pools.manager.get(lost.id)
    await pools.refill()
    ids = {m.id for m in pools.store.pools.members("local", "py")}
    assert kept.id in ids
    assert len(ids) == 2


async def test_claim_name_clash_leaves_the_member_in_the_pool(pools: PoolManager) -> None:
    await pools.add("py", size=1, fill=True)
    await pools.manager.create(name="taken")
    with pytest.raises(ConflictError):
        await pools.claim("py", name="taken")
    assert pools.get("py").idle == 1


async def test_observers_see_claims_and_bad_input_is_refused(pools: PoolManager) -> None:
    seen: list[Claim] = []
    pools.observers.append(seen.append)
    await pools.add("py", size=1, fill=True)
    await pools.claim("py")
    await pools.claim("py")
    assert [c.from_pool for c in seen] == [True, False]
    assert all(c.seconds >= 0 for c in seen)
    with pytest.raises(UserError, match="not a valid pool name"):
        await pools.add("Bad Name", size=1)
    with pytest.raises(UserError, match="memory"):
        await pools.add("bad-size", size=1, memory="1K")
    with pytest.raises(UserError, match="negative"):
        await pools.add("neg", size=-1)


async def _until(condition: object, deadline: float = 5.0) -> None:
    assert callable(condition)
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


class SnapshottingFake(FakeBackend):
    """The fake backend with snapshot/restore: a snapshot is a file in `dest`."""

    capabilities = frozenset({*FakeBackend.capabilities, Capability.SNAPSHOT})

    async def snapshot(self, sandbox_id: str, dest: Path) -> None:
        sandbox = self._get(sandbox_id)
        dest.mkdir(parents=True)
        (dest / "state").write_text(sandbox_id)
        sandbox.status = BackendStatus.STOPPED

    async def restore(self, sandbox_id: str, source: Path) -> None:
        if (source / "state").read_text() != sandbox_id:
            raise SandboxStartError("not this sandbox's snapshot", sandbox_id=sandbox_id)
        self._get(sandbox_id).status = BackendStatus.RUNNING


async def test_snapshot_pool_restores_on_claim(tmp_path: Path, images: ImageStore) -> None:
    store = Store.for_state_dir(tmp_path)
    backend = SnapshottingFake()
    pools = PoolManager(SandboxManager(backend, store, images))
    try:
        await pools.add("snap", size=2, snapshot=True, fill=True)
        status = pools.get("snap")
        assert (status.idle, status.starting) == (2, 0)
        members = pools.store.pools.members("local", "snap")
        assert {m.state for m in members} == {SandboxState.STOPPED}
        assert all(backend.sandboxes[m.id].status == BackendStatus.STOPPED for m in members)
        claim = await pools.claim("snap", labels={"job": "s"})
        assert claim.from_pool
        assert claim.record.state == SandboxState.RUNNING
        assert backend.sandboxes[claim.record.id].status == BackendStatus.RUNNING
        assert not (pools.snapshots_dir / claim.record.id).exists()
        result = await pools.manager.exec(claim.record.id, ["echo", "back"])
        assert result.stdout == b"back\n"
        await pools.refill()
        assert pools.get("snap").idle == 2
        # A member whose snapshot cannot be restored is destroyed; the claim goes cold.
        (victim, _) = pools.store.pools.members("local", "snap")
        (pools.snapshots_dir / victim.id / "state").write_text("someone else")
        cold = await pools.claim("snap")
        assert not cold.from_pool
        assert victim.id in backend.destroyed
        destroyed = await pools.remove("snap")
        assert all(not (pools.snapshots_dir / i).exists() for i in destroyed)
    finally:
        store.close()


async def test_snapshot_pool_needs_a_snapshotting_backend(pools: PoolManager) -> None:
    with pytest.raises(UnsupportedError, match="cannot snapshot"):
        await pools.add("snap", size=1, snapshot=True)

"""SandboxManager over the fake backend: lifecycle, store consistency, policy, gc."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backends.base import BackendStatus
from corral.backends.fake import FakeBackend
from corral.errors import (
    FileTooLargeError,
    InvalidStateError,
    IsolationPolicyError,
    NotFoundError,
    SandboxStartError,
)
from corral.images import ImageStore
from corral.runtime.manager import SandboxManager
from corral.runtime.state import SandboxState, can_transition, check_transition
from corral.spec.template import parse_template
from corral.store import Store


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    return ImageStore(tmp_path_factory.mktemp("images"))


@pytest.fixture
def manager(tmp_path: Path, images: ImageStore) -> Iterator[SandboxManager]:
    store = Store.for_state_dir(tmp_path)
    yield SandboxManager(FakeBackend(), store, images, max_file_bytes=1000)
    store.close()


def fake(manager: SandboxManager) -> FakeBackend:
    assert isinstance(manager.backend, FakeBackend)
    return manager.backend


async def test_create_records_and_starts(manager: SandboxManager) -> None:
    record = await manager.create("default", memory="256M", labels={"team": "a"}, timeout=60)
    assert record.state == SandboxState.RUNNING
    assert record.labels == {"team": "a"}
    assert record.expires_at is not None
    assert record.expires_at - time.time() <= 60
    config = fake(manager).sandboxes[record.id].config
    assert config.limits.memory == 256 << 20
    assert any(m.target == "/usr" for m in config.mounts), "host base binds /usr"
    assert [r.id for r in manager.list(label=("team", "a"))] == [record.id]
    assert manager.list(label=("team", "b")) == []


async def test_exec_and_files(manager: SandboxManager) -> None:
    record = await manager.create()
    result = await manager.exec(record.id, ["echo", "hi"])
    assert (result.exit_code, result.stdout) == (0, b"hi\n")
    await manager.put_file(record.id, "/work/a", b"data")
    assert await manager.get_file(record.id, "/work/a") == b"data"
    with pytest.raises(FileTooLargeError, match="over the limit"):
        await manager.put_file(record.id, "/work/big", b"x" * 1001)
    assert "/work/big" not in fake(manager).sandboxes[record.id].files


async def test_failed_create_leaves_no_record(manager: SandboxManager) -> None:
    fake(manager).fail_create = True
    with pytest.raises(SandboxStartError):
        await manager.create()
    assert manager.list() == []
    assert fake(manager).sandboxes == {}


async def test_destroy_twice(manager: SandboxManager) -> None:
    record = await manager.create()
    await manager.destroy(record.id)
    assert await fake(manager).status(record.id) == BackendStatus.MISSING
    with pytest.raises(NotFoundError):
        await manager.destroy(record.id)


async def test_paused_sandbox_refuses_exec(manager: SandboxManager) -> None:
    record = await manager.create()
    await manager.pause(record.id)
    assert manager.get(record.id).state == SandboxState.PAUSED
    with pytest.raises(InvalidStateError, match="paused"):
        await manager.exec(record.id, ["true"])
    await manager.resume(record.id)
    assert (await manager.exec(record.id, ["true"])).exit_code == 0


async def test_isolation_policy(manager: SandboxManager) -> None:
    vm_only = parse_template({"name": "vm-only", "isolation": ["microvm"]}, source="test")
    with pytest.raises(IsolationPolicyError, match="does not allow isolation 'container'"):
        await manager.create(vm_only)
    gvisor_only = parse_template({"name": "g", "isolation": ["gvisor"]}, source="test")
    with pytest.raises(IsolationPolicyError):
        await manager.create(gvisor_only, runtime="crun")
    record = await manager.create(gvisor_only, runtime="runsc")
    assert record.runtime == "runsc"
    # Without a runtime asked for, the template's first allowed level decides.
    assert (await manager.create(gvisor_only)).runtime == "runsc"
    gvisor_first = parse_template({"name": "gf", "isolation": ["gvisor", "container"]}, source="t")
    assert (await manager.create(gvisor_first)).runtime == "runsc"
    assert (await manager.create(gvisor_first, runtime="runc")).runtime == "runc"
    assert (await manager.create("default")).runtime == "crun"


async def test_gc_reaps_expired_orphans_and_lost(manager: SandboxManager) -> None:
    expired = await manager.create(timeout=1)
    alive = await manager.create(timeout=600)
    lost = await manager.create()
    del fake(manager).sandboxes[lost.id]  # the backend lost it (e.g. host reboot)
    orphan = await manager.create()
    manager.store.delete(orphan.id)  # a crash between backend create and the record
    report = await manager.gc(now=time.time() + 5)
    assert report["expired"] == [expired.id]
    assert report["lost"] == [lost.id]
    assert report["orphans"] == [orphan.id]
    assert sorted(report["adopted"]) == sorted([expired.id, alive.id])
    # A lost sandbox stays on record, marked, until its owner deletes it.
    assert {r.id: r.state for r in manager.list()} == {alive.id: "running", lost.id: "failed"}
    assert "lost" in (manager.get(lost.id).error or "")
    assert sorted(fake(manager).sandboxes) == [alive.id]


def test_state_machine_edges() -> None:
    assert can_transition(SandboxState.CREATING, SandboxState.RUNNING)
    assert not can_transition(SandboxState.DESTROYED, SandboxState.RUNNING)
    assert not can_transition(SandboxState.FAILED, SandboxState.RUNNING)
    with pytest.raises(InvalidStateError, match="from destroyed to running"):
        check_transition(SandboxState.DESTROYED, SandboxState.RUNNING, "sb-x")
    for state in SandboxState:
        if state is not SandboxState.DESTROYED:
            assert (
                can_transition(state, SandboxState.DESTROYING) or state is SandboxState.DESTROYING
            )

"""Pets over the fake backend (allocation, policy, the supervisor's restarts and crash
loops) and over the real oci backend (volumes with a real size limit, promotion
without a restart, promotion with a volume, health checks, logs)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.backends.base import BackendStatus, ExecRequest
from corral.backends.fake import FakeBackend, FakeSandbox, builtin_handler
from corral.backends.oci import OciBackend
from corral.errors import ConflictError, InvalidStateError, QuotaExceededError, UserError
from corral.images import ImageStore
from corral.runtime.cpus import PetCapacity, parse_cpus
from corral.runtime.manager import SandboxManager
from corral.runtime.pets import PetManager
from corral.runtime.state import SandboxState
from corral.runtime.supervisor import PetSupervisor
from corral.spec.template import Template, parse_template
from corral.store import SandboxRecord, Store
from tests.conftest import require_binary, require_root

GIB = 1 << 30


def pet_template(**service: object) -> Template:
    data: dict[str, object] = {"name": "svc", "kind": "persistent", "volume": {"size": "8M"}}
    if service:
        data["service"] = {"backoff": 0.05, "max_backoff": 0.2, **service}
    return parse_template(data, source="<test>")


async def until(predicate: object, timeout: float = 20.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- fake backend: allocation, policy, supervision ------------------------------------


async def service_handler(sandbox: FakeSandbox, request: ExecRequest) -> tuple[int, bytes, bytes]:
    """Runs what the supervisor's wrapper would exec (the fake has no shell)."""
    argv = list(request.argv)
    if argv[:2] == ["/bin/sh", "-c"] and len(argv) > 4:
        argv = argv[4:]
    return await builtin_handler(sandbox, dataclasses.replace(request, argv=argv))


@pytest.fixture
def fake_manager(tmp_path: Path) -> Iterator[SandboxManager]:
    store = Store.for_state_dir(tmp_path)
    manager = SandboxManager(FakeBackend(service_handler), store, ImageStore(tmp_path / "images"))
    manager.pets.capacity = PetCapacity(frozenset({0, 1, 2}), 4 * GIB)
    yield manager
    store.close()


async def test_a_pet_needs_a_name_and_is_never_reaped(fake_manager: SandboxManager) -> None:
    with pytest.raises(UserError, match="needs a name"):
        await fake_manager.create(pet_template())
    with pytest.raises(UserError, match="is not a pet name"):
        await fake_manager.create(pet_template(), name="../escape")
    pet = await fake_manager.create(pet_template(), name="keeper", timeout=1)
    assert (pet.kind, pet.expires_at, pet.name) == ("persistent", None, "keeper")
    assert await fake_manager.reap(now=time.time() + 10**6) == []
    with pytest.raises(InvalidStateError, match="no timeout"):
        fake_manager.set_timeout(pet.id, 5)
    with pytest.raises(ConflictError, match="already exists"):
        await fake_manager.pets.create("default", name="keeper")
    volume = fake_manager.backend.sandboxes[pet.id].config.mounts[-1]  # type: ignore[attr-defined]
    assert (volume.target, volume.writable) == ("/data", True)


async def test_cpus_are_pinned_exclusively_and_refused_when_none_left(
    fake_manager: SandboxManager,
) -> None:
    assert (await fake_manager.create("default")).limits["cpuset"] is None
    a = await fake_manager.pets.create("default", name="a", cpus=2, memory="64M")
    assert parse_cpus(a.limits["cpuset"]) == {0, 1}
    # Cattle keep off pets' CPUs while some are left ...
    assert (await fake_manager.create("default")).limits["cpuset"] == "2"
    assert (await fake_manager.create("default", cpuset="0")).limits["cpuset"] == "0"
    b = await fake_manager.pets.create("default", name="b", cpus=0.5, memory="64M")
    assert parse_cpus(b.limits["cpuset"]) == {2}
    # ... and share them when pets hold every CPU.
    assert (await fake_manager.create("default")).limits["cpuset"] is None
    with pytest.raises(QuotaExceededError, match=r"1 CPU\(s\) of its own and 0 .* free"):
        await fake_manager.pets.create("default", name="c", memory="64M")
    with pytest.raises(QuotaExceededError, match="pinned to other pets"):
        await fake_manager.pets.create("default", name="c", cpuset="1", memory="64M")
    # Ephemeral sandboxes do not hold pinned CPUs.
    await fake_manager.destroy(a.id)
    c = await fake_manager.pets.create("default", name="c", cpuset="1", memory="64M")
    assert c.limits["cpuset"] == "1"


async def test_pet_memory_is_never_overcommitted(fake_manager: SandboxManager) -> None:
    await fake_manager.pets.create("default", name="big", memory="3G")
    with pytest.raises(QuotaExceededError, match="would overcommit memory: pets hold 3072 MiB"):
        await fake_manager.pets.create("default", name="more", memory="2G")
    assert [r.name for r in fake_manager.list()] == ["big"]
    await fake_manager.pets.create("default", name="fits", memory="1G")


async def test_a_crashing_service_is_restarted_then_marked_failed(
    fake_manager: SandboxManager,
) -> None:
    supervisor = PetSupervisor(fake_manager, scan_interval=0.05)
    pet = await fake_manager.create(
        pet_template(command=["exit", "3"], crash_limit=4), name="crashy"
    )
    supervisor.start()
    try:
        await until(
            lambda: fake_manager.get(pet.id).state == SandboxState.FAILED, what="crash loop"
        )
    finally:
        await supervisor.stop()
    failed = fake_manager.get(pet.id)
    assert failed.restarts == 3
    assert failed.error is not None
    assert failed.error.startswith("crash loop: stopped after 4 failures in a row")
    assert "last: service exited with code 3" in failed.error
    log = fake_manager.pets.log_path(failed).read_text()
    assert log.count("service starting: exit 3") == 4
    assert "restart 1 in 0.05s" in log
    assert "restart 3 in 0.2s" in log  # doubling, capped at max_backoff
    assert "marked failed: crash loop" in log
    # Its sandbox still runs, to be looked into; then it is supervised again.
    assert (await fake_manager.exec(pet.id, ["echo", "inside"])).stdout == b"inside\n"
    assert fake_manager.pets.restart(pet.id).state == SandboxState.STOPPED
    with pytest.raises(InvalidStateError, match="only a failed pet is restarted"):
        fake_manager.pets.restart(pet.id)


async def test_on_failure_leaves_a_clean_exit_alone(fake_manager: SandboxManager) -> None:
    supervisor = PetSupervisor(fake_manager, scan_interval=0.05)
    pet = await fake_manager.create(
        pet_template(command=["true"], restart="on-failure"), name="once"
    )
    supervisor.start()
    try:
        log = fake_manager.pets.log_path(pet)
        await until(lambda: log.exists() and "not restarted" in log.read_text(), what="exit")
    finally:
        await supervisor.stop()
    assert fake_manager.get(pet.id).restarts == 0
    assert fake_manager.get(pet.id).state == SandboxState.RUNNING


async def test_a_lost_pet_is_recreated(fake_manager: SandboxManager) -> None:
    pet = await fake_manager.create(pet_template(command=["sleep", "1000"]), name="phoenix")
    await fake_manager.backend.destroy(pet.id)  # e.g. a host reboot
    report = await fake_manager.reconcile()
    assert report["lost"] == [pet.id]
    assert fake_manager.get(pet.id).state == SandboxState.STOPPED
    supervisor = PetSupervisor(fake_manager, scan_interval=0.05)
    supervisor.start()
    try:
        await until(
            lambda: fake_manager.get(pet.id).state == SandboxState.RUNNING, what="re-creation"
        )
        assert await fake_manager.backend.status(pet.id) == BackendStatus.RUNNING
    finally:
        await supervisor.stop()
    log = fake_manager.pets.log_path(pet).read_text()
    assert "the sandbox is missing: re-creating it" in log


# -- oci backend: volumes, promotion, health checks, logs ------------------------------


@pytest.fixture(scope="module")
def oci_images(state_root: Path) -> ImageStore:
    return ImageStore(state_root / "images")


@pytest.fixture
async def oci_manager(state_root: Path, oci_images: ImageStore) -> AsyncIterator[SandboxManager]:
    require_root()
    require_binary("crun")
    require_binary("mkfs.ext4")
    store = Store.for_state_dir(state_root)
    manager = SandboxManager(OciBackend(state_root), store, oci_images)
    yield manager
    for record in store.list():
        await manager.destroy(record.id)
    for volume in manager.pets.volumes.list():
        manager.pets.volumes.remove(volume.tenant, volume.name)
    store.close()


async def sh(manager: SandboxManager, record: SandboxRecord, script: str) -> str:
    result = await manager.exec(record.id, ["/bin/sh", "-c", script], timeout=30)
    assert result.ok, result.stderr.decode()
    return result.stdout.decode()


@pytest.mark.runtime
async def test_the_volume_has_a_real_size_limit_and_outlives_the_pet(
    oci_manager: SandboxManager,
) -> None:
    pet = await oci_manager.create(pet_template(), name="store", memory="64M")
    report = await sh(
        oci_manager,
        pet,
        "id -u; stat -c %u /data; echo kept > /data/note;"
        " dd if=/dev/zero of=/data/fill bs=1M count=16 2>&1; echo dd=$?",
    )
    uid, owner, *_ = report.splitlines()
    assert uid == owner == "1000"  # the sandbox user owns its volume
    assert "No space left on device" in report
    assert report.endswith("dd=1\n")
    await oci_manager.destroy(pet.id)
    volume = oci_manager.pets.volumes.volume("local", "store")
    assert not oci_manager.pets.volumes.is_mounted(volume)
    assert volume.image.exists()
    again = await oci_manager.pets.create(pet_template(), name="store", volume="24M")
    assert await sh(oci_manager, again, "cat /data/note") == "kept\n"
    grown = await sh(oci_manager, again, "dd if=/dev/zero of=/data/more bs=1M count=12 && echo ok")
    assert grown.endswith("ok\n")  # 8M grew to 24M, the data kept
    with pytest.raises(ConflictError, match="already exists"):
        oci_manager.pets.remove_volume("store", tenant="local")
    # A destroy cut short (the record gone, the volume still mounted) is settled.
    await oci_manager.backend.destroy(again.id)
    oci_manager.store.delete(again.id)
    assert oci_manager.pets.volumes.is_mounted(volume)
    assert oci_manager.pets.unmount_orphans() == ["local/store"]
    assert not oci_manager.pets.volumes.is_mounted(volume)
    oci_manager.pets.remove_volume("store", tenant="local")
    assert not volume.image.exists()


@pytest.mark.runtime
async def test_promotion_keeps_the_processes_running(oci_manager: SandboxManager) -> None:
    cattle = await oci_manager.create("default", memory="64M", timeout=600)
    pid = (await sh(oci_manager, cattle, "sleep 1000 > /dev/null 2>&1 & echo $!")).strip()
    await sh(oci_manager, cattle, "echo mine > /work/file")
    pet = await oci_manager.pets.promote(cattle.id, name="promoted")
    assert (pet.id, pet.kind, pet.name, pet.expires_at) == (
        cattle.id,
        "persistent",
        "promoted",
        None,
    )
    assert await sh(oci_manager, pet, f"kill -0 {pid} && echo alive") == "alive\n"
    assert await sh(oci_manager, pet, "cat /work/file") == "mine\n"
    pinned = pet.limits["cpuset"]
    allowed = await sh(oci_manager, pet, "grep Cpus_allowed_list /proc/self/status")
    assert allowed.split()[-1] == pinned
    assert await oci_manager.reap(now=time.time() + 10**6) == []
    later = await oci_manager.create("default", memory="64M")
    cattle_cpus = (await sh(oci_manager, later, "grep Cpus_allowed_list /proc/self/status")).split()
    assert set(parse_cpus(cattle_cpus[-1])).isdisjoint(parse_cpus(pinned))
    with pytest.raises(InvalidStateError, match="already persistent"):
        await oci_manager.pets.promote(pet.id, name="twice")


@pytest.mark.runtime
async def test_promotion_with_a_volume_carries_the_files_over(
    oci_manager: SandboxManager,
) -> None:
    cattle = await oci_manager.create("default", memory="64M")
    await sh(oci_manager, cattle, "mkdir -p /work/src && echo code > /work/src/main.rs")
    pet = await oci_manager.pets.promote(cattle.id, name="grown", volume="8M")
    assert pet.spec["pet"]["volume"] == {"size": 8 << 20, "path": "/data"}
    out = await sh(oci_manager, pet, "cat /work/src/main.rs; echo x > /data/y && echo ok")
    assert out == "code\nok\n"


@pytest.mark.runtime
async def test_a_failing_health_check_restarts_the_service(
    oci_manager: SandboxManager,
) -> None:
    template = pet_template(
        command=["/bin/sh", "-c", "echo started >> /data/starts; exec sleep 1000"],
        health={"exec": ["test", "!", "-e", "/data/sick"], "interval": 0.2, "retries": 2},
    )
    pet = await oci_manager.create(template, name="checked", memory="64M")
    supervisor = PetSupervisor(oci_manager, scan_interval=0.1)
    supervisor.start()
    try:
        await until(lambda: _starts(oci_manager, pet, 1), what="first start")
        await sh(oci_manager, pet, "touch /data/sick")
        await until(lambda: "health check failed (2/2)" in _log(oci_manager.pets, pet))
        await sh(oci_manager, pet, "rm /data/sick")
        await until(lambda: _starts(oci_manager, pet, 2), what="restart")
    finally:
        await supervisor.stop()
    log = _log(oci_manager.pets, pet)
    assert "unhealthy: 2 health checks failed in a row" in log
    assert oci_manager.get(pet.id).restarts == 1
    chunks = [c async for c in oci_manager.pets.read_logs(pet, tail=200)]
    assert b"".join(chunks) == log.encode()[-200:]


async def _starts(manager: SandboxManager, pet: SandboxRecord, count: int) -> bool:
    result = await manager.exec(pet.id, ["cat", "/data/starts"])
    return result.stdout.decode().count("started") == count


def _log(pets: PetManager, pet: SandboxRecord) -> str:
    path = pets.log_path(pet)
    return path.read_text() if path.exists() else ""


@pytest.mark.runtime
async def test_a_services_ports_are_published_and_keep_their_address(
    oci_manager: SandboxManager,
) -> None:
    from tests.test_ports import ECHO, _echo

    template = pet_template(command=["python3", "-c", ECHO, "7000", "100"], ports=[7000])
    pet = await oci_manager.create(template, name="served", memory="64M")
    (port,) = pet.spec["ports"]
    assert (port["container_port"], port["host_ip"]) == (7000, "127.0.0.1")
    supervisor = PetSupervisor(oci_manager, scan_interval=0.1)
    supervisor.start()
    try:
        assert await _echo(port["host_port"], b"hello pet") == b"HELLO PET"
        # Lost (as in a host reboot): the supervisor re-creates it on the same port.
        await oci_manager.backend.destroy(pet.id)
        assert await _echo(port["host_port"], b"again", deadline=60) == b"AGAIN"
        assert "re-creating it" in _log(oci_manager.pets, pet)
    finally:
        await supervisor.stop()

"""Pets on the real microvm backend (QEMU, TCG here): the volume as a disk image the
guest mounts (size limit, ownership, kept across destroy, re-creation and a dead
VM), the supervisor restarting the service after a VM death and a server restart
(in process, and a real `corral serve` killed with -9), and promotion (in place
with pinned CPUs; with a volume, in place through snapshot and restore, or
re-created with its files where the image has no mount point).

Each boot costs ~4-8 s under TCG: the module boots nine VMs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Corral
from corral.backends.microvm import MicrovmBackend
from corral.client.sync import Sandbox
from corral.errors import CorralError, UnsupportedError
from corral.images import ImageStore
from corral.runtime.cpus import parse_cpus
from corral.runtime.manager import SandboxManager
from corral.runtime.supervisor import PetSupervisor
from corral.spec.template import parse_template
from corral.store import SandboxRecord, Store
from tests.conftest import (
    _sandbox_inits,
    assert_no_leaks,
    counter_script,
    require_binary,
    require_root,
    traversable_dir,
)
from tests.server_harness import ServerProcess
from tests.test_pets import _log, pet_template, until
from tests.test_pets_actor import _toml, wait_for

pytestmark = pytest.mark.runtime

COUNTER = counter_script()
SERVICE = ["/bin/sh", "-c", "echo started >> /data/starts; exec sleep 1000"]


@pytest.fixture(scope="module")
def images(state_root: Path) -> ImageStore:
    return ImageStore(state_root / "images")


@pytest.fixture
async def manager(state_root: Path, images: ImageStore) -> AsyncIterator[SandboxManager]:
    require_root()
    require_binary("qemu-system-x86_64")
    require_binary("debugfs")
    store = Store.for_state_dir(state_root)
    manager = SandboxManager(MicrovmBackend(state_root), store, images)
    yield manager
    for record in store.list():
        await manager.destroy(record.id)
    for volume in manager.pets.volumes.list():
        manager.pets.volumes.remove(volume.tenant, volume.name)
    store.close()
    assert _qemus(state_root) == [], "QEMU processes left"
    assert not (state_root / "volumes").exists() or not any((state_root / "volumes").iterdir())


def _qemus(state_root: Path) -> list[int]:
    """QEMU processes of this state dir's VMs."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(state_root).encode() in cmdline:
            found.append(int(entry))
    return found


async def sh(manager: SandboxManager, record: SandboxRecord, script: str) -> str:
    result = await manager.exec(record.id, ["/bin/sh", "-c", script], timeout=60)
    assert result.ok, (result.stdout + result.stderr).decode()
    return result.stdout.decode()


def _qemu_pid(manager: SandboxManager, record: SandboxRecord) -> int:
    backend = manager.backend
    assert isinstance(backend, MicrovmBackend)
    pid = backend._qemu_pid(record.id)
    assert pid is not None
    return pid


async def test_the_volume_is_a_disk_with_a_real_limit_kept_across_vm_deaths_and_recreation(
    manager: SandboxManager, state_root: Path
) -> None:
    template = pet_template(command=SERVICE)
    pet = await manager.create(template, name="store", memory="256M")
    volume = manager.pets.volumes.volume("local", "store")
    # The host mounts nothing: the image is the VM's disk, mounted by the guest.
    assert not manager.pets.volumes.is_mounted(volume)
    qemu_argv = Path(f"/proc/{_qemu_pid(manager, pet)}/cmdline").read_bytes().split(b"\0")
    assert any(str(volume.image).encode() in arg for arg in qemu_argv), qemu_argv
    report = await sh(
        manager,
        pet,
        "id -u; stat -c %u /data; grep ' /data ' /proc/mounts | cut -d' ' -f3;"
        " echo kept > /data/note;"
        " dd if=/dev/zero of=/data/fill bs=1M count=16 2>&1; echo dd=$?; rm /data/fill",
    )
    uid, owner, fstype, *_ = report.splitlines()
    assert uid == owner == "1000"  # the sandbox user owns its volume
    assert fstype == "ext4"
    assert "No space left on device" in report  # 8M: the file system is the limit
    assert report.endswith("dd=1\n")

    # The supervisor starts the service; a dead VM (QEMU killed) is re-created
    # with the same volume, and the service started again.
    supervisor = PetSupervisor(manager, scan_interval=0.1)
    supervisor.start()
    try:
        await until(lambda: _starts(manager, pet, 1), timeout=60, what="first start")
        await sh(manager, pet, "sync")  # what a service that fsyncs its state has
        os.kill(_qemu_pid(manager, pet), signal.SIGKILL)
        await until(lambda: _starts(manager, pet, 2), timeout=120, what="re-created VM")
        assert "re-creating it" in _log(manager.pets, pet)
        assert await sh(manager, pet, "cat /data/note") == "kept\n"
    finally:
        await supervisor.stop()

    # A server restart: a new manager and supervisor on the same state; the VM
    # outlived the old one, its service (the old server's exec) did not.
    restarted = SandboxManager(MicrovmBackend(state_root), manager.store, manager.images)
    supervisor = PetSupervisor(restarted, scan_interval=0.1)
    supervisor.start()
    try:
        await until(lambda: _starts(restarted, pet, 3), timeout=60, what="service after restart")
    finally:
        await supervisor.stop()
    assert restarted.get(pet.id).state == "running"

    # A pet's VM is not snapshotted: its volume would change under the snapshot.
    with pytest.raises(UnsupportedError, match="cannot be snapshotted"):
        await manager.backend.snapshot(pet.id, state_root / "snap")

    # Written, not synced, then destroyed: destroy flushes the guest before the kill.
    await sh(manager, pet, "echo unsynced > /data/late")
    await manager.destroy(pet.id)
    assert volume.image.exists()
    assert _qemus(state_root) == []
    again = await manager.pets.create(template, name="store", volume="24M", memory="256M")
    assert await sh(manager, again, "cat /data/note /data/late") == "kept\nunsynced\n"
    grown = await sh(manager, again, "dd if=/dev/zero of=/data/more bs=1M count=12 && echo ok")
    assert grown.endswith("ok\n")  # 8M grew to 24M, the data kept
    await manager.destroy(again.id)
    manager.pets.remove_volume("store", tenant="local")
    assert not volume.image.exists()


async def test_a_volume_path_a_vm_cannot_mount_is_refused_and_leaves_nothing(
    manager: SandboxManager, state_root: Path
) -> None:
    template = parse_template(
        {"name": "spaced", "kind": "persistent", "volume": {"size": "8M", "path": "/my data"}},
        source="<t>",
    )
    with pytest.raises(UnsupportedError, match="'/my data' cannot be mounted in a microVM"):
        await manager.create(template, name="spaced", memory="256M")
    assert manager.list() == []
    assert not manager.pets.volumes.volume("local", "spaced").image.parent.exists()
    assert not any((state_root / "sandboxes").iterdir())


async def test_promotion_keeps_the_vm_running_pinned(manager: SandboxManager) -> None:
    cattle = await manager.create("default", memory="256M", timeout=600)
    pid = (await sh(manager, cattle, "sleep 1000 > /dev/null 2>&1 & echo $!")).strip()
    await sh(manager, cattle, "echo mine > /work/file")
    qemu = _qemu_pid(manager, cattle)
    pet = await manager.pets.promote(cattle.id, name="promoted")
    assert (pet.id, pet.kind, pet.name, pet.expires_at) == (
        cattle.id,
        "persistent",
        "promoted",
        None,
    )
    assert _qemu_pid(manager, pet) == qemu  # the same VM: nothing restarted
    assert await sh(manager, pet, f"kill -0 {pid} && echo alive") == "alive\n"
    assert await sh(manager, pet, "cat /work/file") == "mine\n"
    assert _affinity(qemu) == parse_cpus(pet.limits["cpuset"])
    assert await manager.reap(now=time.time() + 10**6) == []


async def test_promotion_with_a_volume_keeps_the_vm_its_disk_and_processes(
    manager: SandboxManager,
) -> None:
    # A template with a [volume] has its mount point in the image, so the VM can
    # take the volume in place: snapshot, restore with it in the empty disk slot.
    template = parse_template({"name": "scratchpad", "volume": {"size": "8M"}}, source="<t>")
    cattle = await manager.create(template, memory="256M")
    await sh(
        manager,
        cattle,
        f"echo code > /work/main.rs; echo tmp > /tmp/kept; nohup sh -c '{COUNTER}'"
        " > /dev/null 2>&1 & while [ ! -s /tmp/count ]; do sleep 0.1; done",
    )
    qemu = _qemu_pid(manager, cattle)
    pet = await manager.pets.promote(cattle.id, name="grown", volume="16M")
    assert pet.spec["pet"]["volume"] == {"size": 16 << 20, "path": "/data"}
    # A restored QEMU whose empty disk slot is now the volume's image.
    image = manager.pets.volumes.volume("local", "grown").image
    assert _qemu_pid(manager, pet) != qemu
    assert str(image).encode() in Path(f"/proc/{_qemu_pid(manager, pet)}/cmdline").read_bytes()
    assert f"promoted from {cattle.id} (in place" in _log(manager.pets, pet)
    before = int(await sh(manager, pet, "cat /tmp/count"))
    await asyncio.sleep(1.0)
    out = await sh(
        manager,
        pet,
        "cat /work/main.rs /tmp/kept /tmp/count; stat -c %u /data; echo x > /data/y && echo ok;"
        " dd if=/dev/zero of=/data/fill bs=1M count=20 2>&1; echo dd=$?",
    )
    code, tmp, count, owner, ok, *_ = out.splitlines()
    assert (code, tmp, owner, ok) == ("code", "tmp", "1000", "ok")
    assert int(count) > before  # the counter started before promotion still counts
    assert "No space left on device" in out
    assert out.endswith("dd=1\n")
    assert _affinity(_qemu_pid(manager, pet)) == parse_cpus(pet.limits["cpuset"])
    # Destroyed (flushed), then re-created from its record: the volume's data is there.
    await manager.destroy(pet.id)
    again = await manager.pets.create(template, name="grown", memory="256M")
    assert await sh(manager, again, "cat /data/y") == "x\n"


async def test_promotion_with_a_volume_without_a_mount_point_restarts_the_vm_on_its_disk(
    manager: SandboxManager,
) -> None:
    # `default` has no /data, and a VM's image is read-only: it boots again under
    # the pet's config (an image with /data, the volume) on its own overlay.
    cattle = await manager.create("default", memory="256M")
    await sh(manager, cattle, "mkdir -p /work/src && echo code > /work/src/main.rs")
    await sh(manager, cattle, "echo tmp > /tmp/kept; sleep 1000 > /dev/null 2>&1 &")
    assert await sh(manager, cattle, "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep") == "1\n"
    pet = await manager.pets.promote(cattle.id, name="moved", volume="8M")
    assert "(re-created, its disk kept;" in _log(manager.pets, pet)
    out = await sh(manager, pet, "cat /work/src/main.rs /tmp/kept; echo x > /data/y && echo ok")
    assert out == "code\ntmp\nok\n"
    sleeping = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep || true"
    assert await sh(manager, pet, sleeping) == "0\n"  # its processes restarted
    assert _affinity(_qemu_pid(manager, pet)) == parse_cpus(pet.limits["cpuset"])
    assert not list(manager.backend.sandboxes_dir.glob(".*"))  # type: ignore[attr-defined]


def _affinity(pid: int) -> set[int]:
    """The host CPUs every thread of `pid` (each vCPU and I/O thread) may run on."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        found.add(frozenset(parse_cpus(status.split("Cpus_allowed_list:")[1].split()[0])))
    assert len(found) == 1, found
    return set(found.pop())


async def _starts(manager: SandboxManager, pet: SandboxRecord, count: int) -> bool:
    try:
        result = await manager.exec(pet.id, ["cat", "/data/starts"], timeout=20)
    except CorralError:  # the VM is down or booting
        await asyncio.sleep(0.5)
        return False
    return result.stdout.decode().count("started") == count


# -- a real server ------------------------------------------------------------------

BOOTS = {
    "name": "booter",
    "kind": "persistent",
    "volume": {"size": "16M"},
    "service": {
        "command": ["/bin/sh", "-c", "echo boot >> /data/boots; sync; exec sleep 100000"],
        "backoff": 0.2,
    },
}


def test_a_microvm_pet_comes_back_after_the_server_is_killed() -> None:
    require_root()
    require_binary("qemu-system-x86_64")
    root = traversable_dir("mvpets")
    inits_before = _sandbox_inits()
    server = ServerProcess(root, backend="microvm")
    try:
        key = server.tenant("vm")
        server.start()
        (root / "booter.toml").write_text(_toml(BOOTS))
        with Corral(server.url, key) as client:
            pet = client.create_pet(root / "booter.toml", name="booter", memory="256M")
            wait_for(lambda: _boots(pet) == 1, "the service's first start", timeout=60)
            qemu = _qemus(root)
            server.kill9()
            server.start()
            # The VM outlived the server; the new server's supervisor starts the service.
            assert _qemus(root) == qemu
            again = client.get("booter")
            wait_for(lambda: _boots(again) == 2, "the service after kill -9", timeout=60)
            assert again.info.kind == "persistent"
            again.kill()
            client.remove_volume("booter")
        server.stop()
        assert _qemus(root) == []
        assert not (root / "volumes").exists() or not any((root / "volumes").iterdir())
    finally:
        server.close()
        assert_no_leaks(root, inits_before)
        shutil.rmtree(root, ignore_errors=True)


def _boots(pet: Sandbox) -> int:
    try:
        result = pet.exec(["cat", "/data/boots"], timeout=20)
    except CorralError:
        return -1  # e.g. while the server restarts
    return result.stdout.decode().count("boot")

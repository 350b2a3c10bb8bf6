"""Promotion on microVMs. A running VM gains a pet's volume: snapshot, restore with
the volume in the disk slot every VM boots with, grow the slot, mount it; the
processes go on. Where that cannot be, the VM boots again under the pet's config
on its own scratch overlay (`recreate_keeping_disk`): its files stay, its
processes restart.

QEMU's `microvm` machine has no hotplug, and a guest kernel only probes the
virtio-mmio devices it was booted with; QEMU does restore a VM with a device
added, but the guest never sees it (measured). So every VM without a volume boots
with an empty disk slot (`volumes.empty_slot`, a zero-byte file); here the
snapshot is restored with that slot's file swapped for the volume's image, QMP
`block_resize` tells the guest the disk's new size, and the agent mounts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from corral.backends.base import ExecRequest, HostMount, SandboxConfig
from corral.backends.microvm import snapshots, volumes
from corral.backends.microvm.agent_client import AgentError
from corral.backends.microvm.qemu import DriveSpec, QmpSession, qmp_call
from corral.backends.sandbox_dir import claim_dir, released_on_failure
from corral.errors import CorralError, ExecError, InvalidStateError, UnsupportedError

if TYPE_CHECKING:
    from corral.backends.microvm.backend import MicrovmBackend

__all__ = ["attach_volume", "recreate_keeping_disk"]

_MAKE_MOUNT_POINT = '[ -d "$1" ] || mkdir -p "$1"'


async def attach_volume(backend: MicrovmBackend, sandbox_id: str, mount: HostMount) -> None:
    """Give running VM `sandbox_id` the volume `mount` (its image) at `mount.target`.

    UnsupportedError, with the VM untouched, when it cannot be done in place: the VM
    has no empty slot, or the mount point is missing on its read-only image and
    cannot be made. After a failure past that point the VM runs on as it was
    (restored without the volume) or the error says it is gone."""
    meta = backend._meta(sandbox_id)
    slot = next((d for d in meta.vm.drives if volumes.is_slot(d)), None)
    if slot is None:
        raise UnsupportedError(
            "the VM has no empty volume slot (it has a volume already)",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="re-create the sandbox with the volume",
        )
    volumes.check_volume(sandbox_id, mount)
    sandbox_dir = backend._dir(sandbox_id)
    if backend._qemu_pid(sandbox_id) is None or (sandbox_dir / "paused").exists():
        raise InvalidStateError(
            "only a running VM can gain a volume",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="resume it first",
        )
    made = await backend.exec(
        sandbox_id,
        ExecRequest(["/bin/sh", "-c", _MAKE_MOUNT_POINT, "sh", mount.target], timeout=30),
    )
    if not made.ok:
        raise UnsupportedError(
            f"the volume's mount point {mount.target} is not in the VM's read-only image"
            " and cannot be made there",
            sandbox_id=sandbox_id,
            backend=backend.name,
            stderr_tail=made.stderr.decode(errors="replace")[-500:],
            hint="give the template a [volume] with this path (its image then has it),"
            " or a path under the workdir or home",
        )
    await volumes.hand_root_to(sandbox_id, mount.source, meta.uid, meta.gid)
    work = sandbox_dir / "attach"
    shutil.rmtree(work, ignore_errors=True)
    await snapshots.snapshot(backend, sandbox_id, work)  # the VM is stopped now
    try:
        saved = json.loads((work / "snapshot.json").read_text())
        filled = DriveSpec(slot.serial, str(mount.source), "raw", False, durable=True)
        spec = dict(saved["meta"]["spec"])
        spec["drives"] = [
            dataclasses.asdict(filled) if volumes.is_slot(DriveSpec(**d)) else d
            for d in spec["drives"]
        ]
        swapped = {**saved, "meta": {**saved["meta"], "spec": spec}}
        (work / "snapshot.json").write_text(json.dumps(swapped))
        try:
            await snapshots.restore(backend, sandbox_id, work)
        except CorralError:
            (work / "snapshot.json").write_text(json.dumps(saved))
            await snapshots.restore(backend, sandbox_id, work)  # back, without the volume
            raise
        size = mount.source.stat().st_size
        await qmp_call(
            sandbox_dir / "qmp.sock", "block_resize", {"device": slot.serial, "size": size}
        )
        async with backend._agent(sandbox_id) as conn:
            try:
                await conn.mount(slot.serial, "ext4", mount.target, read_only=False)
            except AgentError as exc:
                raise ExecError(
                    f"the guest could not mount the volume at {mount.target}: {exc}",
                    sandbox_id=sandbox_id,
                    backend=backend.name,
                    hint="the VM runs on with the volume attached but not mounted;"
                    " destroy it and create the pet again",
                ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def recreate_keeping_disk(backend: MicrovmBackend, config: SandboxConfig) -> None:
    """Boot sandbox `config.sandbox_id` again under `config` on its scratch overlay:
    the guest syncs, QEMU quits (closing the overlay, so its metadata is written),
    and a new VM (new image, limits, volume) starts on the same overlay.

    UnsupportedError, with the VM untouched, when the overlay cannot serve the new
    config (another disk size or user means another scratch base)."""
    from corral.backends.microvm.backend import AGENT_PORTS

    sandbox_id = config.sandbox_id
    backend._meta(sandbox_id)  # NotFoundError first
    sandbox_dir = backend._dir(sandbox_id)
    overlay = sandbox_dir / "scratch.qcow2"
    base = await asyncio.to_thread(
        backend.bundles.scratch_base, config.limits.disk, config.image.uid, config.image.gid
    )
    if await _backing_file(overlay) != str(base):
        raise UnsupportedError(
            "the sandbox's disk cannot be kept: its size or user differs from the new one",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="its files are carried over instead",
        )
    if (sandbox_dir / "paused").exists():
        raise InvalidStateError(
            "a paused VM is not re-created",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="resume it first",
        )
    if backend._qemu_pid(sandbox_id) is not None:
        await volumes.flush(sandbox_dir, AGENT_PORTS)
        async with QmpSession(sandbox_dir / "qmp.sock") as qmp:
            await qmp.quit()
        for _ in range(1000):
            if backend._qemu_pid(sandbox_id) is None:
                break
            await asyncio.sleep(0.01)
        else:
            raise ExecError(
                "the VM did not quit within 10 s",
                sandbox_id=sandbox_id,
                backend=backend.name,
                hint="destroy it and create the pet again",
            )
    kept = backend.sandboxes_dir / f".{sandbox_id}.scratch.qcow2"
    overlay.rename(kept)
    try:
        await backend.destroy(sandbox_id)
        sandbox_dir = claim_dir(backend.sandboxes_dir, sandbox_id, backend.name)
        kept.rename(sandbox_dir / "scratch.qcow2")
    finally:
        kept.unlink(missing_ok=True)
    await released_on_failure(backend._create(config, sandbox_dir), backend.destroy, sandbox_id)


async def _backing_file(overlay: Path) -> str | None:
    """The overlay's backing file, read while QEMU may hold it (`-U`)."""
    proc = await asyncio.create_subprocess_exec(
        *("qemu-img", "info", "-U", "--output=json", str(overlay)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        return None
    info = json.loads(output)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return str(backing) if backing else None

"""A running microVM gains a pet's volume (promotion): snapshot, restore with the volume
in the disk slot every VM boots with, grow the slot, mount it; the processes go on.

QEMU's `microvm` machine has no hotplug, and a guest kernel only probes the
virtio-mmio devices it was booted with; QEMU does restore a VM with a device
added, but the guest never sees it (measured). So every VM without a volume boots
with an empty disk slot (`volumes.empty_slot`, a zero-byte file); here the
snapshot is restored with that slot's file swapped for the volume's image, QMP
`block_resize` tells the guest the disk's new size, and the agent mounts it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import TYPE_CHECKING

from corral.backends.base import ExecRequest, HostMount
from corral.backends.microvm import snapshots, volumes
from corral.backends.microvm.agent_client import AgentError
from corral.backends.microvm.qemu import DriveSpec, qmp_call
from corral.errors import CorralError, ExecError, InvalidStateError, UnsupportedError

if TYPE_CHECKING:
    from corral.backends.microvm.backend import MicrovmBackend

__all__ = ["attach_volume"]

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

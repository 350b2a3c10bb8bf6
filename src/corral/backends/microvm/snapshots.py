"""MicroVM snapshots through QMP: pause, migrate to a file, restore with `-incoming`.

A snapshot directory holds:

    memory          QEMU's migration stream (RAM and device state) of the paused VM
    scratch.qcow2   the sandbox's overlay as it was (its base is the cached scratch ext4)
    snapshot.json   the VM's spec and the sandbox's record, to start an identical VM

Restoring copies `scratch.qcow2` into the new sandbox (each sandbox restored
from one snapshot, as `fork` does, has an overlay of its own), starts QEMU
paused with `-incoming defer`, feeds it the stream, runs `cont`, and sets the
guest's clock through the agent (the guest wakes up at its snapshot time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corral.backends.base import BackendStatus
from corral.backends.microvm import volumes
from corral.backends.microvm.qemu import DriveSpec, QmpSession
from corral.backends.sandbox_dir import claim_dir, released_on_failure
from corral.errors import (
    ExecError,
    InvalidStateError,
    NotFoundError,
    SandboxStartError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from corral.backends.microvm.backend import MicrovmBackend, VmMeta

__all__ = ["fork", "restore", "save_warm", "snapshot", "warm_start"]

RESTORE_DEADLINE = 60.0
# QEMU rate-limits migration (to 128 MiB/s by default): to a local file, don't.
_BANDWIDTH = 64 << 30


async def snapshot(
    backend: MicrovmBackend, sandbox_id: str, dest: Path, *, keep_running: bool = False
) -> None:
    meta = backend._meta(sandbox_id)
    if volumes.has_volumes(meta.vm):
        raise UnsupportedError(
            "a microVM with a pet's volume cannot be snapshotted: the volume lives on and"
            " changes, so a restore would find it changed under the guest",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="keep the pet's state on its volume; it survives restarts and re-creation",
        )
    if backend._qemu_pid(sandbox_id) is None:
        raise InvalidStateError(
            "only a running sandbox can be snapshotted",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="its VM has stopped: destroy it, or restore it from an earlier snapshot",
        )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sandbox_dir = backend._dir(sandbox_id)
    memory = dest / "memory"
    async with QmpSession(sandbox_dir / "qmp.sock") as qmp:
        await qmp.run("stop")
        try:
            await qmp.run("migrate-set-parameters", {"max-bandwidth": _BANDWIDTH})
            await qmp.run("migrate", {"uri": f"exec:cat > {shlex.quote(str(memory))}"})
            await qmp.wait_migration()
            # Migration flushed and released the disks: the overlay is consistent now.
            await asyncio.to_thread(
                shutil.copyfile, sandbox_dir / "scratch.qcow2", dest / "scratch.qcow2"
            )
        except BaseException:
            if not (sandbox_dir / "paused").exists():
                await qmp.run("cont")
            raise
        record = {"meta": dataclasses.asdict(meta)}
        (dest / "snapshot.json").write_text(json.dumps(record, indent=2))
        if keep_running and not (sandbox_dir / "paused").exists():
            await qmp.run("cont")  # a sandbox the user paused stays paused
        else:
            await qmp.quit()
    if not keep_running:
        for _ in range(200):
            if backend._qemu_pid(sandbox_id) is None:
                break
            await asyncio.sleep(0.01)


async def restore(backend: MicrovmBackend, sandbox_id: str, source: Path) -> None:
    """Bring `sandbox_id` up from the snapshot in `source`: in place when it exists and
    is stopped, else as a new sandbox (so one snapshot can seed many)."""
    from corral.backends.microvm.backend import VmMeta

    source = Path(source)
    try:
        record = json.loads((source / "snapshot.json").read_text())
    except (OSError, ValueError):
        raise NotFoundError(
            f"no microVM snapshot at {source}",
            sandbox_id=sandbox_id,
            backend=backend.name,
            hint="pass the directory snapshot() wrote",
        ) from None
    saved = VmMeta(**record["meta"])
    sandbox_dir = backend._dir(sandbox_id)
    if sandbox_dir.is_dir():
        if await backend.status(sandbox_id) not in (BackendStatus.STOPPED,):
            raise InvalidStateError(
                "only a stopped sandbox can be restored in place",
                sandbox_id=sandbox_id,
                backend=backend.name,
                hint="snapshot() stops it; or restore into a new sandbox id",
            )
        await _restore(backend, sandbox_id, sandbox_dir, source, saved)
        return
    sandbox_dir = claim_dir(backend.sandboxes_dir, sandbox_id, backend.name)
    await released_on_failure(
        _restore(backend, sandbox_id, sandbox_dir, source, saved),
        backend.destroy,
        sandbox_id,
    )


async def fork(backend: MicrovmBackend, source: Path, sandbox_ids: Sequence[str]) -> None:
    """Restore several new sandboxes from one snapshot; on any failure none is left."""
    results = await asyncio.gather(
        *(restore(backend, sid, source) for sid in sandbox_ids), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for sid in sandbox_ids:
            await backend.destroy(sid)
        raise failures[0]


async def _restore(
    backend: MicrovmBackend,
    sandbox_id: str,
    sandbox_dir: Path,
    source: Path,
    saved: VmMeta,
    env: dict[str, str] | None = None,
) -> None:
    """Restore into `sandbox_dir` (claimed by the caller); `env` replaces the
    snapshot's exec environment (a warm start serves a new sandbox's config)."""
    overlay = sandbox_dir / "scratch.qcow2"
    await asyncio.to_thread(shutil.copyfile, source / "scratch.qcow2", overlay)
    spec = saved.vm
    drives = tuple(
        DriveSpec(d.serial, str(overlay), d.format, d.read_only)
        if d.serial == "scratch"
        else volumes.empty_slot(sandbox_dir)  # each sandbox its own (QEMU locks it)
        if volumes.is_slot(d)
        else d
        for d in spec.drives
    )
    for drive in drives:
        if not Path(drive.path).exists():
            raise SandboxStartError(
                f"the snapshot's disk {drive.path} is gone",
                sandbox_id=sandbox_id,
                backend=backend.name,
                hint="the microVM cache was cleared: take a new snapshot",
            )
    vm = dataclasses.replace(spec, drives=drives)
    meta = dataclasses.replace(
        saved,
        spec=vm.to_json(),
        cgroup=f"{backend.cgroup_parent}/{sandbox_id}",
        restored_from=str(source),
        env=saved.env if env is None else env,
    )
    backend._write_meta(sandbox_dir, meta)
    for stale in ("qemu.pid", "qmp.sock", "console.log", "paused"):
        (sandbox_dir / stale).unlink(missing_ok=True)
    await backend.start_vm(sandbox_id, meta, incoming=True)
    memory = source / "memory"
    try:
        async with QmpSession(sandbox_dir / "qmp.sock") as qmp:
            await qmp.run("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(memory))}"})
            await _wait_incoming(qmp)
            await qmp.run("cont")
    except ExecError as exc:
        raise SandboxStartError(
            f"restoring the VM failed: {exc.message}",
            sandbox_id=sandbox_id,
            backend=backend.name,
            stderr_tail=(sandbox_dir / "qemu.log").read_text(errors="replace")[-1000:]
            if (sandbox_dir / "qemu.log").exists()
            else None,
            hint="a snapshot restores only with the same QEMU, kernel and bundle",
        ) from exc
    await backend.wait_for_agent(sandbox_id, RESTORE_DEADLINE)  # and sets the clock


async def _wait_incoming(qmp: QmpSession) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + RESTORE_DEADLINE
    while loop.time() < until:
        status = (await qmp.run("query-status")).get("status")
        if status == "paused":
            return
        if status not in ("inmigrate", "prelaunch"):
            raise ExecError(f"the incoming VM is {status}, not paused", backend="microvm")
        await asyncio.sleep(0.005)
    raise ExecError("the incoming migration did not finish", backend="microvm")


async def warm_start(
    backend: MicrovmBackend, sandbox_id: str, sandbox_dir: Path, warm: Path, env: dict[str, str]
) -> bool:
    """Start the new sandbox from the warm snapshot in `warm`, if there is a usable one.

    False (and nothing left running) when there is none or it no longer restores;
    a broken warm snapshot is removed so the next cold boot makes a new one.
    """
    from corral.backends.microvm.backend import VmMeta

    try:
        saved = VmMeta(**json.loads((warm / "snapshot.json").read_text())["meta"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    try:
        await _restore(backend, sandbox_id, sandbox_dir, warm, saved, env)
    except SandboxStartError:
        pid = backend._qemu_pid(sandbox_id)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(warm, ignore_errors=True)
        for leftover in sandbox_dir.iterdir():
            leftover.unlink(missing_ok=True)
        return False
    return True


async def save_warm(backend: MicrovmBackend, sandbox_id: str, warm: Path) -> None:
    """Snapshot a freshly booted sandbox (it keeps running) as the warm start for its kind."""
    if warm.exists():
        return
    warm.parent.mkdir(parents=True, exist_ok=True)
    temp = warm.with_name(f".{warm.name}-{os.getpid()}-{id(warm):x}")
    try:
        await snapshot(backend, sandbox_id, temp, keep_running=True)
        temp.rename(warm)
    except (ExecError, OSError):
        pass  # the sandbox is fine; the next cold boot tries again
    finally:
        shutil.rmtree(temp, ignore_errors=True)

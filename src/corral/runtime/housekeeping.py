"""Keeping store and backend in step: the reaper's pass and reconcile.

Both run in `corral serve` (reconcile at start, reap every second) and in
`corral gc` on a host without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from corral.backends.base import BackendStatus
from corral.errors import NotFoundError
from corral.runtime.owners import STALE_TRANSITION_SECONDS, owner_alive, this_process
from corral.runtime.state import SandboxState

if TYPE_CHECKING:
    from corral.runtime.manager import SandboxManager


async def reap(manager: SandboxManager, *, now: float | None = None) -> list[str]:
    """Destroy ephemeral sandboxes whose timeout has passed; their ids."""
    now = time.time() if now is None else now
    reaped = []
    for record in manager.store.list(expired_before=now, backend=manager.backend.name):
        if record.kind != "ephemeral":
            continue
        if record.state in (SandboxState.CREATING, SandboxState.DESTROYING) and owner_alive(
            record.owner
        ):
            continue  # someone is still on it; the next pass gets it
        with contextlib.suppress(NotFoundError):
            manager.store.update(record.id, state=SandboxState.DESTROYING, owner=this_process())
            await asyncio.shield(manager._release(record.id))
            reaped.append(record.id)
    return reaped


async def reconcile(manager: SandboxManager, *, now: float | None = None) -> dict[str, list[str]]:
    """Settle the store with what the backend holds (at server start and in `gc`):
    adopt what still runs, finish creates/destroys whose process died, mark as
    failed what the backend lost, destroy what has no record."""
    now = time.time() if now is None else now
    report: dict[str, list[str]] = {"adopted": [], "stale": [], "lost": []}
    for record in manager.store.list(backend=manager.backend.name):
        if record.state in (SandboxState.CREATING, SandboxState.DESTROYING):
            abandoned = not owner_alive(record.owner)
            if abandoned or now - record.updated_at > STALE_TRANSITION_SECONDS:
                await asyncio.shield(manager._release(record.id))
                report["stale"].append(record.id)
            continue
        if record.state == SandboxState.FAILED:
            continue
        status = await manager.backend.status(record.id)
        if status == BackendStatus.MISSING and record.pool is not None:
            # An idle pool member nobody holds: drop it; its pool refills.
            manager.store.delete(record.id)
            report["lost"].append(record.id)
        elif status == BackendStatus.MISSING and record.kind == "persistent":
            # A pet comes back: the pet supervisor re-creates what is stopped.
            manager.store.update(
                record.id,
                state=SandboxState.STOPPED,
                error="lost: the backend no longer held it; re-created by the supervisor",
            )
            report["lost"].append(record.id)
        elif status == BackendStatus.MISSING:
            manager.store.update(
                record.id,
                state=SandboxState.FAILED,
                error="lost: the backend no longer holds this sandbox (e.g. host reboot)",
            )
            report["lost"].append(record.id)
        else:
            report["adopted"].append(record.id)
    known = manager.store.ids()
    report["orphans"] = []
    for sandbox_id in await manager.backend.list_sandboxes():
        if sandbox_id not in known:
            await manager.backend.destroy(sandbox_id)
            report["orphans"].append(sandbox_id)
    return report

"""The reaper: a background task that destroys ephemeral sandboxes past their timeout.

Deadlines live in the store (`expires_at`), so a restarted server reaps what
expired while it was down on its first pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from corral.errors import CorralError
from corral.runtime.manager import SandboxManager

log = logging.getLogger("corral.reaper")


class Reaper:
    """Runs `manager.reap()` every `interval` seconds until stopped."""

    def __init__(self, manager: SandboxManager, interval: float = 1.0) -> None:
        self.manager = manager
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.reaped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="corral-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                reaped = await self.manager.reap()
            except CorralError as error:
                log.warning("reaper pass failed: %s", error)
            else:
                self.reaped += len(reaped)
                for sandbox_id in reaped:
                    log.info("reaped %s (timeout passed)", sandbox_id)
            await asyncio.sleep(self.interval)

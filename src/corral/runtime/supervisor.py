"""The pet supervisor: keeps every pet on this backend running, in the server.

A pet's service runs as a supervised exec inside its sandbox (the sandbox's PID 1
is the runtime's init; the service is the process the pet exists for). Its
output goes to the pet's log. When it exits (or its health check fails
`retries` times in a row, or the sandbox itself is gone) the restart policy
decides: `always` restarts, `on-failure` restarts unless it exited 0. Restarts
wait `backoff` seconds, doubling up to `max_backoff`; `crash_limit` failures in
a row, each within `stable_after` seconds of starting, mark the pet failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from corral.backends.base import BackendStatus, ExecEvent, ExecRequest, Output
from corral.errors import CorralError, NotFoundError
from corral.runtime.state import SandboxState
from corral.store import SandboxRecord

if TYPE_CHECKING:
    from corral.runtime.manager import SandboxManager

__all__ = ["PetSupervisor"]

log = logging.getLogger("corral.supervisor")

# Runs the service, first killing an instance a previous server left behind (its
# exec's pipe went with that server, so nothing else would stop it).
SERVICE_WRAPPER = """
pidfile=/tmp/.corral-service.pid
if [ -r "$pidfile" ]; then kill -KILL "$(cat "$pidfile")" 2>/dev/null; fi
echo $$ > "$pidfile"
exec "$@"
"""
TCP_PROBE = 'exec 3<>"/dev/tcp/127.0.0.1/$1"'
_SUPERVISED = (SandboxState.RUNNING, SandboxState.STOPPED)


@dataclass(frozen=True, slots=True)
class _Ended:
    """How one run of a pet ended: `failed` unless its service exited 0."""

    failed: bool
    what: str


class PetSupervisor:
    """Watch every pet (one task each); started and stopped with the server."""

    def __init__(
        self, manager: SandboxManager, *, scan_interval: float = 0.5, stable_after: float = 10.0
    ) -> None:
        self.manager = manager
        self.pets = manager.pets
        self.scan_interval = scan_interval
        self.stable_after = stable_after
        self._scanner: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        for orphan in self.pets.unmount_orphans():
            log.info("unmounted volume %s: no pet uses it", orphan)
        if self._scanner is None:
            self._scanner = asyncio.create_task(self._scan_loop(), name="corral-pets")

    async def stop(self) -> None:
        """Stop watching; running services are killed (their execs end with this
        process), the sandboxes and volumes stay for the next server."""
        tasks = [t for t in (self._scanner, *self._watchers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._scanner = None
        self._watchers.clear()

    async def _scan_loop(self) -> None:
        while True:
            try:
                self.scan()
            except CorralError as error:
                log.warning("pet scan failed: %s", error)
            await asyncio.sleep(self.scan_interval)

    def scan(self) -> None:
        """Start a watcher for each pet that should run and has none."""
        for record in self.pets.live_pets():
            watcher = self._watchers.get(record.id)
            if record.state in _SUPERVISED and (watcher is None or watcher.done()):
                self._watchers[record.id] = asyncio.create_task(
                    self._watch(record.id), name=f"corral-pet-{record.id}"
                )

    def _current(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            record = self.manager.store.get(sandbox_id)
        except NotFoundError:
            return None
        return record if record.state in _SUPERVISED else None

    async def _watch(self, sandbox_id: str) -> None:
        crashes = 0
        delay: float | None = None
        while (record := self._current(sandbox_id)) is not None:
            pet: Mapping[str, Any] = record.spec["pet"]
            delay = delay or float(pet["backoff"])
            started = time.monotonic()
            try:
                ended = await self._run_once(record)
            except (CorralError, OSError) as error:
                ended = _Ended(True, f"could not run: {error}")
            if (record := self._current(sandbox_id)) is None:
                return
            self.pets.log(record, ended.what)
            if not ended.failed and pet["restart"] == "on-failure":
                self.pets.log(record, "not restarted (restart = on-failure)")
                return
            if time.monotonic() - started >= self.stable_after:
                crashes, delay = 0, float(pet["backoff"])
            crashes += 1
            if crashes >= int(pet["crash_limit"]):
                self._fail(record, crashes, ended)
                return
            self.pets.log(record, f"restart {record.restarts + 1} in {delay:g}s")
            await asyncio.sleep(delay)
            if (record := self._current(sandbox_id)) is None:
                return
            self.manager.store.update(record.id, restarts=record.restarts + 1)
            delay = min(delay * 2, float(pet["max_backoff"]))

    def _fail(self, record: SandboxRecord, crashes: int, ended: _Ended) -> None:
        reason = (
            f"crash loop: stopped after {crashes} failures in a row, each within"
            f" {self.stable_after:g}s of starting (last: {ended.what});"
            f" see `corral logs {record.name or record.id}`"
        )
        self.manager.store.update(record.id, state=SandboxState.FAILED, error=reason)
        self.pets.log(record, "marked failed: " + reason)
        log.warning("pet %s (%s) failed: %s", record.name, record.id, reason)

    async def _run_once(self, record: SandboxRecord) -> _Ended:
        status = await self.manager.backend.status(record.id)
        if status in (BackendStatus.MISSING, BackendStatus.STOPPED, BackendStatus.CREATED):
            self.pets.log(record, f"the sandbox is {status}: re-creating it")
            await self.pets.recreate(record)
            record = self.manager.store.update(record.id, state=SandboxState.RUNNING, error=None)
        elif record.state == SandboxState.STOPPED:
            record = self.manager.store.update(record.id, state=SandboxState.RUNNING, error=None)
        service: Mapping[str, Any] | None = record.spec["pet"].get("service")
        if service is None:
            return await self._watch_sandbox(record)
        return await self._run_service(record, service)

    async def _watch_sandbox(self, record: SandboxRecord) -> _Ended:
        """A pet without a service: it fails when its sandbox's main process goes."""
        while self._current(record.id) is not None:
            await asyncio.sleep(self.scan_interval)
            status = await self.manager.backend.status(record.id)
            if status in (BackendStatus.MISSING, BackendStatus.STOPPED):
                return _Ended(True, f"the sandbox's main process is gone ({status})")
        return _Ended(False, "no longer supervised")

    async def _run_service(self, record: SandboxRecord, service: Mapping[str, Any]) -> _Ended:
        command = [str(arg) for arg in service["command"]]
        argv = ["/bin/sh", "-c", SERVICE_WRAPPER, "corral-service", *command]
        self.pets.log(record, "service starting: " + shlex.join(command))
        stream = self.manager.backend.exec_stream(
            record.id, ExecRequest(argv, env=dict(service.get("env") or {}))
        )
        tasks = {asyncio.create_task(self._consume(record, stream))}
        health: Mapping[str, Any] | None = service.get("health")
        if health is not None:
            tasks.add(asyncio.create_task(self._health(record, health)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return done.pop().result()

    async def _consume(
        self, record: SandboxRecord, stream: AsyncGenerator[ExecEvent] | Any
    ) -> _Ended:
        """Copy the service's output into the log; closing the stream (cancelled)
        kills the service."""
        events = cast("AsyncGenerator[ExecEvent]", stream)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Output):
                    self.pets.append_log(record, event.data)
                else:
                    what = f"service exited with code {event.exit_code}"
                    if event.reason:
                        what += f" ({event.reason})"
                    return _Ended(event.exit_code != 0, what)
        return _Ended(True, "service output ended without an exit status")

    async def _health(self, record: SandboxRecord, health: Mapping[str, Any]) -> _Ended:
        failures = 0
        retries = int(health["retries"])
        while True:
            await asyncio.sleep(float(health["interval"]))
            with contextlib.suppress(NotFoundError):
                if self.manager.store.get(record.id).state == SandboxState.PAUSED:
                    continue  # frozen on purpose: nothing to probe
            detail = await self._probe(record, health)
            if detail is None:
                failures = 0
                continue
            failures += 1
            self.pets.log(record, f"health check failed ({failures}/{retries}): {detail}")
            if failures >= retries:
                return _Ended(True, f"unhealthy: {retries} health checks failed in a row")

    async def _probe(self, record: SandboxRecord, health: Mapping[str, Any]) -> str | None:
        """None when healthy, else what failed."""
        if health.get("tcp") is not None:
            port = str(health["tcp"])
            argv = ["bash", "-c", TCP_PROBE, "probe", port]
            what = f"tcp port {port}"
        else:
            argv = [str(arg) for arg in health["exec"]]
            what = shlex.join(argv)
        try:
            result = await self.manager.backend.exec(
                record.id, ExecRequest(argv, timeout=float(health["timeout"]))
            )
        except CorralError as error:
            return f"{what}: {error}"
        if result.ok:
            return None
        tail = result.stderr.decode(errors="replace").strip()[-200:]
        return f"{what}: exit {result.exit_code}" + (f" ({tail})" if tail else "")

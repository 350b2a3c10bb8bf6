"""SandboxManager: the sandbox lifecycle over one backend, the store and the image store.

Every change is written to the store before and after the backend acts, so a
crash at any point leaves a record (or a backend leftover) that `gc` settles.
"""

from __future__ import annotations

import builtins
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.backends.base import (
    Backend,
    BackendStatus,
    ExecEvent,
    ExecRequest,
    ExecResult,
    HostMount,
    SandboxConfig,
    SandboxLimits,
    SandboxStats,
)
from corral.errors import (
    FileTooLargeError,
    InvalidStateError,
    IsolationPolicyError,
    NotFoundError,
)
from corral.runtime.hostpaths import resolve_mount_source
from corral.runtime.state import SandboxState, check_transition
from corral.spec.template import Isolation, Template, load_template
from corral.spec.units import parse_size
from corral.store import SandboxRecord, Store

if TYPE_CHECKING:
    from corral.images import ImageStore

RUNTIME_ISOLATION = {
    "crun": Isolation.CONTAINER,
    "runc": Isolation.CONTAINER,
    "runsc": Isolation.GVISOR,
}
STALE_TRANSITION_SECONDS = 600.0


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


class SandboxManager:
    """Create, drive and destroy sandboxes; the one place that keeps store and backend in step."""

    def __init__(
        self,
        backend: Backend,
        store: Store,
        images: ImageStore,
        *,
        max_file_bytes: int = 64 << 20,
        default_runtime: str | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.images = images
        self.max_file_bytes = max_file_bytes
        self.default_runtime = default_runtime

    # -- create / destroy -----------------------------------------------------

    async def create(
        self,
        template: str | Path | Template = "default",
        *,
        runtime: str | None = None,
        memory: str | int | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        disk: str | int | None = None,
        cpuset: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        progress: bool = False,
    ) -> SandboxRecord:
        """Create and start a sandbox; on failure nothing is left (record included)."""
        spec = template if isinstance(template, Template) else load_template(template)
        runtime = self._choose_runtime(spec, runtime)
        image = self.images.build(spec, progress=progress)
        defaults = spec.resources
        limits = SandboxLimits(
            vcpus=float(cpus if cpus is not None else defaults.vcpus),
            memory=parse_size(memory) if memory is not None else defaults.memory,
            pids=pids if pids is not None else defaults.pids,
            disk=parse_size(disk) if disk is not None else defaults.disk,
            cpuset=cpuset or defaults.cpuset,
        )
        mounts = list(image.host_mounts)
        for mount in spec.mounts:
            source = resolve_mount_source(mount.source)
            if source is None or not source.exists():
                if mount.optional:
                    continue
                raise NotFoundError(
                    f"template '{spec.name}': mount source '{mount.source}' does not exist",
                    hint="create it, or mark the mount optional = true",
                )
            if any(source == m.source and mount.target == m.target for m in mounts):
                continue
            mounts.append(HostMount(source, mount.target))
        sandbox_id = new_sandbox_id()
        now = time.time()
        sandbox_timeout = timeout if timeout is not None else spec.timeout
        record = SandboxRecord(
            id=sandbox_id,
            name=name,
            template=spec.name,
            backend=self.backend.name,
            runtime=runtime,
            state=SandboxState.CREATING,
            kind=spec.kind,
            image_digest=image.digest,
            created_at=now,
            updated_at=now,
            expires_at=now + sandbox_timeout if spec.kind == "ephemeral" else None,
            labels=dict(labels or {}),
            spec={
                "limits": {
                    "vcpus": limits.vcpus,
                    "memory": limits.memory,
                    "pids": limits.pids,
                    "disk": limits.disk,
                    "cpuset": limits.cpuset,
                },
                "timeout": sandbox_timeout,
                "env": dict(env or {}),
            },
        )
        self.store.insert(record)
        config = SandboxConfig(
            sandbox_id=sandbox_id,
            image=image.to_ref(),
            limits=limits,
            env=dict(env or {}),
            mounts=mounts,
            network=spec.network,
            labels=dict(labels or {}),
            runtime=runtime,
        )
        try:
            await self.backend.create(config)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.backend.destroy(sandbox_id)
            self.store.delete(sandbox_id)
            raise
        return self.store.update(sandbox_id, state=SandboxState.RUNNING)

    async def destroy(self, sandbox_id: str, *, tenant: str | None = None) -> None:
        """Release everything; NotFoundError when the sandbox is already gone."""
        record = self.store.get(sandbox_id, tenant=tenant)
        if record.state != SandboxState.DESTROYING:
            check_transition(SandboxState(record.state), SandboxState.DESTROYING, record.id)
            self.store.update(record.id, state=SandboxState.DESTROYING)
        await self.backend.destroy(record.id)
        self.store.delete(record.id)

    # -- use ------------------------------------------------------------------

    def get(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        return self.store.get(sandbox_id, tenant=tenant)

    def list(self, **filters: Any) -> list[SandboxRecord]:
        return self.store.list(**filters)

    def _running(self, sandbox_id: str) -> SandboxRecord:
        record = self.store.get(sandbox_id)
        if record.state != SandboxState.RUNNING:
            raise InvalidStateError(
                f"sandbox is {record.state}, not running",
                sandbox_id=record.id,
                hint="create a new sandbox, or resume it if paused",
            )
        return record

    def exec_stream(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[ExecEvent]:
        record = self._running(sandbox_id)
        request = ExecRequest(
            list(argv), env=dict(env or {}), cwd=cwd, stdin=stdin, timeout=timeout
        )
        return self.backend.exec_stream(record.id, request)

    async def exec(self, sandbox_id: str, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        record = self._running(sandbox_id)
        return await self.backend.exec(record.id, ExecRequest(list(argv), **kwargs))

    async def put_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        if len(data) > self.max_file_bytes:
            raise FileTooLargeError(
                f"file of {len(data)} bytes is over the limit of {self.max_file_bytes} bytes",
                sandbox_id=sandbox_id,
                hint="copy a smaller file or raise max_file_bytes in the configuration",
            )
        record = self._running(sandbox_id)
        await self.backend.put_file(record.id, path, data, mode)

    async def get_file(self, sandbox_id: str, path: str) -> bytes:
        record = self._running(sandbox_id)
        return await self.backend.get_file(record.id, path, self.max_file_bytes)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        return await self.backend.stats(self._running(sandbox_id).id)

    async def pause(self, sandbox_id: str) -> None:
        record = self._running(sandbox_id)
        await self.backend.pause(record.id)
        self.store.update(record.id, state=SandboxState.PAUSED)

    async def resume(self, sandbox_id: str) -> None:
        record = self.store.get(sandbox_id)
        check_transition(SandboxState(record.state), SandboxState.RUNNING, record.id)
        await self.backend.resume(record.id)
        self.store.update(record.id, state=SandboxState.RUNNING)

    # -- housekeeping ---------------------------------------------------------

    async def gc(self, *, now: float | None = None) -> dict[str, builtins.list[str]]:
        """Settle store and backend: reap expired, destroy orphans, drop lost records."""
        now = time.time() if now is None else now
        report: dict[str, builtins.list[str]] = {
            "expired": [],
            "orphans": [],
            "lost": [],
            "stale": [],
        }
        for record in self.store.list():
            if record.backend != self.backend.name:
                continue
            stale = (
                record.state in (SandboxState.CREATING, SandboxState.DESTROYING)
                and now - record.updated_at > STALE_TRANSITION_SECONDS
            )
            if record.expires_at is not None and record.expires_at <= now:
                report["expired"].append(record.id)
            elif stale or record.state == SandboxState.FAILED:
                report["stale"].append(record.id)
            elif await self.backend.status(record.id) == BackendStatus.MISSING:
                report["lost"].append(record.id)
                self.store.delete(record.id)
                continue
            else:
                continue
            await self.backend.destroy(record.id)
            self.store.delete(record.id)
        known = self.store.ids()
        for sandbox_id in await self.backend.list_sandboxes():
            if sandbox_id not in known:
                await self.backend.destroy(sandbox_id)
                report["orphans"].append(sandbox_id)
        return report

    def _choose_runtime(self, spec: Template, runtime: str | None) -> str | None:
        """The runtime for a sandbox of `spec`: the one asked for, if the template
        allows its isolation level; else the template's first allowed level that
        this backend gives (so a template's `isolation` order is its default)."""
        if self.backend.name == "microvm":
            self._require_level(spec, Isolation.MICROVM)
            return runtime
        if runtime is not None:
            self._require_level(spec, RUNTIME_ISOLATION.get(runtime, Isolation.CONTAINER))
            return runtime
        container_runtime = self.default_runtime or "crun"
        for level in spec.isolation:
            if level == Isolation.GVISOR:
                return "runsc"
            if level == RUNTIME_ISOLATION.get(container_runtime, Isolation.CONTAINER):
                return container_runtime
        self._require_level(spec, RUNTIME_ISOLATION.get(container_runtime, Isolation.CONTAINER))
        return container_runtime

    def _require_level(self, spec: Template, level: Isolation) -> None:
        if level not in spec.isolation:
            raise IsolationPolicyError(
                f"template '{spec.name}' does not allow isolation '{level}'"
                f" (allowed: {', '.join(spec.isolation)})",
                backend=self.backend.name,
                hint="choose a runtime or backend that gives an allowed level",
            )

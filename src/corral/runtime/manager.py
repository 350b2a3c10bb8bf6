"""SandboxManager: the sandbox lifecycle over one backend, the store and the image store.

Every change is written to the store before and after the backend acts, so a
crash at any point leaves a record (or a backend leftover) that `gc` settles.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecEvent,
    ExecRequest,
    ExecResult,
    HostMount,
    PortMapping,
    SandboxConfig,
    SandboxStats,
)
from corral.backends.ports import DEFAULT_ADDRESS, check_addresses, parse_port, port_mapping
from corral.errors import (
    FileTooLargeError,
    InvalidStateError,
    UnsupportedError,
)
from corral.runtime import admission, housekeeping, transfer
from corral.runtime.owners import new_sandbox_id, owner_alive, this_process
from corral.runtime.state import SandboxState, check_transition
from corral.spec.template import Template, load_template
from corral.store import Quota, SandboxRecord, Store

if TYPE_CHECKING:
    from corral.api.models import Inspection
    from corral.config import Settings
    from corral.images import ImageStore
    from corral.runtime.pets import PetManager


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
        publish_addresses: Sequence[str] = (DEFAULT_ADDRESS,),
    ) -> None:
        self.backend = backend
        self.store = store
        self.images = images
        self.max_file_bytes = max_file_bytes
        self.default_runtime = default_runtime
        # Host addresses sandboxes' ports may be published on (the first by default).
        self.publish_addresses = tuple(publish_addresses)

    @functools.cached_property
    def pets(self) -> PetManager:
        """Pets: names, volumes, pinned CPUs, memory, promotion, service supervision."""
        from corral.runtime.pets import PetManager

        return PetManager(self, self.images.root.parent)

    @classmethod
    def from_settings(cls, settings: Settings, store: Store | None = None) -> SandboxManager:
        """The manager a CLI command or server uses: the configured backend, database
        (`store`, when the caller keeps one open) and image store."""
        from corral.backends.registry import load_backend
        from corral.images import ImageStore

        if store is None:
            store = Store.open(settings.database_url, settings.state_dir)
        return cls(
            load_backend(settings),
            store,
            ImageStore(settings.state_dir / "images"),
            max_file_bytes=settings.max_file_bytes,
            default_runtime=settings.oci.runtime if settings.backend == "oci" else None,
            publish_addresses=settings.publish_addresses,
        )

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
        metadata: Mapping[str, object] | None = None,
        name: str | None = None,
        tenant: str = "local",
        progress: bool = False,
        pool: str | None = None,
        pet: Mapping[str, Any] | None = None,
        extra_mounts: Sequence[HostMount] = (),
        ports: Sequence[PortMapping | str | int] = (),
    ) -> SandboxRecord:
        """Create and start a sandbox for `tenant`; on failure nothing is left (record
        included). The tenant's quota is checked in the same transaction as the insert.
        With `pool` it idles in that warm pool (no timeout) until claimed. `ports`
        (PortMapping, or "[[IP:]HOST:]CONTAINER" / a container port) are published
        on the host, on the first of `publish_addresses` unless one is given."""
        spec = template if isinstance(template, Template) else load_template(template)
        published = self._ports(ports)
        if spec.kind == "persistent" and pet is None:
            # A pet: its name, volume, pinned CPUs and memory are settled by the pets'
            # allocator, which then comes back here with `pet` and the volume mount.
            return await self.pets.create(
                spec, runtime=runtime, memory=memory, cpus=cpus, pids=pids, disk=disk,
                cpuset=cpuset, env=env, labels=labels, metadata=metadata, name=name,
                tenant=tenant, progress=progress, ports=published,
            )  # fmt: skip
        runtime = self._choose_runtime(spec, runtime)
        # A cached image is a file read away; a first build (or a new name for an
        # image) runs in a thread: it can take a while, and a server's other
        # requests must not wait on it. (Handing the cached case to a thread cost
        # more than the lookup, ~1 ms with a busy event loop.)
        image = self.images.get(spec)
        if image is None or spec.name not in image.names:
            image = await asyncio.to_thread(self.images.build, spec, progress=progress)
        if pet is None and cpuset is None:
            cpuset = self.pets.cattle_cpus()  # kept off the CPUs pinned to pets
        limits = admission.limits_for(
            spec, vcpus=cpus, memory=memory, pids=pids, disk=disk, cpuset=cpuset
        )
        mounts = admission.template_mounts(spec, image.host_mounts) + list(extra_mounts)
        sandbox_id = new_sandbox_id()
        now = time.time()
        sandbox_timeout = timeout if timeout is not None else spec.timeout
        record = SandboxRecord(
            id=sandbox_id,
            tenant=tenant,
            owner=this_process(),
            metadata=dict(metadata or {}),
            name=name,
            template=spec.name,
            backend=self.backend.name,
            runtime=runtime,
            state=SandboxState.CREATING,
            kind=spec.kind,
            image_digest=image.digest,
            created_at=now,
            updated_at=now,
            expires_at=now + sandbox_timeout if spec.kind == "ephemeral" and pool is None else None,
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
            }
            | ({"pet": dict(pet)} if pet is not None else {}),
            pool=pool,
        )
        owner = self.store.tenants.find(tenant)
        quota = owner.quota if owner is not None else Quota()
        self.store.insert(
            record,  # no quota, nothing to check (and no lock to take)
            check=admission.quota_check(tenant, quota, limits) if quota != Quota() else None,
        )
        config = SandboxConfig(
            sandbox_id=sandbox_id,
            image=image.to_ref(),
            limits=limits,
            env=dict(env or {}),
            mounts=mounts,
            network=spec.network,
            labels=dict(labels or {}),
            runtime=runtime,
            ports=published,
        )
        facts: dict[str, Any] = {}
        try:
            await self.backend.create(config)
            if published:  # as bound: a host port 0 is now the one picked
                bound = await self.backend.published_ports(sandbox_id)
                facts["spec"] = dict(record.spec) | {"ports": [p.as_dict() for p in bound]}
        except BaseException:
            # Shielded: a caller cancelled mid-create (a client hung up) must still
            # get the release done, or the sandbox would outlive its record.
            await asyncio.shield(self._abandon(sandbox_id))
            raise
        return self.store.update(sandbox_id, state=SandboxState.RUNNING, owner=None, **facts)

    def _ports(self, ports: Sequence[PortMapping | str | int]) -> list[PortMapping]:
        default = self.publish_addresses[0]
        published = [
            p if isinstance(p, PortMapping)
            else port_mapping(p, host_ip=default) if isinstance(p, int)
            else parse_port(p, default_ip=default)
            for p in ports
        ]  # fmt: skip
        if published and Capability.PUBLISH_PORTS not in self.backend.capabilities:
            raise UnsupportedError(
                f"the {self.backend.name} backend cannot publish ports",
                backend=self.backend.name,
                hint="use the oci or podman backend for sandboxes with published ports",
            )
        check_addresses(published, self.publish_addresses)
        return published

    async def _abandon(self, sandbox_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.backend.destroy(sandbox_id)
        self.store.delete(sandbox_id)

    async def destroy(self, sandbox_id: str, *, tenant: str | None = None) -> None:
        """Release everything; NotFoundError when the sandbox is already gone."""
        record = self.store.mark_destroying(sandbox_id, this_process(), tenant=tenant)
        if record is None:  # a name, or an id that is not there (or cannot be destroyed)
            record = self.store.get(sandbox_id, tenant=tenant)
            if record.state != SandboxState.DESTROYING:
                check_transition(SandboxState(record.state), SandboxState.DESTROYING, record.id)
                self.store.update(record.id, state=SandboxState.DESTROYING, owner=this_process())
        await asyncio.shield(self._release(record.id))
        if record.kind == "persistent":
            self.pets.released(record)

    async def _release(self, sandbox_id: str) -> None:
        await self.backend.destroy(sandbox_id)
        self.store.delete(sandbox_id)

    # -- use ------------------------------------------------------------------

    def get(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        return self.store.get(sandbox_id, tenant=tenant)

    def list(self, **filters: Any) -> list[SandboxRecord]:
        return self.store.list(**filters)

    def set_timeout(
        self, sandbox_id: str, seconds: float, *, tenant: str | None = None
    ) -> SandboxRecord:
        """Reap the sandbox `seconds` from now (extends or shortens its life)."""
        record = self.store.get(sandbox_id, tenant=tenant)
        if record.kind != "ephemeral":
            raise InvalidStateError(
                "a persistent sandbox has no timeout",
                sandbox_id=record.id,
                hint="destroy it when it is no longer needed",
            )
        if record.state not in (SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPED):
            raise InvalidStateError(f"sandbox is {record.state}", sandbox_id=record.id)
        return self.store.update(record.id, expires_at=time.time() + seconds)

    def update(
        self,
        sandbox_id: str,
        *,
        labels: Mapping[str, str | None] | None = None,
        metadata: Mapping[str, object] | None = None,
        tenant: str | None = None,
    ) -> SandboxRecord:
        """Merge labels and metadata into the record; a None value removes that key."""
        record = self.store.get(sandbox_id, tenant=tenant)
        merged_labels = _merge(record.labels, labels or {})
        merged_meta = _merge(record.metadata, metadata or {})
        return self.store.update(record.id, labels=merged_labels, metadata=merged_meta)

    def _running(self, sandbox_id: str, tenant: str | None = None) -> SandboxRecord:
        record = self.store.get(sandbox_id, tenant=tenant)
        if record.pool is not None:
            raise InvalidStateError(
                f"sandbox idles in pool '{record.pool}'",
                sandbox_id=record.id,
                hint="claim a sandbox from the pool (`corral create --from-pool`)",
            )
        if record.state == SandboxState.FAILED and record.kind == "persistent":
            return record  # a pet failed by its crash loop: its sandbox runs, to be looked at
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
        stdin: bytes | AsyncIterable[bytes] | None = None,
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> AsyncIterator[ExecEvent]:
        record = self._running(sandbox_id, tenant)
        request = ExecRequest(
            list(argv), env=dict(env or {}), cwd=cwd, stdin=stdin, timeout=timeout
        )
        return self.backend.exec_stream(record.id, request)

    async def exec(
        self, sandbox_id: str, argv: Sequence[str], *, tenant: str | None = None, **kwargs: Any
    ) -> ExecResult:
        record = self._running(sandbox_id, tenant)
        return await self.backend.exec(record.id, ExecRequest(list(argv), **kwargs))

    async def put_file(
        self,
        sandbox_id: str,
        path: str,
        data: bytes,
        mode: int = 0o644,
        *,
        tenant: str | None = None,
    ) -> None:
        self._check_size(sandbox_id, len(data))
        record = self._running(sandbox_id, tenant)
        await self.backend.put_file(record.id, path, data, mode)

    async def get_file(self, sandbox_id: str, path: str, *, tenant: str | None = None) -> bytes:
        record = self._running(sandbox_id, tenant)
        return await self.backend.get_file(record.id, path, self.max_file_bytes)

    async def put_archive(
        self, sandbox_id: str, path: str, tar: bytes, *, tenant: str | None = None
    ) -> None:
        """Unpack a tar stream into directory `path` (made if missing), as the sandbox
        user and inside the sandbox, so entries cannot land outside what it may write."""
        self._check_size(sandbox_id, len(tar))
        record = self._running(sandbox_id, tenant)
        await transfer.unpack(self.backend, record.id, path, tar)

    async def get_archive(self, sandbox_id: str, path: str, *, tenant: str | None = None) -> bytes:
        """A tar of directory `path`'s contents; FileTooLargeError past the file limit."""
        record = self._running(sandbox_id, tenant)
        return await transfer.pack(
            self.backend, record.id, path, lambda size: self._check_size(record.id, size)
        )

    def _check_size(self, sandbox_id: str, size: int) -> None:
        if size > self.max_file_bytes:
            raise FileTooLargeError(
                f"{size} bytes is over the limit of {self.max_file_bytes} bytes",
                sandbox_id=sandbox_id,
                hint="copy less at once or raise max_file_bytes in the configuration",
            )

    async def inspect(self, sandbox_id: str, *, tenant: str | None = None) -> Inspection:
        """The record, what the backend holds now, and usage while it runs."""
        from corral.api.models import Inspection, Sandbox, Stats

        record = self.store.get(sandbox_id, tenant=tenant)
        status = await self.backend.status(record.id)
        stats = None
        if record.state == SandboxState.RUNNING and status == BackendStatus.RUNNING:
            stats = Stats.from_stats(await self.backend.stats(record.id))
        return Inspection(
            sandbox=Sandbox.from_record(record), backend_status=str(status), stats=stats
        )

    async def stats(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxStats:
        return await self.backend.stats(self._running(sandbox_id, tenant).id)

    async def pause(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        record = self._running(sandbox_id, tenant)
        await self.backend.pause(record.id)
        return self.store.update(record.id, state=SandboxState.PAUSED)

    async def resume(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        record = self.store.get(sandbox_id, tenant=tenant)
        check_transition(SandboxState(record.state), SandboxState.RUNNING, record.id)
        await self.backend.resume(record.id)
        return self.store.update(record.id, state=SandboxState.RUNNING)

    # -- housekeeping ---------------------------------------------------------

    async def reap(self, *, now: float | None = None) -> builtins.list[str]:
        """Destroy ephemeral sandboxes whose timeout has passed; their ids."""
        return await housekeeping.reap(self, now=now)

    async def reconcile(self, *, now: float | None = None) -> dict[str, builtins.list[str]]:
        """Settle the store with what the backend holds (see housekeeping.reconcile)."""
        return await housekeeping.reconcile(self, now=now)

    async def gc(self, *, now: float | None = None) -> dict[str, builtins.list[str]]:
        """Reconcile, then reap what expired (`corral gc`; the server does both itself)."""
        report = await self.reconcile(now=now)
        report["expired"] = await self.reap(now=now)
        return report

    def _choose_runtime(self, spec: Template, runtime: str | None) -> str | None:
        return admission.choose_runtime(self.backend, spec, runtime, self.default_runtime)


def _merge(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(current)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


__all__ = ["SandboxManager", "new_sandbox_id", "owner_alive", "this_process"]

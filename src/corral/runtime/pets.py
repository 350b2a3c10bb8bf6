"""Pets: persistent sandboxes with a stable name, a volume, pinned CPUs and memory
that is never overcommitted, a restart policy and kept logs; and promotion of a
running ephemeral sandbox into one. The supervisor (`runtime.supervisor`) keeps
them running.

A pet's extra facts live in its record's `spec["pet"]`:
`restart`, `backoff`, `max_backoff`, `crash_limit`, `volume` ({size, path} or
None), `service` (the template's [service], or None) and `template` (the
normalized template, so the supervisor can re-create the sandbox).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.backends.base import (
    Capability,
    PortMapping,
    SandboxConfig,
    SandboxLimits,
)
from corral.errors import (
    ConflictError,
    CorralError,
    InvalidStateError,
    NotFoundError,
    UnsupportedError,
    UserError,
)
from corral.runtime.cpus import PetCapacity, format_cpus, parse_cpus
from corral.runtime.state import SandboxState
from corral.runtime.volumes import VolumeMode, VolumeStore
from corral.spec.template import Template, Volume, load_template, parse_template
from corral.spec.units import parse_size
from corral.store import SandboxRecord

if TYPE_CHECKING:
    from corral.runtime.manager import SandboxManager

__all__ = ["RESTART_POLICIES", "PetManager"]

RESTART_POLICIES = ("always", "on-failure")
PINNED_TTL = 2.0
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
LOG_ROTATE_BYTES = 16 << 20
_HOLDING = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPED)


class PetManager:
    """Create and promote pets on one SandboxManager; `state_dir` holds volumes and logs."""

    def __init__(
        self, manager: SandboxManager, state_dir: Path, capacity: PetCapacity | None = None
    ) -> None:
        self.manager = manager
        backend = manager.backend
        mode: VolumeMode = (
            "dir"
            if backend.name == "fake"
            else "disk"
            if Capability.VOLUME_DISK in backend.capabilities
            else "mount"
        )
        self.volumes = VolumeStore(state_dir / "volumes", mode=mode)
        self.logs_dir = state_dir / "logs"
        self.capacity = capacity or PetCapacity.of_host()
        # One allocation at a time on this host: CPUs and memory are picked from the
        # live pets' records, then the new record is inserted, under this lock.
        self._allocating = asyncio.Lock()
        self._pinned: tuple[float, frozenset[int]] | None = None  # (when read, CPUs)

    # -- create / promote -----------------------------------------------------

    async def create(
        self,
        template: str | Path | Template,
        *,
        name: str | None,
        tenant: str = "local",
        volume: str | int | None = None,
        restart: str | None = None,
        memory: str | int | None = None,
        cpus: float | None = None,
        cpuset: str | None = None,
        **create: Any,
    ) -> SandboxRecord:
        """Create a pet named `name` (unique per tenant), with its volume (made, or
        found again from an earlier pet of that name) and CPUs of its own."""
        from corral.runtime.admission import limits_for

        spec = template if isinstance(template, Template) else load_template(template)
        # Every pet has a volume: its mount point is made in the pet's image.
        spec = spec.model_copy(update={"kind": "persistent", "volume": spec.volume or Volume()})
        name = _pet_name(name)
        limits = limits_for(spec, vcpus=cpus, memory=memory, cpuset=cpuset)
        volume_spec = spec.volume or Volume()
        size = _volume_size(volume) if volume is not None else volume_spec.size
        if (
            not create.get("ports")
            and spec.service is not None
            and Capability.PUBLISH_PORTS in self.manager.backend.capabilities
        ):  # the service's ports, on free host ports (its record says which)
            create["ports"] = list(spec.service.ports)
        async with self._allocating:
            self._check_name(name, tenant)
            pinned = self._allocate(limits)
            existed = self.volumes.volume(tenant, name).image.exists()
            mounted = await self.volumes.ensure(tenant, name, size)
            pet = _pet_facts(spec, restart, {"size": size, "path": volume_spec.path})
            mount = self.volumes.host_mount(mounted, volume_spec.path)
            try:
                record = await self.manager.create(
                    spec,
                    name=name,
                    tenant=tenant,
                    memory=memory,
                    cpus=cpus,
                    cpuset=pinned,
                    pet=pet,
                    extra_mounts=[mount],
                    **create,
                )
            except BaseException:
                self.volumes.unmount(mounted)
                if not existed:  # a failed create leaves no new volume behind
                    self.volumes.remove(tenant, name)
                raise
            finally:
                self._pinned = None
        self.log(record, f"created (CPUs {pinned}, volume {size >> 20} MiB at {mount.target})")
        return record

    async def promote(
        self,
        sandbox_id: str,
        *,
        name: str,
        tenant: str | None = None,
        volume: str | int | None = None,
        restart: str | None = None,
    ) -> SandboxRecord:
        """Make a running ephemeral sandbox a pet. It keeps running as it is
        (processes and files), re-pinned to CPUs of its own and out of the reaper's
        reach; with `volume`, the volume is given to it in place where the backend
        can (microVMs: snapshot and restore with the volume's disk). Where the
        backend cannot re-pin or add the volume to a running sandbox (containers:
        no new mounts) it is re-created: its workdir and home are carried over,
        its processes restart."""
        record = self.manager.store.get(sandbox_id, tenant=tenant)
        if record.kind == "persistent":
            raise InvalidStateError(
                "the sandbox is already persistent", sandbox_id=record.id, hint="nothing to do"
            )
        if record.state != SandboxState.RUNNING or record.pool is not None:
            raise InvalidStateError(
                f"only a running sandbox can be promoted (this one is {record.state})",
                sandbox_id=record.id,
                hint="create a pet instead: `corral create --kind persistent --name N`",
            )
        name = _pet_name(name)
        try:
            spec: Template | None = load_template(record.template)
        except CorralError:
            spec = None  # a template sent with the request: the pet cannot be re-created
        limits = SandboxLimits(**record.limits)
        async with self._allocating:
            self._check_name(name, record.tenant)
            pinned = self._allocate(limits)
            size = None if volume is None else _volume_size(volume)
            in_place = True
            try:
                await self.manager.backend.set_cpuset(record.id, pinned)
            except UnsupportedError:
                in_place = False  # cannot re-pin in place: re-create it pinned
                size = size or Volume().size
            volume_facts = None
            if size is not None:
                # A re-created sandbox's image has the volume's mount point.
                path = ((spec.volume if spec is not None else None) or Volume()).path
                volume_spec = Volume(size=size, path=path)
                if spec is not None:
                    spec = spec.model_copy(update={"volume": volume_spec})
                volume_facts = volume_spec.model_dump()
            pet = _pet_facts(spec, restart, volume_facts)
            new_spec = dict(record.spec) | {
                "limits": dict(record.limits) | {"cpuset": pinned},
                "pet": pet,
            }
            how = "in place"
            if size is not None and in_place:
                in_place = await self._attach_volume(record, name, size, volume_spec.path)
            if not in_place:
                how = "re-created, " + await self._recreate_with_files(record, name, pet, pinned)
            promoted = self.manager.store.update(
                record.id,
                kind="persistent",
                name=name,
                expires_at=None,
                spec=new_spec | {"pet": pet},
            )
            self._pinned = None
        self.log(promoted, f"promoted from {record.id} ({how}; CPUs {pinned})")
        return promoted

    def restart(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        """Supervise a failed pet again (after its crash loop was looked into and
        fixed): it is running again and the supervisor starts its service, with
        the count of failures in a row starting over."""
        record = self.manager.store.get(sandbox_id, tenant=tenant)
        if record.kind != "persistent" or record.state != SandboxState.FAILED:
            raise InvalidStateError(
                f"only a failed pet is restarted (this one is a {record.kind} sandbox,"
                f" {record.state})",
                sandbox_id=record.id,
                hint="a running pet's service restarts by itself when it exits",
            )
        self.log(record, "restarted by request: supervised again")
        return self.manager.store.update(record.id, state=SandboxState.STOPPED, error=None)

    async def _attach_volume(self, record: SandboxRecord, name: str, size: int, path: str) -> bool:
        """Give running `record` the volume `name` at `path` in place; False when the
        backend cannot (the caller re-creates it). A volume made for a failed
        attach is removed again."""
        existed = self.volumes.volume(record.tenant, name).image.exists()
        mounted = await self.volumes.ensure(record.tenant, name, size)
        try:
            await self.manager.backend.attach_volume(
                record.id, self.volumes.host_mount(mounted, path)
            )
        except UnsupportedError:
            return False
        except BaseException:
            if not existed:
                self.volumes.remove(record.tenant, name)
            raise
        return True

    async def _recreate_with_files(
        self, record: SandboxRecord, name: str, pet: dict[str, Any], pinned: str
    ) -> str:
        """Re-create `record` as pet `pet` (pinned, with its volume), with its disk
        kept where the backend can (`Backend.recreate`), else carrying its workdir
        and home over as tar streams; what was kept, for the log."""
        staged = dataclasses.replace(record, spec=dict(record.spec) | {"pet": pet}, name=name)
        config = await self.sandbox_config(staged, cpuset=pinned)
        try:
            await self.manager.backend.recreate(config)
            return "its disk kept"
        except UnsupportedError:
            pass
        saved: builtins.list[tuple[str, bytes]] = []
        for directory in await self._writable_dirs(record):
            with contextlib.suppress(CorralError):
                saved.append((directory, await self.manager.get_archive(record.id, directory)))
        await self.manager.backend.destroy(record.id)
        await self.manager.backend.create(config)
        for directory, tar in saved:
            await self.manager.put_archive(record.id, directory, tar)
        return "its workdir and home carried over"

    async def _writable_dirs(self, record: SandboxRecord) -> builtins.list[str]:
        result = await self.manager.exec(
            record.id, ["/bin/sh", "-c", 'pwd; printf "%s\\n" "$HOME"'], timeout=10
        )
        dirs = [line for line in result.stdout.decode().splitlines() if line.startswith("/")]
        return list(dict.fromkeys(dirs))

    def _check_name(self, name: str, tenant: str) -> None:
        with contextlib.suppress(NotFoundError):
            other = self.manager.store.get(name, tenant=tenant)
            raise ConflictError(
                f"a sandbox named '{name}' already exists ({other.id}, {other.state})",
                sandbox_id=other.id,
                hint="choose another name, or destroy the other sandbox first",
            )

    def _allocate(self, limits: SandboxLimits) -> str:
        """Pinned CPUs for a new pet, after checking its memory fits (lock held)."""
        self._pinned = None  # a pet is coming: cattle move off its CPUs from now on
        pets = self.live_pets()
        taken = set().union(*(parse_cpus(p.limits.get("cpuset")) for p in pets))
        self.capacity.check_memory(limits.memory, [int(p.limits["memory"]) for p in pets])
        return self.capacity.pick_cpus(limits.vcpus, taken, limits.cpuset)

    def cattle_cpus(self) -> str | None:
        """The CPUs a new ephemeral sandbox runs on: those no pet is pinned to (None
        while no pet is pinned, or when pets hold them all). Read from the store at
        most every PINNED_TTL seconds; this process's own pet changes reset it."""
        now = time.monotonic()
        if self._pinned is None or now - self._pinned[0] > PINNED_TTL:
            pinned = frozenset().union(
                *(parse_cpus(p.limits.get("cpuset")) for p in self.live_pets())
            )
            self._pinned = (now, pinned)
        free = self.capacity.cpus - self._pinned[1]
        return format_cpus(free) if self._pinned[1] and free else None

    def live_pets(self) -> builtins.list[SandboxRecord]:
        """Pets that hold CPUs and memory on this backend (a failed pet too, until
        destroyed: it may be looked at, and re-created under its name)."""
        # Filtered by the database: the supervisor asks twice a second, and a busy
        # server holds many more cattle than pets.
        return [
            r
            for r in self.manager.store.list(backend=self.manager.backend.name, kind="persistent")
            if r.state != SandboxState.DESTROYING
        ]

    def released(self, record: SandboxRecord) -> None:
        """After a pet's sandbox is destroyed: unmount its volume (the data stays)."""
        self._pinned = None
        if record.name:
            self.volumes.unmount(self.volumes.volume(record.tenant, record.name))
        self.log(record, "destroyed (volume kept)")

    def unmount_orphans(self) -> builtins.list[str]:
        """Unmount volumes no live pet uses (a destroy a crash cut short); their names."""
        used = {(p.tenant, p.name) for p in self.live_pets()}
        orphans = []
        for volume in self.volumes.list():
            if (volume.tenant, volume.name) not in used and self.volumes.is_mounted(volume):
                self.volumes.unmount(volume)
                orphans.append(f"{volume.tenant}/{volume.name}")
        return orphans

    def remove_volume(self, name: str, *, tenant: str) -> None:
        """Delete a volume and its data; refused while a pet of that name exists."""
        self._check_name(name, tenant)
        volume = self.volumes.volume(tenant, name)
        if not volume.image.exists():
            raise NotFoundError(f"no volume '{name}'", hint="list pets with `corral ls`")
        self.volumes.remove(tenant, name)

    # -- re-creation ------------------------------------------------------------

    async def sandbox_config(
        self, record: SandboxRecord, *, cpuset: str | None = None
    ) -> SandboxConfig:
        """The backend config that re-creates pet `record` as it was created."""
        from corral.runtime.admission import template_mounts

        pet: Mapping[str, Any] = record.spec["pet"]
        if pet.get("template") is None:
            raise UnsupportedError(
                f"pet '{record.name}' came from a template sent with its request and"
                " cannot be re-created on this host",
                sandbox_id=record.id,
                hint="deploy it again from its template file",
            )
        spec = parse_template(dict(pet["template"]), source=f"<pet {record.name}>")
        image = await asyncio.to_thread(self.manager.images.build, spec)
        limits = dict(record.limits)
        if cpuset is not None:
            limits["cpuset"] = cpuset
        mounts = template_mounts(spec, image.host_mounts)
        volume = pet.get("volume")
        if volume is not None:
            mounted = await self.volumes.ensure(
                record.tenant, record.name or record.id, int(volume["size"])
            )
            mounts.append(self.volumes.host_mount(mounted, str(volume["path"])))
        return SandboxConfig(
            sandbox_id=record.id,
            image=image.to_ref(),
            limits=SandboxLimits(**limits),
            env=dict(record.spec.get("env", {})),
            mounts=mounts,
            network=spec.network,
            labels=dict(record.labels),
            runtime=record.runtime,
            # The same host ports as before: a pet's address outlives its sandbox.
            ports=[PortMapping(**p) for p in record.spec.get("ports", [])],
        )

    async def recreate(self, record: SandboxRecord) -> None:
        """Destroy what the backend still holds of the pet and create it again."""
        config = await self.sandbox_config(record)
        await self.manager.backend.destroy(record.id)
        await self.manager.backend.create(config)

    # -- logs ---------------------------------------------------------------------

    def log_path(self, record: SandboxRecord) -> Path:
        return self.logs_dir / record.tenant / f"{record.name or record.id}.log"

    def log(self, record: SandboxRecord, message: str) -> None:
        """Append one of Corral's own lines to the pet's log."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.append_log(record, f"--- corral {stamp}: {message}\n".encode())

    def append_log(self, record: SandboxRecord, data: bytes) -> None:
        path = self.log_path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > LOG_ROTATE_BYTES:
                path.replace(path.with_suffix(".log.1"))
        with open(path, "ab") as log:
            log.write(data)

    def logs_of(self, sandbox_id: str, *, tenant: str | None = None) -> SandboxRecord:
        """The pet whose log `read_logs` reads; UserError for a sandbox that is no pet."""
        record = self.manager.store.get(sandbox_id, tenant=tenant)
        if record.kind != "persistent":
            raise UserError(
                "only pets keep logs",
                sandbox_id=record.id,
                hint="promote it (`corral promote`) or run commands with `corral exec`",
            )
        return record

    async def read_logs(
        self,
        record: SandboxRecord,
        *,
        follow: bool = False,
        tail: int | None = None,
        poll: float = 0.2,
    ) -> AsyncIterator[bytes]:
        """The pet's log (the last `tail` bytes, or all of it), then with `follow`
        what is appended, until the pet is destroyed."""
        path = self.log_path(record)
        offset = 0
        if tail is not None and path.exists():
            offset = max(0, path.stat().st_size - tail)
        while True:
            if path.exists():
                if path.stat().st_size < offset:
                    offset = 0  # rotated
                with open(path, "rb") as log:
                    log.seek(offset)
                    while chunk := log.read(65536):
                        offset += len(chunk)
                        yield chunk
            if not follow:
                return
            try:
                current = self.manager.store.get(record.id)
            except NotFoundError:
                return
            if current.state in (SandboxState.DESTROYING, SandboxState.DESTROYED):
                return
            await asyncio.sleep(poll)


def _volume_size(value: str | int) -> int:
    """A volume size in bytes, by the rules of a template's [volume] size."""
    try:
        size = parse_size(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"volume: {exc}", hint="e.g. --volume 256M") from None
    if size < 1 << 20:
        raise UserError(f"a volume of {size} bytes is too small", hint="give 1M or more")
    return size


def _pet_name(name: str | None) -> str:
    if not name:
        raise UserError(
            "a persistent sandbox needs a name",
            hint="give it one with --name NAME (unique among your sandboxes)",
        )
    if not _NAME.fullmatch(name):  # it names the volume's directory and the log file
        raise UserError(f"'{name}' is not a pet name", hint="use a-z, 0-9, '.', '_', '-' (max 63)")
    return name


def _pet_facts(
    spec: Template | None, restart: str | None, volume: Mapping[str, Any] | None
) -> dict[str, Any]:
    service = spec.service if spec is not None else None
    policy = restart or (service.restart if service else "always")
    if policy not in RESTART_POLICIES:
        raise UserError(
            f"unknown restart policy '{policy}'", hint="use one of: " + ", ".join(RESTART_POLICIES)
        )
    return {
        "restart": policy,
        "backoff": service.backoff if service else 1.0,
        "max_backoff": service.max_backoff if service else 60.0,
        "crash_limit": service.crash_limit if service else 5,
        "volume": None if volume is None else dict(volume),
        "service": service.model_dump(mode="json") if service else None,
        "template": spec.normalized() if spec is not None else None,
    }

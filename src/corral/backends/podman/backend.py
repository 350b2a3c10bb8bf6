"""The `podman` backend: sandboxes as Podman containers (crun, runc or runsc).

Podman owns the container (`podman ps` shows it, labelled with the sandbox id
and tenant), created, started, inspected and removed through Podman's REST API
(service.py); Corral keeps `<state>/sandboxes/<id>` for what Podman does not
manage: the size-limited tmpfs scratch (/tmp, $HOME, workdir) and `podman.json`.
The idle main process is catatonit, bound read-only at /.corral like the oci
backend's; commands run through `<runtime> exec` on the container Podman
started. On crun and runc the container's ids 0-65535 are host UID_BASE+, as
on the oci backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx

from corral._sys import cgroups, mounts, procs
from corral.backends import ports
from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecEvent,
    ExecRequest,
    PortMapping,
    SandboxConfig,
    SandboxStats,
)
from corral.backends.oci.backend import CONTAINER_PREFIX, OciBackend, release_cgroup
from corral.backends.oci.bundle import UID_BASE, process_spec
from corral.backends.oci.execution import (
    EXEC_TOKEN_VAR,
    ExecTarget,
    Finished,
    exit_status,
)
from corral.backends.oci.execution import runtime_exec as _runtime_exec
from corral.backends.oci.runtimes import get_runtime
from corral.backends.podman import gvisor
from corral.backends.podman.engine import RUNSC_EGRESS, RUNTIME_ROOTS, Podman
from corral.backends.podman.images import ImageLoader
from corral.backends.podman.service import DEFAULT_IDLE_TIMEOUT, PodmanService, api_message
from corral.backends.podman.spec import (
    SANDBOX_LABEL,
    container_spec,
    pids_overhead,
    sandbox_env,
)
from corral.backends.sandbox_dir import (
    claim_dir,
    make_scratch,
    read_meta,
    released_on_failure,
    sandbox_path,
)
from corral.errors import (
    BackendUnavailableError,
    ExecError,
    NotFoundError,
    SandboxStartError,
    UnsupportedError,
)

_STATES = {
    "created": BackendStatus.CREATED,
    "configured": BackendStatus.CREATED,
    "initialized": BackendStatus.CREATED,
    "running": BackendStatus.RUNNING,
    "paused": BackendStatus.PAUSED,
}


@dataclass(frozen=True, slots=True)
class _Meta:
    runtime: str  # crun, runc or runsc: the runtime's quirks
    podman_runtime: str  # Podman's name for it (runsc-egress for a runsc egress sandbox)
    container: str
    container_id: str
    cgroup: str  # the container's own cgroup (limits, usage)
    cgroup_parent: str  # the sandbox's cgroup: the container and its conmon
    uid: int
    gid: int
    workdir: str
    env: dict[str, str]
    pids_overhead: int = 0  # host tasks allowed on top of limits.pids (gVisor's own)


class PodmanBackend(Backend):
    """Sandboxes as Podman containers; see the module docstring."""

    name: ClassVar[str] = "podman"
    runtimes: ClassVar[tuple[str, ...]] = ("crun", "runc", "runsc")

    def __init__(
        self,
        state_dir: Path,
        *,
        runtime: str = "crun",
        egress_host_loopback: bool = False,
        service_idle_timeout: int = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        # The same error as the oci backend's for an unknown name.
        quirks = get_runtime(runtime)
        capabilities = {Capability.PAUSE, Capability.CPUSET, Capability.PUBLISH_PORTS}
        if quirks.user_namespace:
            capabilities.add(Capability.USER_NAMESPACE)
        if shutil.which("slirp4netns"):
            capabilities.add(Capability.NETWORK_EGRESS)
        if not quirks.in_kernel:
            # gVisor checkpoints itself; CRIU (crun/runc) fails on this kernel.
            capabilities.add(Capability.SNAPSHOT)
        self.capabilities = frozenset(capabilities)
        self.state_dir = Path(state_dir)
        self.default_runtime = runtime
        # An egress sandbox may reach the host's loopback at 10.0.2.2 (off: it would
        # expose every service the host keeps on 127.0.0.1, Corral's own included).
        self.egress_host_loopback = egress_host_loopback
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.podman = Podman(self.state_dir)
        self.images = ImageLoader(self.podman)
        self._idle_timeout = service_idle_timeout
        self._services: dict[str, PodmanService] = {}
        # The same support dir (catatonit) and cgroup parent as the oci backend's,
        # so host tooling and leak checks see one layout per state dir.
        self._oci = OciBackend(self.state_dir)
        self.cgroup_parent = self._oci.cgroup_parent

    def service(self, podman_runtime: str) -> PodmanService:
        """The API service that creates containers on `podman_runtime`."""
        if podman_runtime not in self._services:
            self._services[podman_runtime] = PodmanService(
                self.podman, podman_runtime, idle_timeout=self._idle_timeout
            )
        return self._services[podman_runtime]

    async def aclose(self) -> None:
        """Stop the API services this process started (sandboxes keep running)."""
        for service in self._services.values():
            await service.aclose()

    # -- paths and records -------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return sandbox_path(self.sandboxes_dir, sandbox_id, self.name)

    def _meta(self, sandbox_id: str) -> _Meta:
        data = read_meta(self._dir(sandbox_id), "podman.json", sandbox_id, self.name)
        try:
            return _Meta(**data)
        except TypeError:  # a record from another version: nothing this backend can drive
            raise NotFoundError(
                f"no sandbox '{sandbox_id}'", sandbox_id=sandbox_id, backend=self.name
            ) from None

    def _any_service(self, sandbox_id: str) -> PodmanService:
        try:
            return self.service(self._meta(sandbox_id).podman_runtime)
        except NotFoundError:
            return self.service(self.default_runtime)

    # -- lifecycle -----------------------------------------------------------

    async def create(self, config: SandboxConfig) -> None:
        runtime = config.runtime or self.default_runtime
        get_runtime(runtime).binary()
        self.podman.binary()
        if config.network == "egress" and Capability.NETWORK_EGRESS not in self.capabilities:
            raise UnsupportedError(
                "network 'egress' needs slirp4netns, which is not installed",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                hint="apt-get install slirp4netns, or use network='none'",
            )
        if config.ports and runtime == "runsc" and config.network == "none":
            raise UnsupportedError(
                "runsc cannot publish ports of a sandbox with network 'none' here:"
                " gVisor's network stack is its own",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                hint="use network 'egress' (Podman publishes the ports), or runtime crun/runc",
            )
        sandbox_dir = claim_dir(self.sandboxes_dir, config.sandbox_id, self.name)
        await released_on_failure(
            self._create(config, runtime, sandbox_dir), self.destroy, config.sandbox_id
        )

    async def _create(self, config: SandboxConfig, runtime: str, sandbox_dir: Path) -> None:
        image = config.image
        if not image.rootfs.is_dir():
            # The store treats an image without its rootfs as damaged: so do we,
            # rather than start from a stale copy in Podman's storage.
            raise SandboxStartError(
                f"image {image.digest[:19]} is damaged (no rootfs at {image.rootfs})",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                hint="rebuild the image (`corral images build --force`)",
            )
        podman_runtime = runtime
        if runtime == "runsc" and config.network == "egress":
            podman_runtime = RUNSC_EGRESS
        service = self.service(podman_runtime)
        image_name = await self.images.ensure(image, config.sandbox_id, service)
        # The sandbox's ids as the host sees them: shifted by UID_BASE in a user namespace.
        shift = UID_BASE if get_runtime(runtime).user_namespace else 0
        scratch = make_scratch(
            sandbox_dir, size=config.limits.disk, uid=image.uid + shift, gid=image.gid + shift
        )
        for mount in config.mounts:
            if mount.writable:  # a pet's volume: the sandbox user's, as the host sees it
                os.chown(mount.source, image.uid + shift, image.gid + shift)
        container = CONTAINER_PREFIX + config.sandbox_id
        cgroup_parent = f"{self.cgroup_parent}/{config.sandbox_id}"
        spec = container_spec(
            config,
            runtime=runtime,
            container=container,
            image_name=image_name,
            scratch=scratch,
            support_dir=Path(self._oci.ensure_support()),
            cgroup_parent=cgroup_parent,
            seccomp_profile=self.podman.seccomp_profile,
            host_loopback=self.egress_host_loopback,
        )
        created = await service.request("POST", "/containers/create", json=spec)
        if created.status_code != 201:
            raise self._start_error(config.sandbox_id, runtime, "create", created)
        container_id = str(created.json()["Id"])
        meta = _Meta(
            runtime=runtime,
            podman_runtime=podman_runtime,
            container=container,
            container_id=container_id,
            cgroup=f"{cgroup_parent}/libpod-{container_id}",
            cgroup_parent=cgroup_parent,
            uid=image.uid,
            gid=image.gid,
            workdir=image.workdir,
            env=sandbox_env(config),
            pids_overhead=pids_overhead(runtime),
        )
        (sandbox_dir / "podman.json").write_text(json.dumps(dataclasses.asdict(meta)))
        started = await service.request("POST", f"/containers/{container_id}/start")
        if started.status_code not in (204, 304):
            raise self._start_error(config.sandbox_id, runtime, "start", started)
        if config.ports:
            await self._publish(config, service, container_id, sandbox_dir)

    async def _publish(
        self, config: SandboxConfig, service: PodmanService, container_id: str, sandbox_dir: Path
    ) -> None:
        inspected = await service.request("GET", f"/containers/{container_id}/json")
        if inspected.status_code != 200:
            raise self._start_error(config.sandbox_id, config.runtime or "", "inspect", inspected)
        # Corral's forwarder on either network (not Podman's port mappings): it
        # reaches a service listening on the sandbox's loopback too, and under
        # runsc-egress gVisor uses the namespace's own stack, so it works there.
        pid = int(inspected.json()["State"]["Pid"])
        await ports.start_forwarder(sandbox_dir, config.sandbox_id, pid, config.ports, self.name)

    async def published_ports(self, sandbox_id: str) -> list[PortMapping]:
        return ports.read_ports(self._dir(sandbox_id))

    def _start_error(
        self, sandbox_id: str, runtime: str, step: str, response: httpx.Response
    ) -> SandboxStartError:
        return SandboxStartError(
            f"podman could not {step} the sandbox on {runtime} (HTTP {response.status_code})",
            sandbox_id=sandbox_id,
            backend=self.name,
            stderr_tail=api_message(response),
            hint="run `corral doctor` to check the host",
        )

    async def destroy(self, sandbox_id: str) -> None:
        sandbox_dir = self._dir(sandbox_id)
        await ports.stop_forwarder(sandbox_dir, sandbox_id)
        container = CONTAINER_PREFIX + sandbox_id
        if self.podman.storage_conf.exists():
            # Killed first: podman's own stop polls for the exit (~100 ms more).
            _kill_cgroup_tasks(f"{self.cgroup_parent}/{sandbox_id}", keep="conmon")
            await self._remove_container(sandbox_id, container)
        await release_cgroup(f"{self.cgroup_parent}/{sandbox_id}")
        for point in mounts.mounts_under(sandbox_dir):
            mounts.unmount(point)
        shutil.rmtree(sandbox_dir, ignore_errors=True)

    async def _remove_container(self, sandbox_id: str, container: str) -> None:
        params = {"force": "true", "timeout": "0", "v": "true"}
        try:
            service = self._any_service(sandbox_id)
            for _attempt in range(20):
                removed = await service.request("DELETE", f"/containers/{container}", params=params)
                # 500 while podman's own exit cleanup holds the container: try again.
                if removed.status_code != 500:
                    return
                await asyncio.sleep(0.05)
        except BackendUnavailableError:
            pass
        # The API is unusable: the CLI still removes it (also a Created one a failed
        # start left, holding its name). No podman at all: the rest is released anyway.
        with contextlib.suppress(BackendUnavailableError, OSError):
            await self.podman.run("rm", "--force", "--time", "0", "--volumes", container)

    async def status(self, sandbox_id: str) -> BackendStatus:
        sandbox_dir = self._dir(sandbox_id)
        state = await self._podman_state(sandbox_id)
        if state is None:
            return BackendStatus.STOPPED if sandbox_dir.exists() else BackendStatus.MISSING
        return _STATES.get(state, BackendStatus.STOPPED)

    async def _podman_state(self, sandbox_id: str) -> str | None:
        if not self.podman.storage_conf.exists():
            return None
        container = CONTAINER_PREFIX + sandbox_id
        response = await self._any_service(sandbox_id).request(
            "GET", f"/containers/{container}/json"
        )
        if response.status_code != 200:
            return None
        return str(response.json()["State"]["Status"])

    async def list_sandboxes(self) -> list[str]:
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found.update(p.name for p in self.sandboxes_dir.iterdir() if p.is_dir())
        if self.podman.storage_conf.exists():
            filters = json.dumps({"label": [SANDBOX_LABEL]})
            listed = await self.service(self.default_runtime).request(
                "GET", "/containers/json", params={"all": "true", "filters": filters}
            )
            if listed.status_code == 200:
                for entry in listed.json() or []:
                    sandbox_id = (entry.get("Labels") or {}).get(SANDBOX_LABEL)
                    if sandbox_id:
                        found.add(sandbox_id)
        found.update(cgroups.children(self.cgroup_parent))
        return sorted(found)

    def cgroup(self, sandbox_id: str) -> str:
        """The container's own cgroup (its limits and usage; conmon sits outside it)."""
        return self._meta(sandbox_id).cgroup

    async def stats(self, sandbox_id: str) -> SandboxStats:
        meta = self._meta(sandbox_id)
        reading = cgroups.read(meta.cgroup)
        if reading.memory_limit == 0:  # no memory cgroup: stopped, podman removed it
            oom = gvisor.kernel_reported_oom(meta.cgroup)
            reading = dataclasses.replace(reading, oom_kills=int(oom))
        return SandboxStats(
            memory_bytes=reading.memory_bytes,
            memory_limit=reading.memory_limit,
            cpu_seconds=reading.cpu_seconds,
            pids=reading.pids,
            pids_limit=reading.pids_limit - meta.pids_overhead
            if reading.pids_limit > 0
            else reading.pids_limit,
            oom_kills=reading.oom_kills,
        )

    async def pause(self, sandbox_id: str) -> None:
        await self._simple(sandbox_id, "pause")

    async def resume(self, sandbox_id: str) -> None:
        await self._simple(sandbox_id, "unpause")

    async def set_cpuset(self, sandbox_id: str, cpuset: str) -> None:
        meta = self._meta(sandbox_id)
        if not get_runtime(meta.runtime).in_kernel:
            raise UnsupportedError(
                f"{meta.runtime} cannot re-pin a running sandbox",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="pin it when creating it (limits.cpuset)",
            )
        done = await self.service(meta.podman_runtime).request(
            "POST", f"/containers/{meta.container_id}/update", json={"cpu": {"cpus": cpuset}}
        )
        if done.status_code not in (200, 201, 204):
            raise ExecError(
                f"podman could not re-pin the sandbox to CPUs {cpuset} (HTTP {done.status_code})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=api_message(done),
            )

    async def _simple(self, sandbox_id: str, verb: str) -> None:
        meta = self._meta(sandbox_id)
        service = self.service(meta.podman_runtime)
        done = await service.request("POST", f"/containers/{meta.container_id}/{verb}")
        if done.status_code not in (204, 304):
            raise ExecError(
                f"podman {verb} failed (HTTP {done.status_code})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=api_message(done),
            )

    # -- exec ----------------------------------------------------------------

    async def exec_stream(self, sandbox_id: str, request: ExecRequest) -> AsyncIterator[ExecEvent]:
        """`<runtime> exec` on the container Podman started (as `podman exec` does
        through conmon, minus ~100 ms of conmon and API round trips per command)."""
        meta = self._meta(sandbox_id)
        if not request.argv:
            raise ExecError(
                "no command given",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="pass the command to run, e.g. ['/bin/true']",
            )
        runtime = get_runtime(meta.runtime)
        target = ExecTarget(
            runtime,
            RUNTIME_ROOTS[runtime.name],
            meta.container_id,
            meta.cgroup,
            self._dir(sandbox_id),
        )
        token = uuid.uuid4().hex[:12]
        process = process_spec(
            uid=meta.uid,
            gid=meta.gid,
            args=list(request.argv),
            env={**meta.env, **request.env, EXEC_TOKEN_VAR: token},
            cwd=request.cwd or meta.workdir,
        )
        oom_before = cgroups.oom_kills(meta.cgroup)
        end: Finished | None = None
        async with contextlib.aclosing(_runtime_exec(target, process, request, token)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    end = event
                else:
                    yield event
        assert end is not None
        oom = cgroups.oom_kills(meta.cgroup) > oom_before
        # A dying gVisor sentry can make `runsc exec` report any code, even 0: is the
        # sandbox process still there? (The host's view: ~1 ms, where asking Podman
        # costs a `runsc state`.)
        gone = not runtime.in_kernel and not gvisor.sandbox_alive(meta.cgroup)
        if gone and not oom:
            oom = gvisor.kernel_reported_oom(meta.cgroup)
        yield exit_status(
            end.returncode, runtime, request, end.stderr_tail, end.timed_out, oom, end.started, gone
        )

    # -- snapshots (gVisor only) -----------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path) -> None:
        """Checkpoint a runsc sandbox into the directory `dest`; it is STOPPED after.

        Memory, processes and open files are saved by gVisor (`runsc checkpoint`);
        the scratch (/tmp, $HOME, workdir) stays in the sandbox's directory, so
        `restore()` brings the same sandbox back on this host.
        """
        meta = self._meta(sandbox_id)
        runtime = gvisor.snapshot_runtime(meta.runtime, meta.podman_runtime, sandbox_id)
        error = await gvisor.checkpoint(runtime, meta.container_id, Path(dest))
        if error is not None:
            raise ExecError(
                "runsc checkpoint failed",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=error,
            )
        # Podman notices the exit and unmounts the rootfs; wait for it to say so.
        await self.service(meta.podman_runtime).request(
            "POST", f"/containers/{meta.container_id}/wait", params={"condition": "exited"}
        )

    async def restore(self, sandbox_id: str, source: Path) -> None:
        """Start a snapshotted sandbox again from `source` (see `snapshot`).

        Podman starts the container as usual; Corral's runsc wrapper turns that
        start into `runsc restore` of the staged checkpoint.
        """
        meta = self._meta(sandbox_id)
        gvisor.snapshot_runtime(meta.runtime, meta.podman_runtime, sandbox_id)
        if not (Path(source) / gvisor.CHECKPOINT_FILE).is_file():
            raise NotFoundError(
                f"no gVisor checkpoint at {source}",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="pass the directory snapshot() wrote",
            )
        with gvisor.staged_restore(self.podman.restore_dir, meta.container_id, Path(source)):
            started = await self.service(meta.podman_runtime).request(
                "POST", f"/containers/{meta.container_id}/start"
            )
        if started.status_code not in (204, 304):
            raise ExecError(
                f"podman could not restore the sandbox (HTTP {started.status_code})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=api_message(started),
            )


def _kill_cgroup_tasks(cgroup: str, *, keep: str) -> None:
    """SIGKILL every process under `cgroup` except in its child cgroup `keep`."""
    spared = set(cgroups.pids(f"{cgroup}/{keep}"))
    for _pass in range(3):
        left = [pid for pid in cgroups.pids(cgroup) if pid not in spared]
        if not left:
            return
        for pid in left:
            procs.kill(pid)

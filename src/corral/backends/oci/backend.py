"""The `oci` backend: sandboxes run by an OCI runtime CLI (crun, runc, runsc) directly.

Each sandbox is a directory under `<state>/sandboxes/<id>` holding its bundle,
a size-limited tmpfs scratch (its /tmp, $HOME and workdir) and `meta.json`;
its idle main process is catatonit, and commands run through `<runtime> exec`.
Nothing lives in this Python process, so any process can drive a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from corral._sys import cgroups, mounts
from corral.backends import ports
from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecEvent,
    ExecRequest,
    Output,
    PortMapping,
    SandboxConfig,
    SandboxStats,
)
from corral.backends.oci.bundle import UID_BASE, make_config, process_spec
from corral.backends.oci.execution import (
    EXEC_TOKEN_VAR,
    ExecTarget,
    Finished,
    exit_status,
    runtime_exec,
)
from corral.backends.oci.runtimes import RUNTIMES, OciRuntime, get_runtime
from corral.backends.oci.standby import Standby, command_line, start_standby
from corral.backends.sandbox_dir import (
    claim_dir,
    make_scratch,
    read_meta,
    refuse_network,
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

CONTAINER_PREFIX = "corral-"
CGROUP_PARENT = "/corral"


@dataclass(frozen=True, slots=True)
class _Meta:
    runtime: str
    cgroup: str
    container: str
    user_namespace: bool
    uid: int
    gid: int
    workdir: str
    env: dict[str, str]


class OciBackend(Backend):
    """Drive crun (default), runc or runsc (gVisor) directly; see the module docstring."""

    name: ClassVar[str] = "oci"
    capabilities = frozenset(
        {Capability.PAUSE, Capability.CPUSET, Capability.USER_NAMESPACE, Capability.PUBLISH_PORTS}
    )
    runtimes: ClassVar[tuple[str, ...]] = ("crun", "runc", "runsc")

    def __init__(self, state_dir: Path, *, runtime: str = "crun") -> None:
        self.state_dir = Path(state_dir)
        self.default_runtime = get_runtime(runtime).name
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.run_dir = self.state_dir / "run"
        self.support_dir = self.state_dir / "support"
        # One cgroup parent per state dir: gc of one Corral install (or a test run)
        # never touches another's sandboxes on the same host.
        instance = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        self.cgroup_parent = f"{CGROUP_PARENT}/{instance}"
        # Primed warm-pool members: a standby shell each, for a fast first command.
        self._standbys: dict[str, Standby] = {}

    # -- paths and records -------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return sandbox_path(self.sandboxes_dir, sandbox_id, self.name)

    def _root(self, runtime: OciRuntime) -> Path:
        return self.run_dir / runtime.name

    def _meta(self, sandbox_id: str) -> _Meta:
        return _Meta(**read_meta(self._dir(sandbox_id), "meta.json", sandbox_id, self.name))

    def ensure_support(self) -> str:
        """The read-only dir bound at /.corral: the idle init (catatonit)."""
        init = self.support_dir / "init"
        if not init.exists():
            source = shutil.which("catatonit") or "/usr/libexec/podman/catatonit"
            if not os.path.exists(source):
                raise BackendUnavailableError(
                    "catatonit (the sandbox init) is not installed",
                    backend=self.name,
                    hint="apt-get install catatonit (or run `corral host prepare`)",
                )
            self.support_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.support_dir / f".init-{uuid.uuid4().hex}"
            shutil.copy2(source, tmp)
            tmp.chmod(0o755)
            tmp.rename(init)
        return str(self.support_dir)

    # -- lifecycle -----------------------------------------------------------

    async def create(self, config: SandboxConfig) -> None:
        runtime = get_runtime(config.runtime or self.default_runtime)
        runtime.binary()
        refuse_network(config, self.name, "use network='none', or the podman backend for egress")
        if config.ports and not runtime.in_kernel:
            raise UnsupportedError(
                f"{runtime.name} cannot publish ports here: gVisor's network stack is its own",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                hint="use runtime crun or runc, or the podman backend with network 'egress'",
            )
        sandbox_dir = claim_dir(self.sandboxes_dir, config.sandbox_id, self.name)
        await released_on_failure(
            self._create(config, runtime, sandbox_dir), self.destroy, config.sandbox_id
        )

    async def _create(self, config: SandboxConfig, runtime: OciRuntime, sandbox_dir: Path) -> None:
        image = config.image
        userns = runtime.user_namespace
        shift = UID_BASE if userns else 0
        scratch = make_scratch(
            sandbox_dir, size=config.limits.disk, uid=image.uid + shift, gid=image.gid + shift
        )
        for mount in config.mounts:
            if mount.writable:
                os.chown(mount.source, image.uid + shift, image.gid + shift)
        container = CONTAINER_PREFIX + config.sandbox_id
        cgroup = f"{self.cgroup_parent}/{config.sandbox_id}"
        spec = make_config(
            config,
            scratch=str(scratch),
            support_dir=self.ensure_support(),
            cgroup_path=cgroup,
            user_namespace=userns,
        )
        bundle = sandbox_dir / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(spec))
        meta = _Meta(
            runtime=runtime.name,
            cgroup=cgroup,
            container=container,
            user_namespace=userns,
            uid=image.uid,
            gid=image.gid,
            workdir=image.workdir,
            env=_env_dict(spec["process"]["env"]),
        )
        (sandbox_dir / "meta.json").write_text(json.dumps(dataclasses.asdict(meta)))
        self._root(runtime).mkdir(parents=True, exist_ok=True)
        log = sandbox_dir / "runtime.log"
        with open(log, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *runtime.command(
                    self._root(runtime), "run", "--detach", "--bundle", str(bundle), container
                ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
            )
            rc = await proc.wait()
        if rc != 0:
            raise SandboxStartError(
                f"{runtime.name} could not start the sandbox (exit {rc})",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                stderr_tail=_tail(log),
                hint="run `corral doctor` to check the host",
            )
        if config.ports:
            pid = await self._init_pid(runtime, container, config.sandbox_id)
            await ports.start_forwarder(
                sandbox_dir, config.sandbox_id, pid, config.ports, self.name
            )

    async def _init_pid(self, runtime: OciRuntime, container: str, sandbox_id: str) -> int:
        rc, out, err = await _run(runtime.command(self._root(runtime), "state", container))
        if rc != 0:
            raise SandboxStartError(
                f"{runtime.name} state failed (exit {rc})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=err.decode(errors="replace")[-500:],
            )
        return int(json.loads(out)["pid"])

    async def published_ports(self, sandbox_id: str) -> list[PortMapping]:
        return ports.read_ports(self._dir(sandbox_id))

    async def destroy(self, sandbox_id: str) -> None:
        standby = self._standbys.pop(sandbox_id, None)
        if standby is not None:
            await standby.close()
        sandbox_dir = self._dir(sandbox_id)
        await ports.stop_forwarder(sandbox_dir, sandbox_id)
        try:
            meta: _Meta | None = self._meta(sandbox_id)
        except (NotFoundError, ValueError, TypeError):
            meta = None
        container = CONTAINER_PREFIX + sandbox_id
        runtimes = [get_runtime(meta.runtime)] if meta else list(RUNTIMES.values())
        for runtime in runtimes:
            if shutil.which(runtime.name) and self._root(runtime).is_dir():
                await _run(
                    runtime.command(self._root(runtime), "delete", runtime.force_flag, container)
                )
        cgroup = meta.cgroup if meta else f"{self.cgroup_parent}/{sandbox_id}"
        await release_cgroup(cgroup)
        for point in mounts.mounts_under(sandbox_dir):
            mounts.unmount(point)
        shutil.rmtree(sandbox_dir, ignore_errors=True)

    async def status(self, sandbox_id: str) -> BackendStatus:
        try:
            meta = self._meta(sandbox_id)
        except NotFoundError:
            return BackendStatus.MISSING
        runtime = get_runtime(meta.runtime)
        rc, out, _ = await _run(runtime.command(self._root(runtime), "state", meta.container))
        if rc != 0:
            return BackendStatus.STOPPED
        state = json.loads(out or b"{}").get("status", "stopped")
        return {
            "created": BackendStatus.CREATED,
            "creating": BackendStatus.CREATED,
            "running": BackendStatus.RUNNING,
            "paused": BackendStatus.PAUSED,
        }.get(state, BackendStatus.STOPPED)

    async def list_sandboxes(self) -> list[str]:
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found.update(p.name for p in self.sandboxes_dir.iterdir() if p.is_dir())
        for runtime in RUNTIMES.values():
            root = self._root(runtime)
            if not root.is_dir() or shutil.which(runtime.name) is None:
                continue
            rc, out, _ = await _run(runtime.command(root, "list", "--format", "json"))
            if rc == 0 and out.strip():
                for entry in json.loads(out) or []:
                    cid = entry.get("id", "")
                    if cid.startswith(CONTAINER_PREFIX):
                        found.add(cid.removeprefix(CONTAINER_PREFIX))
        found.update(cgroups.children(self.cgroup_parent))
        return sorted(found)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        meta = self._meta(sandbox_id)
        reading = cgroups.read(meta.cgroup)
        return SandboxStats(
            memory_bytes=reading.memory_bytes,
            memory_limit=reading.memory_limit,
            cpu_seconds=reading.cpu_seconds,
            pids=reading.pids,
            pids_limit=reading.pids_limit,
            oom_kills=reading.oom_kills,
        )

    async def pause(self, sandbox_id: str) -> None:
        await self._simple(sandbox_id, "pause")

    async def resume(self, sandbox_id: str) -> None:
        await self._simple(sandbox_id, "resume")

    async def set_cpuset(self, sandbox_id: str, cpuset: str) -> None:
        meta = self._meta(sandbox_id)
        runtime = get_runtime(meta.runtime)
        if not runtime.in_kernel:
            raise UnsupportedError(
                f"{runtime.name} cannot re-pin a running sandbox", backend=self.name
            )
        argv = runtime.command(
            self._root(runtime), "update", "--cpuset-cpus", cpuset, meta.container
        )
        rc, _, err = await _run(argv)
        if rc != 0:
            raise ExecError(
                f"{runtime.name} update --cpuset-cpus failed (exit {rc})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=err.decode(errors="replace")[-500:],
            )

    async def _simple(self, sandbox_id: str, verb: str) -> None:
        meta = self._meta(sandbox_id)
        runtime = get_runtime(meta.runtime)
        rc, _, err = await _run(runtime.command(self._root(runtime), verb, meta.container))
        if rc != 0:
            raise ExecError(
                f"{runtime.name} {verb} failed (exit {rc})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=err.decode(errors="replace")[-500:],
            )

    # -- exec ----------------------------------------------------------------

    async def prime(self, sandbox_id: str) -> None:
        """Start a standby shell in the sandbox so that its next command skips
        `<runtime> exec` (see `standby.py`); crun and runc only. Warm pools call it."""
        meta = self._meta(sandbox_id)
        runtime = get_runtime(meta.runtime)
        if not runtime.in_kernel or sandbox_id in self._standbys:
            return
        target = ExecTarget(
            runtime, self._root(runtime), meta.container, meta.cgroup, self._dir(sandbox_id)
        )
        token = uuid.uuid4().hex[:12]
        request = ExecRequest(["/bin/sh"])
        self._standbys[sandbox_id] = await start_standby(
            target, _process_spec(meta, request, token), token
        )

    async def aclose(self) -> None:
        standbys, self._standbys = list(self._standbys.values()), {}
        for standby in standbys:
            await standby.close()

    def _standby_exec(
        self, sandbox_id: str, request: ExecRequest
    ) -> tuple[Standby, AsyncGenerator[Output | Finished, None]] | None:
        """The command through the sandbox's standby, if it has a live one that can
        carry `request` (else None: the ordinary exec)."""
        standby = self._standbys.get(sandbox_id)
        line = None if standby is None else command_line(request)
        if standby is None or line is None:
            return None
        del self._standbys[sandbox_id]
        if not standby.alive:
            return None
        return standby, standby.run(line, request)

    async def exec_stream(self, sandbox_id: str, request: ExecRequest) -> AsyncIterator[ExecEvent]:
        if not request.argv:
            self._meta(sandbox_id)  # an unknown sandbox is NotFoundError first
            raise ExecError(
                "no command given",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="pass the command to run, e.g. ['/bin/true']",
            )
        # A primed sandbox's standby knows where it runs: its first command needs
        # neither meta.json nor a process spec (the shell has both already).
        primed = self._standby_exec(sandbox_id, request)
        if primed is not None:
            target, stream = primed[0].target, primed[1]
        else:
            meta = self._meta(sandbox_id)
            runtime = get_runtime(meta.runtime)
            target = ExecTarget(
                runtime, self._root(runtime), meta.container, meta.cgroup, self._dir(sandbox_id)
            )
            token = uuid.uuid4().hex[:12]
            stream = runtime_exec(target, _process_spec(meta, request, token), request, token)
        runtime = target.runtime
        oom_before = cgroups.oom_kills(target.cgroup)
        end: Finished | None = None
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, Finished):
                    end = event
                else:
                    yield event
        assert end is not None
        oom = cgroups.oom_kills(target.cgroup) > oom_before
        # A dying gVisor sentry can make `runsc exec` report any code, even 0: ask
        # the runtime whether the sandbox is still there (~20 ms, runsc only).
        gone = not runtime.in_kernel and await self.status(sandbox_id) != BackendStatus.RUNNING
        yield exit_status(
            end.returncode, runtime, request, end.stderr_tail, end.timed_out, oom, end.started, gone
        )


def _env_dict(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def _process_spec(meta: _Meta, request: ExecRequest, token: str) -> dict[str, Any]:
    return process_spec(
        uid=meta.uid,
        gid=meta.gid,
        args=list(request.argv),
        env={**meta.env, **request.env, EXEC_TOKEN_VAR: token},
        cwd=request.cwd or meta.workdir,
    )


async def _run(argv: list[str]) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err


async def release_cgroup(cgroup: str) -> None:
    """Kill whatever still runs in the cgroup, then remove it (retrying while it drains)."""
    for _attempt in range(50):
        dirs = cgroups.cgroup_dirs(cgroup)
        if not dirs:
            return
        for directory in dirs:
            if directory.parent.parent.name == "freezer" or (directory / "freezer.state").exists():
                with contextlib.suppress(OSError):
                    (directory / "freezer.state").write_text("THAWED")
            for name in ("cgroup.procs", "tasks"):
                with contextlib.suppress(OSError):
                    for pid in (directory / name).read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
        if not cgroups.remove(cgroup):
            return
        await asyncio.sleep(0.02)


def _tail(path: Path, limit: int = 1000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""

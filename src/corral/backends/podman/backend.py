"""The `podman` backend: sandboxes as Podman containers (crun, runc or runsc).

Podman owns the container (`podman ps` shows it, labelled with the sandbox id
and tenant); Corral keeps `<state>/sandboxes/<id>` for what Podman does not
manage: the size-limited tmpfs scratch (/tmp, $HOME, workdir) and `meta.json`.
The idle main process is catatonit, bound read-only at /.corral like the oci
backend's; commands run through `podman exec`. On crun and runc the container's
ids 0-65535 are host UID_BASE+ (`--uidmap`), as on the oci backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from corral._sys import cgroups, mounts, procs
from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecEvent,
    ExecRequest,
    Output,
    SandboxConfig,
    SandboxStats,
)
from corral.backends.oci.backend import (
    CONTAINER_PREFIX,
    EXEC_TOKEN_VAR,
    OciBackend,
    release_cgroup,
)
from corral.backends.oci.bundle import SANDBOX_INIT, UID_BASE, UID_RANGE
from corral.backends.oci.execution import exit_status, feed, pump
from corral.backends.oci.runtimes import get_runtime
from corral.backends.podman.engine import ULIMITS, Podman
from corral.backends.podman.images import ImageLoader
from corral.backends.sandbox_dir import (
    claim_dir,
    make_scratch,
    refuse_network,
    released_on_failure,
    sandbox_path,
)
from corral.errors import ExecError, NotFoundError, SandboxStartError

# Under gVisor the host cgroup also counts the sentry's and gofer's own threads and
# the ptrace platform's stub processes (~60 at idle through podman): without this
# headroom a busy sandbox's sentry dies of EAGAIN well before `limits.pids`.
RUNSC_PIDS_OVERHEAD = 128
SANDBOX_LABEL = "io.corral.sandbox-id"
TENANT_LABEL = "io.corral.tenant"
# Kills, from inside the sandbox, every process carrying an exec's marker: under
# gVisor the command's processes are not host processes. No pipeline: Debian's
# runsc sentry dies when `tr ... | grep -q` closes the pipe early.
_KILL_MARKED = (
    'for d in /proc/[0-9]*; do grep -qxz "$1" "$d/environ" 2>/dev/null'
    ' && kill -9 "${d#/proc/}" 2>/dev/null; done; exit 0'
)


@dataclass(frozen=True, slots=True)
class _Meta:
    runtime: str
    container: str
    container_id: str
    cgroup: str  # the container's own cgroup (limits, usage)
    cgroup_parent: str  # the sandbox's cgroup: the container and its conmon
    uid: int
    gid: int
    workdir: str
    pids_overhead: int = 0  # host tasks allowed on top of limits.pids (gVisor's own)


class PodmanBackend(Backend):
    """Sandboxes as Podman containers; see the module docstring."""

    name: ClassVar[str] = "podman"
    runtimes: ClassVar[tuple[str, ...]] = ("crun", "runc", "runsc")

    def __init__(self, state_dir: Path, *, runtime: str = "crun") -> None:
        # The same error as the oci backend's for an unknown name.
        userns = get_runtime(runtime).user_namespace
        self.capabilities = frozenset(
            {Capability.PAUSE, Capability.CPUSET}
            | ({Capability.USER_NAMESPACE} if userns else set())
        )
        self.state_dir = Path(state_dir)
        self.default_runtime = runtime
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.podman = Podman(self.state_dir)
        self.images = ImageLoader(self.podman)
        # The same support dir (catatonit) and cgroup parent as the oci backend's,
        # so host tooling and leak checks see one layout per state dir.
        self._oci = OciBackend(self.state_dir)
        self.cgroup_parent = self._oci.cgroup_parent

    # -- paths and records -------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return sandbox_path(self.sandboxes_dir, sandbox_id, self.name)

    def _meta(self, sandbox_id: str) -> _Meta:
        try:
            data = json.loads((self._dir(sandbox_id) / "podman.json").read_text())
            return _Meta(**data)
        except (OSError, ValueError, TypeError):
            raise NotFoundError(
                f"no sandbox '{sandbox_id}'",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="list sandboxes with `corral ls`",
            ) from None

    # -- lifecycle -----------------------------------------------------------

    async def create(self, config: SandboxConfig) -> None:
        runtime = config.runtime or self.default_runtime
        get_runtime(runtime).binary()
        self.podman.binary()
        refuse_network(config, self.name, "use network='none'")
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
        image_name = await self.images.ensure(image, config.sandbox_id)
        # The sandbox's ids as the host sees them: shifted by UID_BASE in a user namespace.
        shift = UID_BASE if get_runtime(runtime).user_namespace else 0
        scratch = make_scratch(
            sandbox_dir, size=config.limits.disk, uid=image.uid + shift, gid=image.gid + shift
        )
        container = CONTAINER_PREFIX + config.sandbox_id
        cgroup_parent = f"{self.cgroup_parent}/{config.sandbox_id}"
        argv = run_arguments(
            config,
            runtime=runtime,
            container=container,
            image_name=image_name,
            scratch=scratch,
            support_dir=Path(self._oci.ensure_support()),
            cgroup_parent=cgroup_parent,
            seccomp_profile=self.podman.seccomp_profile,
        )
        started = await self.podman.run(*argv)
        if started.returncode != 0:
            raise SandboxStartError(
                f"podman could not start the sandbox on {runtime} (exit {started.returncode})",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                stderr_tail=started.error,
                hint="run `corral doctor` to check the host",
            )
        container_id = started.stdout.decode().strip().splitlines()[-1]
        meta = _Meta(
            runtime=runtime,
            container=container,
            container_id=container_id,
            cgroup=f"{cgroup_parent}/libpod-{container_id}",
            cgroup_parent=cgroup_parent,
            uid=image.uid,
            gid=image.gid,
            workdir=image.workdir,
            pids_overhead=pids_overhead(runtime),
        )
        (sandbox_dir / "podman.json").write_text(json.dumps(dataclasses.asdict(meta)))

    async def destroy(self, sandbox_id: str) -> None:
        sandbox_dir = self._dir(sandbox_id)
        container = CONTAINER_PREFIX + sandbox_id
        if (self.podman.home / "storage.conf").exists():
            # -t 0: SIGKILL at once. Also removes a Created container a failed start left.
            await self.podman.run("rm", "--force", "--time", "0", "--volumes", container)
        await release_cgroup(f"{self.cgroup_parent}/{sandbox_id}")
        for point in mounts.mounts_under(sandbox_dir):
            mounts.unmount(point)
        shutil.rmtree(sandbox_dir, ignore_errors=True)

    async def status(self, sandbox_id: str) -> BackendStatus:
        sandbox_dir = self._dir(sandbox_id)
        state = await self._podman_state(CONTAINER_PREFIX + sandbox_id)
        if state is None:
            return BackendStatus.STOPPED if sandbox_dir.exists() else BackendStatus.MISSING
        return {
            "created": BackendStatus.CREATED,
            "configured": BackendStatus.CREATED,
            "initialized": BackendStatus.CREATED,
            "running": BackendStatus.RUNNING,
            "paused": BackendStatus.PAUSED,
        }.get(state, BackendStatus.STOPPED)

    async def _podman_state(self, container: str) -> str | None:
        if not (self.podman.home / "storage.conf").exists():
            return None
        done = await self.podman.run("container", "inspect", "--format", "json", container)
        if done.returncode != 0:
            return None
        entries = json.loads(done.stdout or b"[]")
        return str(entries[0]["State"]["Status"]) if entries else None

    async def list_sandboxes(self) -> list[str]:
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found.update(p.name for p in self.sandboxes_dir.iterdir() if p.is_dir())
        if (self.podman.home / "storage.conf").exists():
            listed = await self.podman.run(
                "ps", "--all", "--filter", f"label={SANDBOX_LABEL}", "--format", "json"
            )
            if listed.returncode == 0 and listed.stdout.strip():
                for entry in json.loads(listed.stdout) or []:
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
            reading = dataclasses.replace(reading, oom_kills=int(kernel_reported_oom(meta.cgroup)))
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

    async def _simple(self, sandbox_id: str, verb: str) -> None:
        meta = self._meta(sandbox_id)
        done = await self.podman.run(verb, meta.container)
        if done.returncode != 0:
            raise ExecError(
                f"podman {verb} failed (exit {done.returncode})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=done.error,
            )

    # -- exec ----------------------------------------------------------------

    async def exec_stream(self, sandbox_id: str, request: ExecRequest) -> AsyncIterator[ExecEvent]:
        meta = self._meta(sandbox_id)
        if not request.argv:
            raise ExecError(
                "no command given",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="pass the command to run, e.g. ['/bin/true']",
            )
        runtime = get_runtime(meta.runtime)
        token = uuid.uuid4().hex[:12]
        argv = ["exec", "--user", f"{meta.uid}:{meta.gid}"]
        argv += ["--workdir", request.cwd or meta.workdir]
        for key, value in {**request.env, EXEC_TOKEN_VAR: token}.items():
            argv += ["--env", f"{key}={value}"]
        if request.stdin is not None:
            argv.append("--interactive")
        oom_before = cgroups.oom_kills(meta.cgroup)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self.podman.command(*argv, meta.container, *request.argv),
            env=self.podman.env,
            cwd=self.podman.home,  # not the caller's: conmon writes an `oom` file there
            stdin=asyncio.subprocess.PIPE
            if request.stdin is not None
            else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        queue: asyncio.Queue[Output | None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(pump(proc.stdout, "stdout", queue)),
            asyncio.create_task(pump(proc.stderr, "stderr", queue)),
        ]
        if request.stdin is not None:
            tasks.append(asyncio.create_task(feed(proc, request.stdin)))
        deadline = None if request.timeout is None else started + request.timeout
        timed_out = False
        finished = False
        stderr_tail = b""
        try:
            open_streams = 2
            while open_streams:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    timed_out = True
                    await self._kill_exec(meta, token)
                    deadline = None
                    continue
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    continue
                if item is None:
                    open_streams -= 1
                    continue
                if item.stream == "stderr":
                    stderr_tail = (stderr_tail + item.data)[-2048:]
                yield item
            rc = await proc.wait()
            finished = True
            if runtime.in_kernel:
                self._kill_orphaned_writers(meta, token)
        finally:
            if not finished:
                await asyncio.shield(self._kill_exec(meta, token))
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            for task in tasks:
                task.cancel()
        oom = cgroups.oom_kills(meta.cgroup) > oom_before
        gone = not runtime.in_kernel and await self.status(sandbox_id) != BackendStatus.RUNNING
        if gone and not oom:
            oom = kernel_reported_oom(meta.cgroup)
        yield exit_status(rc, runtime, request, stderr_tail, timed_out, oom, started, gone)

    def _kill_orphaned_writers(self, meta: _Meta, token: str) -> None:
        """Kill what an exec left behind still holding its output.

        `podman exec` returns when the command's main process exits, where the oci
        backend waits for the output to close. Podman's reader is gone by then, so
        such a process would die of SIGPIPE at its next write; a silent one (a fork
        bomb's children) would run on. Killed now, nothing outlives the exec but
        what detached its output (`nohup cmd >/dev/null 2>&1 &`), as on the oci backend.
        """
        marker = f"{EXEC_TOKEN_VAR}={token}".encode()
        for _pass in range(20):  # until a pass finds none: children fork meanwhile
            found = [
                pid
                for pid in cgroups.pids(meta.cgroup)
                if procs.has_environ_entry(pid, marker) and _writes_to_a_pipe(pid)
            ]
            if not found:
                return
            for pid in found:
                procs.kill(pid)

    async def _kill_exec(self, meta: _Meta, token: str) -> None:
        """Kill every process of one exec: by its marker in the host cgroup, or
        from inside the sandbox when gVisor hides its processes from the host."""
        marker = f"{EXEC_TOKEN_VAR}={token}"
        if get_runtime(meta.runtime).in_kernel:
            for _pass in range(2):  # a second pass catches children forked meanwhile
                for pid in cgroups.pids(meta.cgroup):
                    if procs.has_environ_entry(pid, marker.encode()):
                        procs.kill(pid)
            return
        user = f"{meta.uid}:{meta.gid}"
        for _pass in range(2):
            await self.podman.run(
                "exec", "--user", user, meta.container, "/bin/sh", "-c", _KILL_MARKED, "sh", marker
            )


def kernel_reported_oom(cgroup: str) -> bool:
    """True when the kernel log has an OOM kill in `cgroup`.

    Once a gVisor sandbox has died of OOM, podman removes the container's cgroup
    and its oom_kill counter with it (and records no OOMKilled for runsc), so the
    kernel's own `oom-kill:... oom_memcg=<cgroup>,` line is what is left.
    """
    needle = f"oom_memcg={cgroup},".encode()
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return False
            except OSError as exc:  # EPIPE: records overwritten while reading; read on
                if exc.errno != errno.EPIPE:
                    return False
                continue
            if needle in record:
                return True
    finally:
        os.close(fd)


def _writes_to_a_pipe(pid: int) -> bool:
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                return True
    return False


def pids_overhead(runtime: str) -> int:
    return RUNSC_PIDS_OVERHEAD if runtime == "runsc" else 0


def run_arguments(
    config: SandboxConfig,
    *,
    runtime: str,
    container: str,
    image_name: str,
    scratch: Path,
    support_dir: Path,
    cgroup_parent: str,
    seccomp_profile: Path,
) -> list[str]:
    """The `podman run` arguments for `config`: locked down like the oci backend's bundle."""
    image = config.image
    limits = config.limits
    argv = ["run", "--detach", "--name", container, "--runtime", runtime, "--pull", "never"]
    argv += ["--hostname", config.sandbox_id, "--label", f"{SANDBOX_LABEL}={config.sandbox_id}"]
    if "tenant" in config.labels:
        argv += ["--label", f"{TENANT_LABEL}={config.labels['tenant']}"]
    for key, value in config.labels.items():
        argv += ["--label", f"io.corral.label.{key}={value}"]
    argv += ["--read-only", "--read-only-tmpfs=false", "--user", f"{image.uid}:{image.gid}"]
    if get_runtime(runtime).user_namespace:
        # Container ids 0-65535 are host UID_BASE+: host root is never inside. (runsc
        # runs without one, as on the oci backend: gVisor's sentry is the boundary.)
        mapping = f"0:{UID_BASE}:{UID_RANGE}"
        argv += ["--uidmap", mapping, "--gidmap", mapping]
    argv += ["--cap-drop=all", "--security-opt", "no-new-privileges", "--network", "none"]
    argv += ["--security-opt", f"seccomp={seccomp_profile}"]
    argv += ["--memory", str(limits.memory), "--memory-swap", str(limits.memory)]
    argv += [
        "--pids-limit",
        str(limits.pids + pids_overhead(runtime)),
        "--cpus",
        f"{limits.vcpus:g}",
    ]
    if limits.cpuset:
        argv += ["--cpuset-cpus", limits.cpuset]
    for ulimit in ULIMITS:
        argv += ["--ulimit", ulimit]
    argv += ["--cgroup-parent", cgroup_parent, "--systemd", "false"]
    for key, value in {"HOME": image.home, **image.env, **config.env}.items():
        argv += ["--env", f"{key}={value}"]
    argv += ["--volume", f"{support_dir}:{SANDBOX_INIT.rsplit('/', 1)[0]}:ro,nosuid,nodev"]
    for sub, target in (("tmp", "/tmp"), ("home", image.home), ("work", image.workdir)):
        argv += ["--volume", f"{scratch / sub}:{target}:rw,nosuid,nodev"]
    for mount in config.mounts:
        argv += ["--volume", f"{mount.source}:{mount.target}:ro,nosuid,nodev"]
    argv += [image_name, SANDBOX_INIT, "-P"]
    return argv

"""The `microvm` backend: one QEMU `microvm` per sandbox, driven through its guest agent.

Each sandbox is a directory under `<state>/sandboxes/<id>` holding `meta.json`,
its qcow2 scratch overlay, the QEMU pid file, console log, QMP socket and the
agent's port sockets. The QEMU process is daemonized into a host cgroup of its
own; nothing lives in this Python process, so any process can drive a VM.
Snapshots (`snapshot`, `restore`, `fork`) live in snapshots.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecEvent,
    ExecRequest,
    ExitStatus,
    Output,
    SandboxConfig,
    SandboxStats,
)
from corral.backends.microvm import hostcg
from corral.backends.microvm.agent_client import (
    CHUNK,
    AgentConnection,
    AgentError,
    chunks_of,
    connect,
    encode_exec,
)
from corral.backends.microvm.bundle import DEFAULT_CACHE, BundleStore
from corral.backends.microvm.qemu import (
    QEMU,
    DriveSpec,
    VmSpec,
    accelerator,
    command_line,
    qmp_call,
    tsc_khz,
)
from corral.backends.sandbox_dir import claim_dir, refuse_network, released_on_failure, sandbox_path
from corral.errors import (
    BackendUnavailableError,
    CorralError,
    ExecError,
    FileTooLargeError,
    NotFoundError,
    SandboxStartError,
    UnsupportedError,
)

__all__ = ["MicrovmBackend"]

CGROUP_PARENT = "/corral"
# Ports for concurrent requests to one VM. Each costs the guest ~4.5 MiB of
# virtio-console receive buffers, so a few.
AGENT_PORTS = 4
BOOT_DEADLINE = 120.0  # seconds; TCG on a busy 2-core host can take 10+
# Under TCG the guest's speculation mitigations (page-table isolation above all:
# a TLB flush per syscall) cost ~20% of boot CPU and more per exec, and guard
# nothing: one VM is one sandbox, and the guest kernel protects nothing from its
# user that the host does not (the host holds QEMU in its own process and cgroup).
_TCG_FLAGS = {"tcg": ("mitigations=off",)}
# Longest a unix socket path may be (sun_path is 108 bytes with its NUL).
_SUN_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class VmMeta:
    """What every later call needs about a sandbox's VM (meta.json)."""

    spec: dict[str, Any]  # VmSpec.to_json()
    cgroup: str
    uid: int
    gid: int
    workdir: str
    env: dict[str, str]
    memory_limit: int
    pids_limit: int
    vcpus: float  # the host CPU quota, in CPUs (the VM has ceil(vcpus) vCPUs)
    restored_from: str | None = None

    @property
    def vm(self) -> VmSpec:
        return VmSpec.from_json(dict(self.spec))


class MicrovmBackend(Backend):
    """Sandboxes as QEMU microVMs (`vmm="qemu"`); see the module docstring."""

    name: ClassVar[str] = "microvm"
    capabilities = frozenset({Capability.PAUSE, Capability.SNAPSHOT})

    def __init__(
        self,
        state_dir: Path,
        *,
        vmm: str = "qemu",
        cache_dir: Path | None = None,
        runtime: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`cache_dir` (default /var/cache/corral/microvm, or $CORRAL_MICROVM_CACHE) holds
        kernels and bundles shared by every state dir. `runtime`, the container
        backends' option, has no meaning for a VM and is ignored."""
        if vmm != "qemu":
            raise UnsupportedError(
                f"the microvm backend's VMM '{vmm}' is not driven by this class",
                backend=self.name,
                hint="use vmm='qemu' here; Firecracker and Cloud Hypervisor have their own drivers",
            )
        del runtime
        env = os.environ if environ is None else environ
        self.state_dir = Path(state_dir)
        self.vmm = vmm
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.snapshots_dir = self.state_dir / "snapshots"
        cache = cache_dir or Path(env.get("CORRAL_MICROVM_CACHE") or DEFAULT_CACHE)
        self.bundles = BundleStore(cache)
        instance = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        self.cgroup_parent = f"{CGROUP_PARENT}/{instance}"

    # -- records -------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return sandbox_path(self.sandboxes_dir, sandbox_id, self.name)

    def _meta(self, sandbox_id: str) -> VmMeta:
        try:
            data = json.loads((self._dir(sandbox_id) / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFoundError(
                f"no sandbox '{sandbox_id}'",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="list sandboxes with `corral ls`",
            ) from None
        return VmMeta(**data)

    def _write_meta(self, sandbox_dir: Path, meta: VmMeta) -> None:
        temp = sandbox_dir / ".meta.json.new"
        temp.write_text(json.dumps(dataclasses.asdict(meta)))
        temp.rename(sandbox_dir / "meta.json")

    # -- lifecycle -----------------------------------------------------------

    async def create(self, config: SandboxConfig) -> None:
        refuse_network(config, self.name, "microVMs have no network yet: use network='none'")
        if shutil.which(QEMU) is None:
            raise BackendUnavailableError(
                f"{QEMU} is not installed",
                backend=self.name,
                hint="apt-get install qemu-system-x86 qemu-utils",
            )
        sandbox_dir = claim_dir(self.sandboxes_dir, config.sandbox_id, self.name)
        await released_on_failure(
            self._create(config, sandbox_dir), self.destroy, config.sandbox_id
        )

    async def _create(self, config: SandboxConfig, sandbox_dir: Path) -> None:
        _check_socket_room(sandbox_dir, config.sandbox_id)
        image, limits = config.image, config.limits
        try:
            bundle = await asyncio.to_thread(self.bundles.bundle, image, config.mounts)
            scratch = await asyncio.to_thread(
                self.bundles.scratch_base, limits.disk, image.uid, image.gid
            )
        except CorralError as exc:
            raise SandboxStartError(
                f"the microVM bundle could not be built: {exc.message}",
                sandbox_id=config.sandbox_id,
                backend=self.name,
                stderr_tail=exc.stderr_tail,
                hint=exc.hint,
            ) from exc
        overlay = sandbox_dir / "scratch.qcow2"
        await _qemu_img(
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(scratch), str(overlay)
        )
        mounts = [f"corral.mount={d.serial}:{d.fstype}:{d.target}:ro" for d in bundle.disks]
        binds = ["corral.bind=/.corral/tmp:/tmp"]
        binds += [
            f"corral.bind=/.corral/home:{image.home}",
            f"corral.bind=/.corral/work:{image.workdir}",
        ]
        accel = accelerator()
        cmdline = " ".join(
            [
                "console=ttyS0 quiet panic=-1 reboot=t pci=off 8250.nr_uarts=1",
                "cryptomgr.notests random.trust_cpu=on",
                *_TCG_FLAGS.get(accel.name, ()),
                f"tsc_early_khz={tsc_khz()}",
                *mounts,
                "corral.mount=scratch:ext4:/.corral:rw",
                *binds,
                f"corral.pids={limits.pids} corral.ports={AGENT_PORTS}",
            ]
        )
        drives = [DriveSpec(d.serial, str(d.path), "raw", True) for d in bundle.disks]
        drives.append(DriveSpec("scratch", str(overlay), "qcow2", False))
        spec = VmSpec(
            kernel=str(bundle.kernel),
            initrd=str(bundle.initramfs),
            cmdline=cmdline,
            vcpus=max(1, math.ceil(limits.vcpus)),
            memory_mib=max(64, limits.memory >> 20),
            accel=accel.name,
            ports=AGENT_PORTS,
            drives=tuple(drives),
        )
        meta = VmMeta(
            spec=spec.to_json(),
            cgroup=f"{self.cgroup_parent}/{config.sandbox_id}",
            uid=image.uid,
            gid=image.gid,
            workdir=image.workdir,
            env={**image.env, **config.env},
            memory_limit=limits.memory,
            pids_limit=limits.pids,
            vcpus=limits.vcpus,
        )
        self._write_meta(sandbox_dir, meta)
        await self.start_vm(config.sandbox_id, meta)
        await self.wait_for_agent(config.sandbox_id, BOOT_DEADLINE)

    async def start_vm(self, sandbox_id: str, meta: VmMeta, *, incoming: bool = False) -> None:
        """Start the sandbox's QEMU (daemonized, in its host cgroup)."""
        sandbox_dir = self._dir(sandbox_id)
        cgroup = hostcg.HostCgroup(meta.cgroup)
        cgroup.create(vcpus=meta.vcpus, memory=meta.memory_limit)
        procs = cgroup.procs_files()
        argv = command_line(meta.vm, sandbox_dir, incoming=incoming)
        log = sandbox_dir / "qemu.log"
        with open(log, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                preexec_fn=lambda: hostcg.join(procs),
            )
            rc = await proc.wait()
        if rc != 0:
            raise SandboxStartError(
                f"QEMU could not start the VM (exit {rc})",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=_tail(log),
                hint="run `corral doctor` to check the host",
            )

    async def wait_for_agent(self, sandbox_id: str, deadline: float) -> None:
        """Until the guest agent answers, then set the guest's clock on that same
        connection; SandboxStartError (with the console) if it never answers."""
        sandbox_dir = self._dir(sandbox_id)
        until = time.monotonic() + deadline
        while True:
            if self._qemu_pid(sandbox_id) is None:
                raise SandboxStartError(
                    "the VM stopped while booting",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                    stderr_tail=_tail(sandbox_dir / "console.log")
                    or _tail(sandbox_dir / "qemu.log"),
                    hint="see the guest console above; `corral doctor` checks the host",
                )
            try:
                conn = await connect(
                    sandbox_dir, AGENT_PORTS, deadline=min(2.0, until - time.monotonic())
                )
            except ExecError:
                if time.monotonic() >= until:
                    raise SandboxStartError(
                        f"the guest agent did not answer within {deadline:.0f}s",
                        sandbox_id=sandbox_id,
                        backend=self.name,
                        stderr_tail=_tail(sandbox_dir / "console.log"),
                        hint="the host may be overloaded (TCG); see the guest console",
                    ) from None
                continue
            try:
                await _set_clock(conn)
            finally:
                await conn.close()
            return

    async def set_clock(self, sandbox_id: str) -> None:
        """Set the guest's wall clock to the host's (after boot and after every restore)."""
        async with self._agent(sandbox_id) as conn:
            await _set_clock(conn)

    def _qemu_pid(self, sandbox_id: str) -> int | None:
        """The live QEMU process of this sandbox, checked by its command line."""
        sandbox_dir = self._dir(sandbox_id)
        try:
            pid = int((sandbox_dir / "qemu.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        if state in ("Z", "X") or str(sandbox_dir).encode() not in cmdline:
            return None
        return pid

    async def destroy(self, sandbox_id: str) -> None:
        sandbox_dir = self._dir(sandbox_id)
        pid = self._qemu_pid(sandbox_id)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(500):
                if self._qemu_pid(sandbox_id) is None:
                    break
                await asyncio.sleep(0.01)
        from corral.backends.oci.backend import release_cgroup

        await release_cgroup(f"{self.cgroup_parent}/{sandbox_id}")
        shutil.rmtree(sandbox_dir, ignore_errors=True)

    async def status(self, sandbox_id: str) -> BackendStatus:
        try:
            self._meta(sandbox_id)
        except NotFoundError:
            return BackendStatus.MISSING
        if self._qemu_pid(sandbox_id) is None:
            return BackendStatus.STOPPED
        try:
            state = await qmp_call(self._dir(sandbox_id) / "qmp.sock", "query-status", timeout=10)
        except ExecError:
            return (
                BackendStatus.STOPPED
                if self._qemu_pid(sandbox_id) is None
                else BackendStatus.RUNNING
            )
        status = state.get("status")
        if status == "running":
            return BackendStatus.RUNNING
        if status in ("paused", "postmigrate", "inmigrate", "prelaunch", "suspended"):
            return BackendStatus.PAUSED
        return BackendStatus.STOPPED

    async def list_sandboxes(self) -> list[str]:
        from corral._sys import cgroups

        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found.update(p.name for p in self.sandboxes_dir.iterdir() if p.is_dir())
        found.update(cgroups.children(self.cgroup_parent))
        return sorted(found)

    async def pause(self, sandbox_id: str) -> None:
        self._meta(sandbox_id)
        await qmp_call(self._dir(sandbox_id) / "qmp.sock", "stop")

    async def resume(self, sandbox_id: str) -> None:
        self._meta(sandbox_id)
        await qmp_call(self._dir(sandbox_id) / "qmp.sock", "cont")

    async def stats(self, sandbox_id: str) -> SandboxStats:
        meta = self._meta(sandbox_id)
        async with self._agent(sandbox_id) as conn:
            kind, payload = await conn.request(b"S")
        guest = _parse_stats(payload if kind == b"S" else b"")
        cgroup = hostcg.HostCgroup(meta.cgroup)
        return SandboxStats(
            # The guest's view: memory in use inside the VM, whose RAM is the limit.
            memory_bytes=(guest.get("mem_total_kib", 0) - guest.get("mem_available_kib", 0)) << 10,
            memory_limit=meta.memory_limit,
            # CPU from the host: what the VM cost (under TCG the guest's own clock
            # keeps running while the host throttles QEMU, so its count would lie).
            cpu_seconds=cgroup.cpu_seconds(),
            pids=guest.get("pids", 0) + 1,  # the sandbox's processes and the agent (PID 1)
            pids_limit=meta.pids_limit,
            oom_kills=guest.get("oom_kills", 0),
        )

    async def guest_stats(self, sandbox_id: str) -> dict[str, int]:
        """Everything the agent reports from inside the guest (see docs/microvm.md)."""
        self._meta(sandbox_id)
        async with self._agent(sandbox_id) as conn:
            kind, payload = await conn.request(b"S")
        return _parse_stats(payload if kind == b"S" else b"")

    # -- snapshots -------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path, *, keep_running: bool = False) -> None:
        """Pause the VM and save its memory, devices and scratch overlay into `dest`.

        The sandbox is STOPPED after (its QEMU quits), or RUNNING again with
        `keep_running`. See snapshots.py for what `dest` holds.
        """
        from corral.backends.microvm import snapshots

        await snapshots.snapshot(self, sandbox_id, dest, keep_running=keep_running)

    async def restore(self, sandbox_id: str, source: Path) -> None:
        """Bring `sandbox_id` up RUNNING from the snapshot in `source`: the stopped
        sandbox in place, or a new sandbox when the id is not taken. Its processes
        go on where they were; its clock is set to now."""
        from corral.backends.microvm import snapshots

        await snapshots.restore(self, sandbox_id, source)

    async def fork(self, source: Path, sandbox_ids: Sequence[str]) -> None:
        """Restore several new sandboxes from one snapshot, each with its own overlay."""
        from corral.backends.microvm import snapshots

        await snapshots.fork(self, source, sandbox_ids)

    # -- agent plumbing --------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _agent(
        self, sandbox_id: str, deadline: float = 30.0
    ) -> AsyncIterator[AgentConnection]:
        sandbox_dir = self._dir(sandbox_id)
        if self._qemu_pid(sandbox_id) is None:
            self._meta(sandbox_id)  # NotFoundError first
            raise ExecError(
                "the sandbox's VM is not running",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=_tail(sandbox_dir / "console.log"),
                hint="destroy it and create a new one",
            )
        try:
            conn = await connect(sandbox_dir, AGENT_PORTS, deadline=deadline)
        except ExecError as exc:
            exc.sandbox_id = sandbox_id
            raise
        try:
            yield conn
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise ExecError(
                f"the connection to the guest agent broke: {exc}",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=_tail(sandbox_dir / "console.log"),
            ) from exc
        finally:
            await conn.close()

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
        started = time.monotonic()
        payload = encode_exec(
            request.argv,
            {**meta.env, **request.env},
            request.cwd or meta.workdir,
            meta.uid,
            meta.gid,
            request.timeout,
            request.stdin is not None,
        )
        async with self._agent(sandbox_id) as conn:
            await conn.send(b"E", payload)
            try:
                await conn.expect_result()
            except AgentError as exc:
                raise ExecError(
                    f"the guest agent could not start the command: {exc}",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                ) from None
            feeder = (
                asyncio.create_task(_feed(conn, request.stdin))
                if request.stdin is not None
                else None
            )
            # The agent enforces the timeout; this guard only catches a hung guest.
            guard = None if request.timeout is None else started + request.timeout + 30
            try:
                while True:
                    left = None if guard is None else max(0.1, guard - time.monotonic())
                    try:
                        kind, data = await asyncio.wait_for(conn.receive(), left)
                    except TimeoutError:
                        raise ExecError(
                            "the guest agent did not end the command after its timeout",
                            sandbox_id=sandbox_id,
                            backend=self.name,
                        ) from None
                    if kind == b"O":
                        yield Output("stdout", data)
                    elif kind == b"E":
                        yield Output("stderr", data)
                    elif kind == b"X":
                        code, flags = struct.unpack(">iI", data[:8])
                        yield ExitStatus(
                            exit_code=code,
                            timed_out=bool(flags & 1),
                            oom_killed=bool(flags & 2),
                            duration=time.monotonic() - started,
                            reason=data[8:].decode(errors="replace") or None,
                        )
                        return
            finally:
                if feeder is not None:
                    feeder.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await feeder

    # -- files -----------------------------------------------------------------

    async def put_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        meta = self._meta(sandbox_id)
        header = struct.pack(">III", mode, meta.uid, meta.gid) + _string(path)
        async with self._agent(sandbox_id) as conn:
            await conn.send(b"P", header)
            async for chunk in chunks_of(data):
                await conn.send(b"I", chunk)
            await conn.send(b"i")
            try:
                await conn.expect_result()
            except AgentError as exc:
                raise _file_error(sandbox_id, path, exc) from None

    async def get_file(self, sandbox_id: str, path: str, max_bytes: int) -> bytes:
        meta = self._meta(sandbox_id)
        request = struct.pack(">QII", max_bytes, meta.uid, meta.gid) + _string(path)
        parts: list[bytes] = []
        async with self._agent(sandbox_id) as conn:
            await conn.send(b"G", request)
            try:
                await conn.expect_result()
            except AgentError as exc:
                if exc.code == errno.EFBIG:
                    raise FileTooLargeError(
                        f"'{path}' is larger than the limit of {max_bytes} bytes",
                        sandbox_id=sandbox_id,
                        backend=self.name,
                        hint="raise the limit (--max-size) or copy a smaller file",
                    ) from None
                raise _file_error(sandbox_id, path, exc) from None
            while True:
                kind, data = await conn.receive()
                if kind == b"d":
                    break
                parts.append(data)
        return b"".join(parts)


async def _set_clock(conn: AgentConnection) -> None:
    now = time.time_ns()
    await conn.send(b"T", struct.pack(">QI", now // 1_000_000_000, now % 1_000_000_000))
    await conn.expect_result()


async def _feed(conn: AgentConnection, stdin: object) -> None:
    if isinstance(stdin, bytes):
        async for chunk in chunks_of(stdin):
            await conn.send(b"I", chunk)
    else:
        async for chunk in stdin:  # type: ignore[attr-defined]
            for start in range(0, len(chunk), CHUNK):
                await conn.send(b"I", chunk[start : start + CHUNK])
    await conn.send(b"i")


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">I", len(data)) + data


def _parse_stats(payload: bytes) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in payload.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _file_error(sandbox_id: str, path: str, exc: AgentError) -> NotFoundError:
    return NotFoundError(
        f"cannot access '{path}' in the sandbox ({os.strerror(exc.code)})",
        sandbox_id=sandbox_id,
        backend="microvm",
        hint="check the path exists and is writable by the sandbox user (e.g. under /work or /tmp)",
    )


def _check_socket_room(sandbox_dir: Path, sandbox_id: str) -> None:
    longest = sandbox_dir / f"port-{AGENT_PORTS - 1}.sock"
    if len(str(longest)) > _SUN_PATH_MAX:
        raise SandboxStartError(
            f"the sandbox directory {sandbox_dir} is too long for unix sockets",
            sandbox_id=sandbox_id,
            backend="microvm",
            hint="use a shorter state directory or sandbox id",
        )


async def _qemu_img(*args: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise BackendUnavailableError(
            "qemu-img is not installed", backend="microvm", hint="apt-get install qemu-utils"
        ) from exc
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ExecError(
            f"qemu-img {args[0]} failed (exit {proc.returncode})",
            backend="microvm",
            stderr_tail=err.decode(errors="replace")[-800:],
        )


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""

"""The `microvm` backend: one QEMU `microvm` per sandbox, driven through its guest agent.

Each sandbox is a directory under `<state>/sandboxes/<id>` holding `meta.json`,
its qcow2 scratch overlay, the QEMU pid file, console log, QMP socket and the
agent's port sockets. The QEMU process is daemonized into a host cgroup of its
own; nothing lives in this Python process, so any process can drive a VM.
Snapshots (`snapshot`, `restore`, `fork`) live in snapshots.py. With
`vmm="firecracker"` or `"cloud-hypervisor"` the backend is a `VmmBackend`
(vmm_backend.py): the same bundle and agent, driven through those VMMs' APIs.
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
    HostMount,
    SandboxConfig,
    SandboxStats,
)
from corral.backends.microvm import attach, hostcg, snapshots, vm, volumes
from corral.backends.microvm.agent_client import (
    AgentConnection,
    AgentError,
    connect,
    encode_exec,
)
from corral.backends.microvm.bundle import DEFAULT_CACHE, Bundle, BundleStore
from corral.backends.microvm.qemu import (
    QEMU,
    DriveSpec,
    VmSpec,
    accelerator,
    qmp_call,
    tsc_khz,
)
from corral.backends.microvm.settings import VMMS, VmmSettings
from corral.backends.sandbox_dir import (
    claim_dir,
    read_meta,
    refuse_network,
    released_on_failure,
    sandbox_path,
)
from corral.errors import (
    BackendUnavailableError,
    CorralError,
    ExecError,
    FileTooLargeError,
    InvalidStateError,
    NotFoundError,
    SandboxStartError,
    UnsupportedError,
    UserError,
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
    cpuset: str | None = None  # host CPUs QEMU may run on (a pet's pinned CPUs)

    @property
    def vm(self) -> VmSpec:
        return VmSpec.from_json(dict(self.spec))


class MicrovmBackend(Backend):
    """Sandboxes as microVMs: QEMU here (`vmm="qemu"`), Firecracker or Cloud Hypervisor
    in the `VmmBackend` subclass, which `MicrovmBackend(..., vmm=...)` gives for them."""

    name: ClassVar[str] = "microvm"
    capabilities = frozenset(
        {Capability.PAUSE, Capability.SNAPSHOT, Capability.CPUSET, Capability.VOLUME_DISK}
    )

    def __new__(cls, *args: Any, vmm: str = "qemu", **kwargs: Any) -> MicrovmBackend:
        if cls is MicrovmBackend and vmm != "qemu":
            from corral.backends.microvm.vmm_backend import VmmBackend

            return super().__new__(VmmBackend)
        return super().__new__(cls)

    def __init__(
        self,
        state_dir: Path,
        *,
        vmm: str = "qemu",
        cache_dir: Path | None = None,
        runtime: str | None = None,
        environ: Mapping[str, str] | None = None,
        warm_start: bool = False,
        vmm_settings: VmmSettings | None = None,
    ) -> None:
        """`cache_dir` (default /var/cache/corral/microvm, or $CORRAL_MICROVM_CACHE) holds
        kernels and bundles shared by every state dir. `runtime`, the container
        backends' option, has no meaning for a VM and is ignored.

        With `warm_start`, the first sandbox of each kind (bundle, limits, user)
        is booted cold and snapshotted right after boot, under
        `<state>/warm/<key>`; later ones of that kind are restored from it
        (~7x faster), their environment their own, their RNG reseeded.
        `vmm_settings` configures Firecracker / Cloud Hypervisor (see settings.py)."""
        if vmm not in VMMS:
            raise UserError(
                f"the microvm backend has no VMM '{vmm}'",
                backend=self.name,
                hint="choose one of: "
                + ", ".join(VMMS)
                + " (--vmm, or [microvm] vmm in the config)",
            )
        self._check_options(vmm, warm_start)
        del runtime
        env = os.environ if environ is None else environ
        self.environ = env
        self.vmm_settings = vmm_settings or VmmSettings()
        self.state_dir = Path(state_dir)
        self.vmm = vmm
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.snapshots_dir = self.state_dir / "snapshots"
        self.warm_dir = self.state_dir / "warm"
        self.warm_start = warm_start
        cache = cache_dir or Path(env.get("CORRAL_MICROVM_CACHE") or DEFAULT_CACHE)
        self.bundles = BundleStore(cache)
        instance = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        self.cgroup_parent = f"{CGROUP_PARENT}/{instance}"

    async def _bundle(
        self, config: SandboxConfig, host_mounts: Sequence[HostMount]
    ) -> tuple[Bundle, Path]:
        """The sandbox's bundle (built in a thread the first time) and the base of its
        scratch disk; SandboxStartError when they cannot be built."""
        image, limits = config.image, config.limits
        try:
            bundle = await asyncio.to_thread(self.bundles.bundle, image, host_mounts)
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
        return bundle, scratch

    def _check_options(self, vmm: str, warm_start: bool) -> None:
        """Refuse options this class cannot honour (the subclass: its VMMs, no warm start)."""

    # -- records -------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return sandbox_path(self.sandboxes_dir, sandbox_id, self.name)

    def _meta(self, sandbox_id: str) -> VmMeta:
        return VmMeta(**read_meta(self._dir(sandbox_id), "meta.json", sandbox_id, self.name))

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
        vm.check_socket_room(sandbox_dir, config.sandbox_id, AGENT_PORTS)
        image, limits = config.image, config.limits
        host_mounts, volume_mounts = volumes.split_mounts(config.mounts)
        volume_drives, volume_tokens = await volumes.volume_disks(
            config.sandbox_id, volume_mounts, image.uid, image.gid
        )
        bundle, scratch = await self._bundle(config, host_mounts)
        overlay = sandbox_dir / "scratch.qcow2"
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
                *volume_tokens,  # after the binds: a volume may sit under the workdir
                f"corral.pids={limits.pids} corral.ports={AGENT_PORTS}",
            ]
        )
        drives = [DriveSpec(d.serial, str(d.path), "raw", True) for d in bundle.disks]
        drives.append(DriveSpec("scratch", str(overlay), "qcow2", False))
        drives += volume_drives or [volumes.empty_slot(sandbox_dir)]
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
            cpuset=limits.cpuset,
        )
        # A pet's volume changes under a snapshot: pets always boot cold; so does
        # a sandbox re-created on its kept overlay (`recreate`).
        warm_start = self.warm_start and not volume_drives and not overlay.exists()
        warm = self.warm_dir / _warm_key(spec, meta, scratch)
        if warm_start and await snapshots.warm_start(
            self, config.sandbox_id, sandbox_dir, warm, meta.env
        ):
            return
        if not overlay.exists():  # else kept by `recreate`
            await vm.qemu_img(
                "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(scratch), str(overlay)
            )
        self._write_meta(sandbox_dir, meta)
        await self.start_vm(config.sandbox_id, meta)
        await self.wait_for_agent(config.sandbox_id, BOOT_DEADLINE)
        if warm_start:
            await snapshots.save_warm(self, config.sandbox_id, warm)

    async def start_vm(self, sandbox_id: str, meta: VmMeta, *, incoming: bool = False) -> None:
        """Start the sandbox's QEMU (daemonized, in its host cgroup)."""
        cgroup = hostcg.HostCgroup(meta.cgroup)
        cgroup.create(vcpus=meta.vcpus, memory=meta.memory_limit, cpuset=meta.cpuset)
        await vm.start_qemu(sandbox_id, self._dir(sandbox_id), meta.vm, cgroup, incoming=incoming)

    # What to look at when a VM's agent never answers (the subclass's VMMs: vsock).
    _agent_hint: ClassVar[str] = "the host may be overloaded (TCG); see the guest console"

    async def wait_for_agent(self, sandbox_id: str, deadline: float) -> None:
        """Until the guest agent answers (over `_dial`), then set the guest's clock on
        that connection; SandboxStartError (with the console) if the VM stops or the
        agent never answers."""
        sandbox_dir = self._dir(sandbox_id)
        until = time.monotonic() + deadline
        while True:
            if self._vm_pid(sandbox_id) is None:
                raise SandboxStartError(
                    f"the {self.vmm} VM stopped while booting",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                    stderr_tail=vm.tail(sandbox_dir / "console.log")
                    or vm.tail(sandbox_dir / "qemu.log"),
                    hint="see the guest console above; `corral doctor` checks the host",
                )
            try:
                conn = await self._dial(sandbox_dir, min(2.0, max(0.1, until - time.monotonic())))
            except ExecError as exc:
                if time.monotonic() >= until:
                    raise SandboxStartError(
                        f"the guest agent did not answer within {deadline:.0f}s: {exc.message}",
                        sandbox_id=sandbox_id,
                        backend=self.name,
                        stderr_tail=vm.tail(sandbox_dir / "console.log"),
                        hint=self._agent_hint,
                    ) from None
                continue
            try:
                await conn.set_clock()
            finally:
                await conn.close()
            return

    async def set_clock(self, sandbox_id: str) -> None:
        """Set the guest's wall clock to the host's (after boot and after every restore)."""
        async with self._agent(sandbox_id) as conn:
            await conn.set_clock()

    def _qemu_pid(self, sandbox_id: str) -> int | None:
        return vm.qemu_pid(self._dir(sandbox_id))

    async def destroy(self, sandbox_id: str) -> None:
        sandbox_dir = self._dir(sandbox_id)
        pid = self._qemu_pid(sandbox_id)
        if pid is not None and not (sandbox_dir / "paused").exists():
            with contextlib.suppress(NotFoundError):
                if volumes.has_volumes(self._meta(sandbox_id).vm):
                    await volumes.flush(sandbox_dir, AGENT_PORTS)
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

    async def set_cpuset(self, sandbox_id: str, cpuset: str) -> None:
        """Pin the VM's QEMU (every vCPU and I/O thread) to host CPUs `cpuset`
        through its host cgroup; the guest keeps running, its vCPU count unchanged."""
        meta = self._meta(sandbox_id)
        try:
            hostcg.HostCgroup(meta.cgroup).set_cpuset(cpuset)
        except OSError as exc:
            raise UnsupportedError(
                f"the VM could not be pinned to CPUs {cpuset}: {exc}",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="this host's cgroups have no usable cpuset controller",
            ) from exc
        self._write_meta(self._dir(sandbox_id), dataclasses.replace(meta, cpuset=cpuset))

    async def recreate(self, config: SandboxConfig) -> None:
        """Boot the sandbox again under `config` on its own scratch overlay (see attach.py)."""
        await attach.recreate_keeping_disk(self, config)

    async def attach_volume(self, sandbox_id: str, mount: HostMount) -> None:
        """Snapshot the VM and restore it with the volume in its empty disk slot,
        then mount it (see attach.py): its processes go on."""
        await attach.attach_volume(self, sandbox_id, mount)

    async def pause(self, sandbox_id: str) -> None:
        self._meta(sandbox_id)
        # The marker lets a request fail at once instead of waiting on a frozen agent.
        (self._dir(sandbox_id) / "paused").touch()
        await qmp_call(self._dir(sandbox_id) / "qmp.sock", "stop")

    async def resume(self, sandbox_id: str) -> None:
        self._meta(sandbox_id)
        await qmp_call(self._dir(sandbox_id) / "qmp.sock", "cont")
        (self._dir(sandbox_id) / "paused").unlink(missing_ok=True)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        meta = self._meta(sandbox_id)
        async with self._agent(sandbox_id) as conn:
            guest = await conn.stats()
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
            return await conn.stats()

    # -- snapshots -------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path, *, keep_running: bool = False) -> None:
        """Pause the VM and save its memory, devices and scratch overlay into `dest`.

        The sandbox is STOPPED after (its QEMU quits), or RUNNING again with
        `keep_running`. See snapshots.py for what `dest` holds.
        """
        await snapshots.snapshot(self, sandbox_id, dest, keep_running=keep_running)

    async def restore(self, sandbox_id: str, source: Path) -> None:
        """Bring `sandbox_id` up RUNNING from the snapshot in `source`: the stopped
        sandbox in place, or a new sandbox when the id is not taken. Its processes
        go on where they were; its clock is set to now."""
        await snapshots.restore(self, sandbox_id, source)

    async def fork(self, source: Path, sandbox_ids: Sequence[str]) -> None:
        """Restore several new sandboxes from one snapshot, each with its own overlay."""
        await snapshots.fork(self, source, sandbox_ids)

    # -- agent plumbing --------------------------------------------------------

    def _vm_pid(self, sandbox_id: str) -> int | None:
        """The VMM process of a live VM (QEMU here; the subclass asks its VMM)."""
        return self._qemu_pid(sandbox_id)

    async def _dial(self, sandbox_dir: Path, deadline: float) -> AgentConnection:
        """A greeted connection to the guest agent (virtio-serial ports here)."""
        return await connect(sandbox_dir, AGENT_PORTS, deadline=deadline)

    @contextlib.asynccontextmanager
    async def _agent(
        self, sandbox_id: str, deadline: float = 30.0
    ) -> AsyncIterator[AgentConnection]:
        sandbox_dir = self._dir(sandbox_id)
        if self._vm_pid(sandbox_id) is None:
            self._meta(sandbox_id)  # NotFoundError first
            raise ExecError(
                "the sandbox's VM is not running",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=vm.tail(sandbox_dir / "console.log"),
                hint="destroy it and create a new one",
            )
        if (sandbox_dir / "paused").exists():
            raise InvalidStateError(
                "the sandbox is paused",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="resume it first",
            )
        try:
            conn = await self._dial(sandbox_dir, deadline)
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
                stderr_tail=vm.tail(sandbox_dir / "console.log"),
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
        payload = encode_exec(
            request.argv,
            {**meta.env, **request.env},
            request.cwd or meta.workdir,
            meta.uid,
            meta.gid,
            request.timeout,
            request.stdin is not None,
        )
        # The agent enforces the timeout; the guard only catches a hung guest.
        guard = None if request.timeout is None else time.monotonic() + request.timeout + 30
        async with self._agent(sandbox_id) as conn:
            events = conn.exec_events(payload, request.stdin, guard)
            try:
                async for event in events:
                    yield event
            except AgentError as exc:
                raise ExecError(
                    f"the guest agent could not start the command: {exc}",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                ) from None
            except TimeoutError:
                raise ExecError(
                    "the guest agent did not end the command after its timeout",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                ) from None
            finally:
                await events.aclose()

    # -- files -----------------------------------------------------------------

    async def put_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        meta = self._meta(sandbox_id)
        async with self._agent(sandbox_id) as conn:
            try:
                await conn.put_file(path, data, mode, meta.uid, meta.gid)
            except AgentError as exc:
                raise _file_error(sandbox_id, path, exc) from None

    async def get_file(self, sandbox_id: str, path: str, max_bytes: int) -> bytes:
        meta = self._meta(sandbox_id)
        async with self._agent(sandbox_id) as conn:
            try:
                return await conn.get_file(path, max_bytes, meta.uid, meta.gid)
            except AgentError as exc:
                if exc.code == errno.EFBIG:
                    raise FileTooLargeError(
                        f"'{path}' is larger than the limit of {max_bytes} bytes",
                        sandbox_id=sandbox_id,
                        backend=self.name,
                        hint="raise the limit (--max-size) or copy a smaller file",
                    ) from None
                raise _file_error(sandbox_id, path, exc) from None


def _warm_key(spec: VmSpec, meta: VmMeta, scratch: Path) -> str:
    """What makes two freshly booted sandboxes interchangeable: the VM and its user."""
    drives = [
        dataclasses.replace(d, path=str(scratch))
        if d.serial == "scratch"
        else dataclasses.replace(d, path="")
        if volumes.is_slot(d)
        else d
        for d in spec.drives
    ]
    identity = {
        "vm": dataclasses.replace(spec, drives=tuple(drives)).to_json(),
        "user": [meta.uid, meta.gid, meta.workdir],
        "limits": [meta.memory_limit, meta.pids_limit, meta.vcpus],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _file_error(sandbox_id: str, path: str, exc: AgentError) -> NotFoundError:
    return NotFoundError(
        f"cannot access '{path}' in the sandbox ({os.strerror(exc.code)})",
        sandbox_id=sandbox_id,
        backend="microvm",
        hint="check the path exists and is writable by the sandbox user (e.g. under /work or /tmp)",
    )

"""The microvm backend under Firecracker or Cloud Hypervisor (`vmm="firecracker"` or
`"cloud-hypervisor"`; `MicrovmBackend(..., vmm=...)` gives this class for them).

The same bundle as QEMU boots (vmlinux, the initramfs with the agent, erofs
disks); the sandbox's writable disk is a raw copy of the cached scratch ext4
(reflinked where the filesystem can, sparse elsewhere) instead of a qcow2
overlay, and the guest agent listens on vsock (`corral.vsock=1024` on the
kernel command line), reached through the VMM's hybrid-vsock socket (vsock.py).
The VMM runs detached, in the sandbox's host cgroup; `vmm.json` finds it again,
so, as with QEMU, nothing of a VM lives in this Python process.

A sandbox directory holds meta.json, vmm.json, scratch.raw, the VMM's API socket
and log, vsock.sock and console.log (a link to the guest's serial console).
A snapshot directory holds vmm/ (the VMM's own files), scratch.raw and
snapshot.json; it restores only under the VMM that wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from corral.backends.base import BackendStatus, SandboxConfig
from corral.backends.microvm import hostcg, vm
from corral.backends.microvm.agent_client import AgentConnection
from corral.backends.microvm.backend import BOOT_DEADLINE, MicrovmBackend, VmMeta
from corral.backends.microvm.settings import VmmName
from corral.backends.microvm.vmm import BootSpec, DiskSpec, RestoreSpec, VmmState, VsockSpec
from corral.backends.microvm.vmm.process import MAX_SOCKET_PATH, DetachedVmmProcess, ProcessRecord
from corral.backends.microvm.vmm.settings import make_driver
from corral.backends.microvm.vmm.supervised import SupervisedDriver
from corral.backends.microvm.vsock import AGENT_VSOCK_PORT, GUEST_CID, connect_vsock
from corral.backends.sandbox_dir import claim_dir, refuse_network, released_on_failure
from corral.errors import (
    BackendUnavailableError,
    CorralError,
    InvalidStateError,
    NotFoundError,
    SandboxStartError,
    UserError,
)

__all__ = ["VmmBackend"]

OVERLAY = "scratch.raw"
VSOCK = "vsock.sock"
RECORD = "vmm.json"
SNAPSHOT_VMM = "vmm"  # the VMM's own snapshot files, inside a snapshot directory
RESTORE_DEADLINE = 60.0
_BASE_CMDLINE = (
    "console=ttyS0 quiet reboot=k panic=-1 8250.nr_uarts=1 cryptomgr.notests random.trust_cpu=on"
)
# Firecracker's guests have no PCI bus (all virtio-mmio); Cloud Hypervisor's devices are PCI.
_VMM_CMDLINE = {"firecracker": "pci=off", "cloud-hypervisor": ""}


class VmmBackend(MicrovmBackend):
    """Sandboxes as Firecracker or Cloud Hypervisor microVMs; see the module docstring."""

    _agent_hint = "see the guest console; the kernel needs virtio-vsock"

    def _check_options(self, vmm: str, warm_start: bool) -> None:
        if vmm not in _VMM_CMDLINE:
            raise UserError(
                f"VmmBackend drives firecracker or cloud-hypervisor, not '{vmm}'",
                backend=self.name,
                hint="construct MicrovmBackend(..., vmm=...) and let it choose the class",
            )
        if warm_start:
            raise UserError(
                f"warm starts are QEMU's; --vmm {vmm} has none",
                backend=self.name,
                hint="use a snapshot pool (corral pool create --snapshot) instead",
            )

    # -- pieces ------------------------------------------------------------------

    def _driver(self, sandbox_id: str) -> SupervisedDriver:
        """A detached driver for the sandbox; BackendUnavailableError if the VMM is missing."""
        return make_driver(
            cast(VmmName, self.vmm),
            self._dir(sandbox_id),
            sandbox_id=sandbox_id,
            settings=self.vmm_settings,
            environ=self.environ,
            detached=True,
        )

    def _record(self, sandbox_id: str) -> ProcessRecord | None:
        try:
            record = json.loads((self._dir(sandbox_id) / RECORD).read_text())
            return {key: int(record[key]) for key in ("pid", "session", "started")}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _vm_pid(self, sandbox_id: str) -> int | None:
        record = self._record(sandbox_id)
        if record is None:
            return None
        sandbox_dir = self._dir(sandbox_id)
        return DetachedVmmProcess.adopt(record, log_path=sandbox_dir / "vmm.log", name=self.vmm).pid

    async def _dial(self, sandbox_dir: Path, deadline: float) -> AgentConnection:
        return await connect_vsock(sandbox_dir / VSOCK, AGENT_VSOCK_PORT, deadline=deadline)

    @contextlib.asynccontextmanager
    async def _attached(self, sandbox_id: str) -> AsyncIterator[SupervisedDriver]:
        """The sandbox's running VMM, asked its state; InvalidStateError when it is gone."""
        record = self._record(sandbox_id)
        driver = self._driver(sandbox_id)
        if record is not None:
            try:
                await driver.attach(record)
            except BaseException:
                await driver.close()
                raise
        if record is None or driver.state is VmmState.STOPPED:
            await driver.close()
            raise InvalidStateError(
                f"the sandbox's {self.vmm} VM is not running",
                sandbox_id=sandbox_id,
                backend=self.name,
                stderr_tail=vm.tail(self._dir(sandbox_id) / "console.log") or None,
                hint="destroy it, or restore it from a snapshot",
            )
        try:
            yield driver
        finally:
            await driver.close()

    async def _start(self, sandbox_id: str, meta: VmMeta) -> SupervisedDriver:
        """Start the VMM detached in the sandbox's host cgroup and record it (vmm.json)."""
        sandbox_dir = self._dir(sandbox_id)
        for stale in (RECORD, VSOCK, "paused", "console.log"):
            (sandbox_dir / stale).unlink(missing_ok=True)
        cgroup = hostcg.HostCgroup(meta.cgroup)
        cgroup.create(vcpus=meta.vcpus, memory=meta.memory_limit)
        driver = self._driver(sandbox_id)
        await driver.start()
        temp = sandbox_dir / f".{RECORD}.new"
        temp.write_text(json.dumps(driver.record()))
        temp.rename(sandbox_dir / RECORD)
        pid = driver.pid
        if pid is not None:  # its vCPU threads and (simulated) guest start after this
            for procs in cgroup.procs_files():
                with contextlib.suppress(OSError):
                    Path(procs).write_text(str(pid))
        console = "serial.log" if self.vmm == "cloud-hypervisor" else f"{self.vmm}.log"
        (sandbox_dir / "console.log").symlink_to(console)
        return driver

    # -- lifecycle ---------------------------------------------------------------

    async def create(self, config: SandboxConfig) -> None:
        refuse_network(config, self.name, "microVMs have no network yet: use network='none'")
        self._driver(config.sandbox_id)  # BackendUnavailableError before anything is made
        sandbox_dir = claim_dir(self.sandboxes_dir, config.sandbox_id, self.name)
        await released_on_failure(
            self._create(config, sandbox_dir), self.destroy, config.sandbox_id
        )

    async def _create(self, config: SandboxConfig, sandbox_dir: Path) -> None:
        _check_socket_room(sandbox_dir, config.sandbox_id)
        image, limits = config.image, config.limits
        bundle, scratch = await self._bundle(config, config.mounts)
        overlay = sandbox_dir / OVERLAY
        await copy_disk(scratch, overlay, config.sandbox_id)
        root, *host_disks = bundle.disks
        # The guest sees the disks in attach order: root (vda), scratch (vdb), host mounts.
        mounts = [f"corral.mount=/dev/vda:{root.fstype}:/:ro"]
        mounts += [
            f"corral.mount=/dev/vd{chr(ord('c') + index)}:{disk.fstype}:{disk.target}:ro"
            for index, disk in enumerate(host_disks)
        ]
        mounts.append("corral.mount=/dev/vdb:ext4:/.corral:rw")
        binds = [
            "corral.bind=/.corral/tmp:/tmp",
            f"corral.bind=/.corral/home:{image.home}",
            f"corral.bind=/.corral/work:{image.workdir}",
        ]
        cmdline = " ".join(
            part
            for part in (
                _BASE_CMDLINE,
                _VMM_CMDLINE[self.vmm],
                *mounts,
                *binds,
                f"corral.pids={limits.pids} corral.vsock={AGENT_VSOCK_PORT}",
            )
            if part
        )
        boot = BootSpec(
            kernel=bundle.kernel,
            initrd=bundle.initramfs,
            rootfs=root.path,
            overlay=overlay,
            cmdline=cmdline,
            vcpus=max(1, math.ceil(limits.vcpus)),
            memory_mib=max(64, limits.memory >> 20),
            vsock=VsockSpec(GUEST_CID, sandbox_dir / VSOCK),
            extra_disks=tuple(DiskSpec(d.serial, d.path, read_only=True) for d in host_disks),
        )
        meta = VmMeta(
            spec={"vmm": self.vmm, "boot": _boot_to_json(boot)},
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
        driver = await self._start(config.sandbox_id, meta)
        try:
            await driver.configure(boot)
            await driver.boot()
        finally:
            await driver.close()
        await self.wait_for_agent(config.sandbox_id, BOOT_DEADLINE)

    async def start_vm(self, sandbox_id: str, meta: VmMeta, *, incoming: bool = False) -> None:
        raise UserError(
            f"start_vm is QEMU's; a {self.vmm} VM starts in create() or restore()",
            sandbox_id=sandbox_id,
            backend=self.name,
        )

    async def destroy(self, sandbox_id: str) -> None:
        sandbox_dir = self._dir(sandbox_id)
        record = self._record(sandbox_id)
        if record is not None:
            try:
                driver = self._driver(sandbox_id)
            except BackendUnavailableError:  # the binary went away: the process can still go
                process = DetachedVmmProcess.adopt(
                    record, log_path=sandbox_dir / "vmm.log", name=self.vmm
                )
                await process.stop(grace=0)
            else:
                await driver.attach(record, ask=False)
                await driver.kill()  # also the jail, staged links, sockets
        from corral.backends.oci.backend import release_cgroup

        await release_cgroup(f"{self.cgroup_parent}/{sandbox_id}")
        shutil.rmtree(sandbox_dir, ignore_errors=True)

    async def status(self, sandbox_id: str) -> BackendStatus:
        try:
            self._meta(sandbox_id)
        except NotFoundError:
            return BackendStatus.MISSING
        record = self._record(sandbox_id)
        if record is None or self._vm_pid(sandbox_id) is None:
            return BackendStatus.STOPPED
        driver = self._driver(sandbox_id)
        try:
            await driver.attach(record)
        except CorralError:  # alive but not answering: it still holds the VM
            return BackendStatus.RUNNING
        finally:
            await driver.close()
        if driver.state is VmmState.RUNNING:
            return BackendStatus.RUNNING
        if driver.state is VmmState.PAUSED:
            return BackendStatus.PAUSED
        return BackendStatus.STOPPED

    async def pause(self, sandbox_id: str) -> None:
        self._meta(sandbox_id)
        marker = self._dir(sandbox_id) / "paused"
        async with self._attached(sandbox_id) as driver:
            marker.touch()  # requests fail at once instead of waiting on a frozen agent
            try:
                await driver.pause()
            except BaseException:
                marker.unlink(missing_ok=True)
                raise

    async def resume(self, sandbox_id: str) -> None:
        self._meta(sandbox_id)
        async with self._attached(sandbox_id) as driver:
            await driver.resume()
        (self._dir(sandbox_id) / "paused").unlink(missing_ok=True)

    # -- snapshots -----------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path, *, keep_running: bool = False) -> None:
        """Pause the VM, have the VMM write its state and memory into `dest/vmm`, copy the
        scratch disk beside it. STOPPED after (the VMM is ended), or as it was with
        `keep_running` (a sandbox the user paused stays paused)."""
        meta = self._meta(sandbox_id)
        sandbox_dir = self._dir(sandbox_id)
        dest = Path(dest)
        async with self._attached(sandbox_id) as driver:
            was_paused = driver.state is VmmState.PAUSED
            if not was_paused:
                await driver.pause()
            try:
                dest.mkdir(parents=True, exist_ok=True)
                await driver.snapshot(dest / SNAPSHOT_VMM)
                # Paused, the VMM has written every block the guest sent: the disk is whole.
                await copy_disk(sandbox_dir / OVERLAY, dest / OVERLAY, sandbox_id)
                record = {"vmm": self.vmm, "meta": dataclasses.asdict(meta)}
                (dest / "snapshot.json").write_text(json.dumps(record, indent=2))
            except BaseException:
                if not was_paused:
                    with contextlib.suppress(CorralError):
                        await driver.resume()
                raise
            if not keep_running:
                await driver.kill()
                (sandbox_dir / "paused").unlink(missing_ok=True)
            elif not was_paused:
                await driver.resume()

    async def restore(self, sandbox_id: str, source: Path) -> None:
        """Bring `sandbox_id` up RUNNING from the snapshot in `source`: the stopped sandbox
        in place, or a new sandbox when the id is not taken; its clock is set to now."""
        source = Path(source)
        try:
            record = json.loads((source / "snapshot.json").read_text())
            saved = VmMeta(**record["meta"])
            taken_by = str(record["vmm"])
        except (OSError, ValueError, KeyError, TypeError):
            raise NotFoundError(
                f"no {self.vmm} snapshot at {source}",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="pass the directory snapshot() wrote",
            ) from None
        if taken_by != self.vmm:
            raise UserError(
                f"the snapshot at {source} was taken under {taken_by}, not {self.vmm}",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint=f"restore it with --vmm {taken_by}",
            )
        sandbox_dir = self._dir(sandbox_id)
        if sandbox_dir.is_dir():
            if await self.status(sandbox_id) is not BackendStatus.STOPPED:
                raise InvalidStateError(
                    "only a stopped sandbox can be restored in place",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                    hint="snapshot() stops it; or restore into a new sandbox id",
                )
            await self._restore(sandbox_id, source, saved)
            return
        claim_dir(self.sandboxes_dir, sandbox_id, self.name)
        await released_on_failure(
            self._restore(sandbox_id, source, saved), self.destroy, sandbox_id
        )

    async def _restore(self, sandbox_id: str, source: Path, saved: VmMeta) -> None:
        sandbox_dir = self._dir(sandbox_id)
        _check_socket_room(sandbox_dir, sandbox_id)
        overlay = sandbox_dir / OVERLAY
        await copy_disk(source / OVERLAY, overlay, sandbox_id)
        boot = dataclasses.replace(
            _boot_from_json(saved.spec["boot"]),
            overlay=overlay,
            vsock=VsockSpec(GUEST_CID, sandbox_dir / VSOCK),
        )
        for disk in boot.disks():
            if not disk.path.exists():
                raise SandboxStartError(
                    f"the snapshot's disk {disk.path} is gone",
                    sandbox_id=sandbox_id,
                    backend=self.name,
                    hint="the microVM cache was cleared: take a new snapshot",
                )
        meta = dataclasses.replace(
            saved,
            spec={"vmm": self.vmm, "boot": _boot_to_json(boot)},
            cgroup=f"{self.cgroup_parent}/{sandbox_id}",
            restored_from=str(source),
        )
        self._write_meta(sandbox_dir, meta)
        driver = await self._start(sandbox_id, meta)
        spec = RestoreSpec(
            source / SNAPSHOT_VMM, disks=boot.disks(), vsock_uds=sandbox_dir / VSOCK, resume=True
        )
        try:
            await driver.restore(spec)
        finally:
            await driver.close()
        await self.wait_for_agent(sandbox_id, RESTORE_DEADLINE)  # and sets the clock

    async def fork(self, source: Path, sandbox_ids: Sequence[str]) -> None:
        """Restore several new sandboxes from one snapshot; on any failure none is left."""
        results = await asyncio.gather(
            *(self.restore(sid, source) for sid in sandbox_ids), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for sid in sandbox_ids:
                await self.destroy(sid)
            raise failures[0]


async def copy_disk(source: Path, target: Path, sandbox_id: str) -> None:
    """A private copy of a raw disk: reflinked where the filesystem can, else sparse."""
    proc = await asyncio.create_subprocess_exec(
        *("cp", "--reflink=auto", "--sparse=always", str(source), str(target)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise SandboxStartError(
            f"cannot copy the disk {source} for the sandbox (cp exit {proc.returncode})",
            sandbox_id=sandbox_id,
            backend="microvm",
            stderr_tail=err.decode(errors="replace")[-800:],
            hint="check free space in the state directory",
        )


def _check_socket_room(sandbox_dir: Path, sandbox_id: str) -> None:
    longest = sandbox_dir / "cloud-hypervisor.sock"
    if len(str(longest)) > MAX_SOCKET_PATH:
        raise SandboxStartError(
            f"the sandbox directory {sandbox_dir} is too long for unix sockets",
            sandbox_id=sandbox_id,
            backend="microvm",
            hint="use a shorter state directory or sandbox id",
        )


def _boot_to_json(boot: BootSpec) -> dict[str, Any]:
    data = dataclasses.asdict(boot)
    data["extra_disks"] = [{**disk, "path": str(disk["path"])} for disk in data.pop("extra_disks")]
    data["vsock"] = None if boot.vsock is None else str(boot.vsock.uds_path)
    for key in ("kernel", "initrd", "rootfs", "overlay"):
        data[key] = None if data[key] is None else str(data[key])
    return data


def _boot_from_json(data: Mapping[str, Any]) -> BootSpec:
    fields = dict(data)
    extra = tuple(
        DiskSpec(d["drive_id"], Path(d["path"]), d["read_only"], d.get("serial"))
        for d in fields.pop("extra_disks")
    )
    vsock = fields.pop("vsock")
    for key in ("kernel", "rootfs", "overlay"):
        fields[key] = Path(fields[key])
    fields["initrd"] = None if fields["initrd"] is None else Path(fields["initrd"])
    return BootSpec(
        **fields,
        extra_disks=extra,
        vsock=None if vsock is None else VsockSpec(GUEST_CID, Path(vsock)),
    )

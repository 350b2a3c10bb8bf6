"""Firecracker driver: the REST API of firecracker.yaml (Swagger 2.0) over the VMM's unix socket.

Firecracker is configured piece by piece before `InstanceStart` and refuses
configuration after it; snapshots are made while paused and loaded only into a
fresh process ("Only accepted on a fresh Firecracker process", spec
/snapshot/load). Per-sandbox files are staged into the VMM's working directory
(the jail's chroot when the jailer is used) under fixed names and referred to
by those names, so a snapshot taken in one sandbox loads in another with that
sandbox's own overlay: the same names resolve to the new sandbox's files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import httpx

from corral.backends.microvm.vmm.base import BootSpec, RestoreSpec, VmmInfo, VmmState
from corral.backends.microvm.vmm.process import resolve_binary
from corral.backends.microvm.vmm.supervised import SupervisedDriver
from corral.errors import InvalidStateError, SandboxStartError, UserError

__all__ = ["FirecrackerDriver", "JailerConfig"]

SNAPSHOT_STATE = "vmstate"
SNAPSHOT_MEMORY = "memory"
_JAIL_API_SOCKET = "/api.socket"
_JAIL_VSOCK = "vsock.sock"
# Faults Firecracker gives when the VM's state, not the input, is wrong.
_STATE_FAULT = re.compile(
    r"not supported (before|after) starting|not allowed after configuring|"
    r"not paused|not running|invalid state",
    re.IGNORECASE,
)
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_INSTANCE_STATES = {"Running": VmmState.RUNNING, "Paused": VmmState.PAUSED}


@dataclass(frozen=True, slots=True)
class JailerConfig:
    """Run Firecracker under its jailer (chroot, uid/gid drop, cgroups, optional netns)."""

    uid: int
    gid: int
    chroot_base: Path = Path("/srv/jailer")
    binary: str | Path | None = None  # default: `jailer` on PATH
    netns: Path | None = None
    cgroup_version: int = 1
    extra_args: tuple[str, ...] = ()


class FirecrackerDriver(SupervisedDriver):
    """One Firecracker microVM, optionally jailed."""

    name: ClassVar[str] = "firecracker"

    def __init__(
        self,
        run_dir: Path,
        *,
        binary: str | Path | None = None,
        jailer: JailerConfig | None = None,
        sandbox_id: str | None = None,
        environ: Mapping[str, str] | None = None,
        api_timeout: float = 30.0,
        start_timeout: float = 10.0,
        detached: bool = False,
    ) -> None:
        super().__init__(
            run_dir,
            binary=resolve_binary(binary, "firecracker", environ=environ),
            sandbox_id=sandbox_id,
            api_timeout=api_timeout,
            start_timeout=start_timeout,
            detached=detached,
        )
        self.jailer = jailer
        self.jail_id = sandbox_id or run_dir.name
        self._jailer_binary: Path | None = None
        if jailer is not None:
            self._jailer_binary = resolve_binary(jailer.binary, "jailer", environ=environ)
            if not _JAIL_ID.match(self.jail_id):
                raise UserError(
                    f"jailer ids are 1-64 letters, digits and '-': {self.jail_id!r}",
                    hint="use a sandbox id made of those characters",
                )
        self._vsock_link: Path | None = None
        self._vsock_uds: Path | None = None

    # -- where things are ---------------------------------------------------------

    @property
    def jail_dir(self) -> Path | None:
        """`<chroot_base>/<exec file name>/<id>`, which the jailer creates; None when unjailed."""
        if self.jailer is None:
            return None
        return self.jailer.chroot_base / self.binary.name / self.jail_id

    @property
    def workdir(self) -> Path:
        """Where staged files live: the jail's root, else the run directory (the VMM's cwd)."""
        jail = self.jail_dir
        return self.run_dir if jail is None else jail / "root"

    @property
    def api_socket(self) -> Path:
        if self.jailer is None:
            return self.run_dir / "firecracker.sock"
        return self.workdir / _JAIL_API_SOCKET.lstrip("/")

    def _argv(self) -> list[str]:
        if self.jailer is None:
            return [str(self.binary), "--api-sock", str(self.api_socket), "--id", self.jail_id]
        jail = self.jailer
        assert self._jailer_binary is not None
        argv = [
            str(self._jailer_binary),
            "--id",
            self.jail_id,
            "--exec-file",
            str(self.binary),
            "--uid",
            str(jail.uid),
            "--gid",
            str(jail.gid),
            "--chroot-base-dir",
            str(jail.chroot_base),
            "--cgroup-version",
            str(jail.cgroup_version),
        ]
        if jail.netns is not None:
            argv += ["--netns", str(jail.netns)]
        return [*argv, *jail.extra_args, "--", "--api-sock", _JAIL_API_SOCKET]

    def _cwd(self) -> Path | None:
        # Staged files are sent as names relative to the cwd (unjailed) or the chroot (jailed).
        return self.run_dir if self.jailer is None else None

    def _stage(self, name: str, source: Path, *, writable: bool) -> str:
        """Put `source` in the VMM's working directory as `name`; returns the path to send.

        Unjailed, a symlink named `name` in the cwd (sent as the relative name);
        jailed, a hard link in the chroot (sent as `/name`), copied if the
        chroot is on another filesystem and the file is read-only.
        """
        target = self.workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if self.jailer is None:
            target.symlink_to(source.resolve())
            return name
        try:
            os.link(source, target)
        except OSError as exc:
            if writable:
                raise SandboxStartError(
                    f"cannot link {source} into the jail at {target}: {exc.strerror}",
                    sandbox_id=self.sandbox_id,
                    backend="microvm",
                    hint="keep the Corral state dir and the jailer chroot base on one filesystem",
                ) from exc
            shutil.copyfile(source, target)
        if writable:
            os.chown(target, self.jailer.uid, self.jailer.gid)
        return "/" + name

    async def _staging_failed(self, exc: BaseException) -> NoReturn:
        """Release, and report a file that could not be staged as a start error."""
        await self._release(grace=0)
        if isinstance(exc, OSError):
            raise SandboxStartError(
                f"cannot stage {exc.filename or 'a file'} for {self.name}: {exc.strerror}",
                sandbox_id=self.sandbox_id,
                backend="microvm",
                hint="check that the bundle and the sandbox's overlay exist and are readable",
            ) from exc
        raise exc

    # -- the API ------------------------------------------------------------------

    async def _probe(self, client: httpx.AsyncClient) -> bool:
        try:
            return (await client.get("/")).status_code == 200
        except httpx.TransportError:
            return False

    def _fault_text(self, response: httpx.Response) -> str:
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
                return str(body["fault_message"])
        return response.text.strip() or f"HTTP {response.status_code}"

    def _classify(self, response: httpx.Response, text: str) -> type[UserError] | None:
        # Firecracker answers 400 to bad input and to a wrong state alike; its words differ.
        if response.status_code == 400 and _STATE_FAULT.search(text):
            return InvalidStateError
        return None

    async def _put(self, path: str, body: dict[str, Any], *, verb: str, starting: bool) -> None:
        await self._call("PUT", path, body, verb=verb, starting=starting)

    async def configure(self, boot: BootSpec) -> None:
        self._require("configure", VmmState.STARTED)
        try:
            kernel = self._stage("vmlinux", boot.kernel, writable=False)
            initrd = (
                None if boot.initrd is None else self._stage("initrd", boot.initrd, writable=False)
            )
            disks = [
                (d, self._stage(f"disk-{d.drive_id}", d.path, writable=not d.read_only))
                for d in boot.disks()
            ]
        except BaseException as exc:
            await self._staging_failed(exc)
        verb = "configure"
        await self._put(
            "/machine-config",
            {"vcpu_count": boot.vcpus, "mem_size_mib": boot.memory_mib, "smt": False},
            verb=verb,
            starting=True,
        )
        source: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot.cmdline}
        if initrd is not None:
            source["initrd_path"] = initrd
        await self._put("/boot-source", source, verb=verb, starting=True)
        for disk, path in disks:
            await self._put(
                f"/drives/{disk.drive_id}",
                {
                    "drive_id": disk.drive_id,
                    "path_on_host": path,
                    # Without an initramfs the kernel mounts the base disk as /.
                    "is_root_device": boot.initrd is None and disk.drive_id == "rootfs",
                    "is_read_only": disk.read_only,
                },
                verb=verb,
                starting=True,
            )
        if boot.tap is not None:
            iface: dict[str, Any] = {"iface_id": "eth0", "host_dev_name": boot.tap}
            if boot.guest_mac is not None:
                iface["guest_mac"] = boot.guest_mac
            await self._put("/network-interfaces/eth0", iface, verb=verb, starting=True)
        if boot.vsock is not None:
            uds = self._vsock_path(boot.vsock.uds_path)
            await self._put(
                "/vsock",
                {"guest_cid": boot.vsock.guest_cid, "uds_path": uds},
                verb=verb,
                starting=True,
            )
        self._state = VmmState.CONFIGURED

    def _vsock_path(self, host_path: Path) -> str:
        """The vsock path to send; jailed, the socket lives in the chroot, linked from outside."""
        self._vsock_uds = host_path
        if self.jailer is None:
            return str(host_path)
        host_path.unlink(missing_ok=True)
        host_path.symlink_to(self.workdir / _JAIL_VSOCK)
        self._vsock_link = host_path
        return "/" + _JAIL_VSOCK

    async def boot(self) -> None:
        self._require("boot", VmmState.CONFIGURED)
        await self._put("/actions", {"action_type": "InstanceStart"}, verb="boot", starting=True)
        self._state = VmmState.RUNNING

    async def pause(self) -> None:
        self._require("pause", VmmState.RUNNING)
        await self._call("PATCH", "/vm", {"state": "Paused"}, verb="pause")
        self._state = VmmState.PAUSED

    async def resume(self) -> None:
        self._require("resume", VmmState.PAUSED)
        await self._call("PATCH", "/vm", {"state": "Resumed"}, verb="resume")
        self._state = VmmState.RUNNING

    async def snapshot(self, directory: Path) -> None:
        self._require("snapshot", VmmState.PAUSED)
        directory.mkdir(parents=True, exist_ok=True)
        if self.jailer is None:
            state, memory = str(directory / SNAPSHOT_STATE), str(directory / SNAPSHOT_MEMORY)
        else:
            inside = self.workdir / "snapshot"
            inside.mkdir(exist_ok=True)
            os.chown(inside, self.jailer.uid, self.jailer.gid)
            state, memory = f"/snapshot/{SNAPSHOT_STATE}", f"/snapshot/{SNAPSHOT_MEMORY}"
        body = {"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory}
        await self._put("/snapshot/create", body, verb="snapshot", starting=False)
        if self.jailer is not None:
            for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
                shutil.move(self.workdir / "snapshot" / name, directory / name)

    async def restore(self, spec: RestoreSpec) -> None:
        self._require("restore", VmmState.STARTED)
        try:
            # Drives are reopened by the names they were staged under at boot.
            for disk in spec.disks:
                self._stage(f"disk-{disk.drive_id}", disk.path, writable=not disk.read_only)
            if self.jailer is None:
                state = str(spec.directory / SNAPSHOT_STATE)
                memory = str(spec.directory / SNAPSHOT_MEMORY)
            else:
                state = self._stage(
                    f"snapshot/{SNAPSHOT_STATE}", spec.directory / SNAPSHOT_STATE, writable=False
                )
                memory = self._stage(
                    f"snapshot/{SNAPSHOT_MEMORY}", spec.directory / SNAPSHOT_MEMORY, writable=False
                )
        except BaseException as exc:
            await self._staging_failed(exc)
        body: dict[str, Any] = {
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": memory},
            "resume_vm": spec.resume,
        }
        if spec.vsock_uds is not None:
            body["vsock_override"] = {"uds_path": self._vsock_path(spec.vsock_uds)}
        if spec.tap is not None:
            body["network_overrides"] = [{"iface_id": "eth0", "host_dev_name": spec.tap}]
        await self._put("/snapshot/load", body, verb="restore", starting=True)
        self._state = VmmState.RUNNING if spec.resume else VmmState.PAUSED

    async def info(self) -> VmmInfo:
        response = await self._call("GET", "/", verb="describe the instance")
        body = response.json()
        vmm_state = str(body["state"])
        state = _INSTANCE_STATES.get(vmm_state, self._state)
        return VmmInfo(state=state, vmm_state=vmm_state, version=body.get("vmm_version"))

    async def shutdown(self, *, grace: float = 5.0) -> None:
        """Ctrl-Alt-Del a running guest (it reboots, and `reboot=k` makes Firecracker exit).

        Firecracker has no power-off call on its API; a paused or unbooted VM,
        or one that does not exit within `grace`, is killed.
        """
        if self._state is VmmState.RUNNING and self._process is not None:
            with contextlib.suppress(Exception):
                await self._call(
                    "PUT", "/actions", {"action_type": "SendCtrlAltDel"}, verb="shut down"
                )
                await self._process.wait_exit(grace)
        await self._release(grace=min(grace, 1.0))

    def _release_extra(self) -> None:
        for path in (self._vsock_link, self._vsock_uds):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        if self.jailer is None:
            for entry in self.run_dir.glob("disk-*"):
                with contextlib.suppress(OSError):
                    entry.unlink()
            for name in ("vmlinux", "initrd"):
                with contextlib.suppress(OSError):
                    (self.run_dir / name).unlink(missing_ok=True)
            return
        jail = self.jail_dir
        if jail is not None:
            shutil.rmtree(jail, ignore_errors=True)
        # The jailer's per-VM cgroups (v1: one per controller; v2: one) under "firecracker".
        for cgroup in Path("/sys/fs/cgroup").glob(f"*/{self.binary.name}/{self.jail_id}"):
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        with contextlib.suppress(OSError):
            (Path("/sys/fs/cgroup") / self.binary.name / self.jail_id).rmdir()

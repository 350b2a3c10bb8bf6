"""Cloud Hypervisor driver: cloud-hypervisor.yaml's REST API (OpenAPI 3.0) over its unix socket.

The whole VM is defined in one `vm.create`, booted with `vm.boot`, and can be
resized and given disks while it runs. Snapshots are taken of a paused VM and
restored into a VMM with no VM yet; a restored VM comes up paused
(docs/snapshot_restore.md upstream). A snapshot directory holds `config.json`
(the VM config, paths included), `state.json` and `memory-ranges`; to restore
into another sandbox the driver writes a copy of `config.json` naming that
sandbox's disks and vsock socket, beside links to the other files.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx

from corral.backends.microvm.vmm.base import BootSpec, DiskSpec, RestoreSpec, VmmInfo, VmmState
from corral.backends.microvm.vmm.process import resolve_binary
from corral.backends.microvm.vmm.supervised import SupervisedDriver
from corral.errors import ConflictError, InvalidStateError, SandboxStartError, UserError

__all__ = ["CloudHypervisorDriver"]

API = "/api/v1"
SNAPSHOT_CONFIG = "config.json"
# Cloud Hypervisor answers most wrong-state calls with 500 and the error's name in the body
# (upstream issues #7774, #8678); the spec's 404/405 are used for some of them.
_STATE_FAULT = re.compile(
    r"not (created|running|paused|booted)|already (created|running|paused|booted)|"
    r"invalid state|VmNot|VmAlready",
    re.IGNORECASE,
)
_VM_STATES = {
    "Created": VmmState.CONFIGURED,
    "Running": VmmState.RUNNING,
    "Paused": VmmState.PAUSED,
    "Shutdown": VmmState.STOPPED,
}


class CloudHypervisorDriver(SupervisedDriver):
    """One Cloud Hypervisor VM; `max_vcpus` and `hotplug_memory_mib` bound `resize()`."""

    name: ClassVar[str] = "cloud-hypervisor"
    supports_resize: ClassVar[bool] = True
    supports_add_disk: ClassVar[bool] = True

    def __init__(
        self,
        run_dir: Path,
        *,
        binary: str | Path | None = None,
        sandbox_id: str | None = None,
        max_vcpus: int | None = None,
        hotplug_memory_mib: int = 0,
        environ: Mapping[str, str] | None = None,
        api_timeout: float = 30.0,
        start_timeout: float = 10.0,
        detached: bool = False,
    ) -> None:
        super().__init__(
            run_dir,
            binary=resolve_binary(binary, "cloud-hypervisor", environ=environ),
            sandbox_id=sandbox_id,
            api_timeout=api_timeout,
            start_timeout=start_timeout,
            detached=detached,
        )
        self.max_vcpus = max_vcpus
        self.hotplug_memory_mib = hotplug_memory_mib
        self._vsock_uds: Path | None = None
        self._vm_config: dict[str, Any] = {}  # what the VM was made from (bounds resize)

    @property
    def api_socket(self) -> Path:
        return self.run_dir / "cloud-hypervisor.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    def _argv(self) -> list[str]:
        return [str(self.binary), "--api-socket", f"path={self.api_socket}"]

    async def _probe(self, client: httpx.AsyncClient) -> bool:
        try:
            return (await client.get(f"{API}/vmm.ping")).status_code == 200
        except httpx.TransportError:
            return False

    def _fault_text(self, response: httpx.Response) -> str:
        text = response.text.strip()
        with contextlib.suppress(ValueError):
            body = json.loads(text)
            if isinstance(body, str):
                text = body
        return text or f"HTTP {response.status_code}"

    def _classify(self, response: httpx.Response, text: str) -> type[UserError] | None:
        status = response.status_code
        if status == 409:
            return ConflictError
        if status == 400:  # "the configuration is not valid" (spec)
            return UserError
        if status in (404, 405, 429) or (status == 500 and _STATE_FAULT.search(text)):
            return InvalidStateError
        return None

    async def _put(
        self, action: str, body: Any = None, *, verb: str, starting: bool = False
    ) -> httpx.Response:
        return await self._call("PUT", f"{API}/{action}", body, verb=verb, starting=starting)

    def vm_config(self, boot: BootSpec) -> dict[str, Any]:
        """The `VmConfig` body of vm.create for `boot`."""
        payload: dict[str, Any] = {"kernel": str(boot.kernel), "cmdline": boot.cmdline}
        if boot.initrd is not None:
            payload["initramfs"] = str(boot.initrd)
        memory: dict[str, Any] = {"size": boot.memory_mib << 20}
        if self.hotplug_memory_mib:
            memory["hotplug_size"] = self.hotplug_memory_mib << 20
        config: dict[str, Any] = {
            "cpus": {"boot_vcpus": boot.vcpus, "max_vcpus": max(boot.vcpus, self.max_vcpus or 0)},
            "memory": memory,
            "payload": payload,
            "disks": [_disk(d) for d in boot.disks()],
            "serial": {"mode": "File", "file": str(self.serial_log)},
            "console": {"mode": "Off"},
        }
        if boot.tap is not None:
            net: dict[str, Any] = {"id": "eth0", "tap": boot.tap}
            if boot.guest_mac is not None:
                net["mac"] = boot.guest_mac
            config["net"] = [net]
        if boot.vsock is not None:
            self._vsock_uds = boot.vsock.uds_path
            config["vsock"] = {"cid": boot.vsock.guest_cid, "socket": str(boot.vsock.uds_path)}
        return config

    async def configure(self, boot: BootSpec) -> None:
        self._require("configure", VmmState.STARTED)
        config = self.vm_config(boot)
        await self._put("vm.create", config, verb="configure", starting=True)
        self._vm_config = config
        self._state = VmmState.CONFIGURED

    async def boot(self) -> None:
        self._require("boot", VmmState.CONFIGURED)
        await self._put("vm.boot", verb="boot", starting=True)
        self._state = VmmState.RUNNING

    async def pause(self) -> None:
        self._require("pause", VmmState.RUNNING)
        await self._put("vm.pause", verb="pause")
        self._state = VmmState.PAUSED

    async def resume(self) -> None:
        self._require("resume", VmmState.PAUSED)
        await self._put("vm.resume", verb="resume")
        self._state = VmmState.RUNNING

    async def snapshot(self, directory: Path) -> None:
        self._require("snapshot", VmmState.PAUSED)
        directory.mkdir(parents=True, exist_ok=True)
        url = directory.resolve().as_uri()
        await self._put("vm.snapshot", {"destination_url": url}, verb="snapshot")

    async def restore(self, spec: RestoreSpec) -> None:
        self._require("restore", VmmState.STARTED)
        try:
            source = self._restore_dir(spec)
        except (OSError, ValueError) as exc:
            await self._release(grace=0)
            raise SandboxStartError(
                f"cannot prepare snapshot {spec.directory} for restore: {exc}",
                sandbox_id=self.sandbox_id,
                backend="microvm",
                hint="restore from a directory written by snapshot() with --vmm cloud-hypervisor",
            ) from exc
        body = {"source_url": source.resolve().as_uri(), "resume": spec.resume}
        await self._put("vm.restore", body, verb="restore", starting=True)
        self._state = VmmState.RUNNING if spec.resume else VmmState.PAUSED

    def _restore_dir(self, spec: RestoreSpec) -> Path:
        """A snapshot directory for this sandbox: links to the snapshot, its own config.json."""
        config = json.loads((spec.directory / SNAPSHOT_CONFIG).read_text())
        replaced = {d.drive_id: d for d in spec.disks}
        for disk in config.get("disks") or []:
            new = replaced.pop(disk.get("id"), None)
            if new is not None:
                disk["path"] = str(new.path)
                disk["readonly"] = new.read_only
        if replaced:
            raise ValueError(f"the snapshot has no disks {sorted(replaced)}")
        if spec.vsock_uds is not None:
            if not config.get("vsock"):
                raise ValueError("the snapshot has no vsock device")
            config["vsock"]["socket"] = str(spec.vsock_uds)
        if config.get("vsock"):
            self._vsock_uds = Path(config["vsock"]["socket"])  # ours to remove on release
        if spec.tap is not None:
            nets = [n for n in config.get("net") or [] if n.get("id") == "eth0"]
            if not nets:
                raise ValueError("the snapshot has no network interface eth0")
            nets[0]["tap"] = spec.tap
        if config.get("serial", {}).get("mode") == "File":
            config["serial"]["file"] = str(self.serial_log)
        target = self.run_dir / "restore"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for entry in spec.directory.iterdir():
            if entry.name != SNAPSHOT_CONFIG:
                (target / entry.name).symlink_to(entry.resolve())
        (target / SNAPSHOT_CONFIG).write_text(json.dumps(config))
        self._vm_config = config
        return target

    async def resize(self, *, vcpus: int | None = None, memory_mib: int | None = None) -> None:
        self._require("resize", VmmState.RUNNING)
        cpus = self._vm_config.get("cpus") or {"boot_vcpus": 1, "max_vcpus": 1}
        memory = self._vm_config.get("memory") or {"size": 512 << 20}
        body: dict[str, Any] = {}
        if vcpus is not None:
            most = int(cpus["max_vcpus"])
            if not 1 <= vcpus <= most:
                raise UserError(
                    f"cannot resize to {vcpus} vCPUs: this VM was created for 1 to {most}",
                    sandbox_id=self.sandbox_id,
                    backend="microvm",
                    hint="raise max_vcpus in the microvm cloud-hypervisor settings",
                )
            body["desired_vcpus"] = vcpus
        if memory_mib is not None:
            least = int(memory["size"]) >> 20
            most = least + (int(memory.get("hotplug_size", 0)) >> 20)
            if not least <= memory_mib <= most:
                raise UserError(
                    f"cannot resize to {memory_mib} MiB: this VM was created for "
                    f"{least} to {most} MiB",
                    sandbox_id=self.sandbox_id,
                    backend="microvm",
                    hint="raise hotplug_memory_mib in the microvm cloud-hypervisor settings",
                )
            body["desired_ram"] = memory_mib << 20
        if not body:
            return
        await self._put("vm.resize", body, verb="resize")

    async def add_disk(self, disk: DiskSpec) -> None:
        self._require("add a disk", VmmState.RUNNING)
        await self._put("vm.add-disk", _disk(disk), verb="add a disk")

    async def info(self) -> VmmInfo:
        ping = (await self._call("GET", f"{API}/vmm.ping", verb="ping")).json()
        version = ping.get("version")
        assert self._client is not None  # _call above raised otherwise
        response = await self._client.get(f"{API}/vm.info")
        if response.status_code == 404:  # no VM created yet
            return VmmInfo(state=VmmState.STARTED, vmm_state="Not created", version=version)
        if not response.is_success:
            await self._refused(response, verb="describe the VM", starting=False)
        vmm_state = str(response.json()["state"])
        return VmmInfo(
            state=_VM_STATES.get(vmm_state, self._state), vmm_state=vmm_state, version=version
        )

    async def shutdown(self, *, grace: float = 5.0) -> None:
        """Power the VM off (vm.shutdown), end the VMM (vmm.shutdown), kill it if it lingers."""
        if self._client is not None and self._process is not None:
            with contextlib.suppress(Exception):
                if self._state in (VmmState.RUNNING, VmmState.PAUSED):
                    await self._put("vm.shutdown", verb="shut down")
                await self._put("vmm.shutdown", verb="shut down")
                await self._process.wait_exit(grace)
        await self._release(grace=min(grace, 1.0))

    def _release_extra(self) -> None:
        if self._vsock_uds is not None:
            with contextlib.suppress(OSError):
                self._vsock_uds.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "restore", ignore_errors=True)


def _disk(disk: DiskSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"id": disk.drive_id, "path": str(disk.path), "readonly": disk.read_only}
    if disk.serial is not None:
        body["serial"] = disk.serial
    return body

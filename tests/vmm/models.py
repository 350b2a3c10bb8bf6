"""State machines of Firecracker and Cloud Hypervisor, as their specs and docs describe them.

Where each rule comes from (spec = the YAML in ../shared/specs, docs = upstream docs):

Firecracker (firecracker.yaml, API 1.17.0-dev)
- "Pre-boot only" / "Post-boot only" in an operation's summary (spec; for PUT
  /balloon, "This will fail after machine startup" in its description) decide
  whether it is accepted before or after InstanceStart; a refusal is Firecracker's
  400 "The requested operation is not supported after/before starting the microVM."
  (the wording of its VmmActionError).
- PATCH /vm pauses or resumes a started microVM (spec: "Sets the desired state
  (Paused or Resumed)"; before boot it is refused like every post-boot call).
- /snapshot/create: "The microVM should be in the `Paused` state" (spec).
- /snapshot/load: "Only accepted on a fresh Firecracker process (before
  configuring any resource other than the Logger and Metrics)" (spec); exactly
  one of `mem_file_path` / `mem_backend` (spec, SnapshotLoadParams); the VM is
  paused after load unless `resume_vm` (spec) - docs/snapshotting/snapshot-support.md.
- InstanceStart needs a boot source (Firecracker refuses to start without a kernel).
- SendCtrlAltDel makes a guest booted with `reboot=k` reboot, and Firecracker
  exits on guest reboot (docs/api_requests/actions.md): the stand-in exits.

Cloud Hypervisor (cloud-hypervisor.yaml, API 0.3.0)
- No VM -> vm.create -> Created -> vm.boot -> Running <-> vm.pause/vm.resume ->
  Paused; vm.shutdown -> Shutdown; vm.delete -> no VM. Status codes for wrong
  states are the spec's where it names one (404 "not created", 405 "not booted",
  "not paused", 409 duplicate device); where the spec names none, 500 with the
  error in the body, as Cloud Hypervisor does (upstream issues #7774, #8678).
- vm.snapshot "of a previously paused virtual machine" (docs/snapshot_restore.md);
  the directory gets config.json, state.json and memory-ranges (same doc).
- vm.restore only without a VM (spec 404: "could not be restored because it is
  already created"); "The new virtual machine is restored in a paused state"
  (docs) unless `resume` (spec, RestoreConfig).
- vm.resize / vm.add-disk need a created VM (spec 404); add-disk answers 204
  (cold add) before boot and 200 with PciDeviceInfo after (spec).
- vmm.shutdown ends the VMM process (spec: "Shuts the cloud-hypervisor VMM").
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.vmm.guest import SimulatedGuest
from tests.vmm.openapi import Match

GuestFactory = Callable[[socket.socket], SimulatedGuest]

NOT_AFTER_BOOT = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_BOOT = "The requested operation is not supported before starting the microVM."
LOAD_NOT_ALLOWED = (
    "Loading a microVM snapshot not allowed after configuring boot-specific resources."
)
STANDIN_VERSION = "spec-stand-in"


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON value, or None for no body
    text: str | None = None  # a plain-text body instead of JSON
    exit_after: bool = False  # the VMM process ends once this is sent


@dataclass
class _Files:
    """Path resolution as the VMM sees it: relative to its cwd, absolute under its chroot."""

    root: Path | None

    def resolve(self, path: str) -> Path:
        if self.root is not None and path.startswith("/"):
            return self.root / path.lstrip("/")
        return Path(path)

    def bind(self, path: str) -> socket.socket:
        """A bound unix socket, as the VMM makes for a vsock device."""
        target = self.resolve(path)
        target.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(target))
        sock.listen()
        return sock


def _preboot_only(summary: str, description: str) -> bool:
    # Most operations say so in their summary; PUT /balloon says it in its description.
    return "Pre-boot only" in summary or "fail after machine startup" in description


def fault(message: str, status: int = 400) -> Reply:
    return Reply(status, {"fault_message": message})


@dataclass
class FirecrackerModel:
    """Firecracker's API state; `handle` answers one spec-valid request."""

    files: _Files
    instance_id: str = "anonymous-instance"
    started: bool = False
    paused: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # GET /vm/config's shape
    sockets: list[socket.socket] = field(default_factory=list)
    guest_factory: GuestFactory | None = None  # a simulated guest at boot (tests/vmm/guest.py)
    guest: SimulatedGuest | None = None

    @property
    def state(self) -> str:
        if not self.started:
            return "Not started"
        return "Paused" if self.paused else "Running"

    def handle(self, match: Match, body: Any) -> Reply:
        op = match.operation
        route = f"{op.method} {op.template}"
        if op.method == "GET":
            return self._get(op.template)
        if route == "PUT /actions":
            return self._action(body["action_type"])
        if route == "PATCH /vm":
            if not self.started:
                return fault(NOT_BEFORE_BOOT)
            self.paused = body["state"] == "Paused"
            if self.guest is not None:
                self.guest.pause() if self.paused else self.guest.resume()
            return Reply(204)
        if route == "PUT /snapshot/create":
            return self._snapshot_create(body)
        if route == "PUT /snapshot/load":
            return self._snapshot_load(body)
        if _preboot_only(op.summary, op.description) and self.started:
            return fault(NOT_AFTER_BOOT)
        if "Post-boot only" in op.summary and not self.started:
            return fault(NOT_BEFORE_BOOT)
        if op.method == "PUT":
            return self._put_config(op.template, match.params, body)
        return self._patch_config(op.template, match.params, body)

    def _get(self, template: str) -> Reply:
        if template == "/":
            return Reply(
                200,
                {
                    "app_name": "Firecracker",
                    "id": self.instance_id,
                    "state": self.state,
                    "vmm_version": STANDIN_VERSION,
                },
            )
        if template == "/version":
            return Reply(200, {"firecracker_version": STANDIN_VERSION})
        if template == "/machine-config":
            return Reply(
                200, self.config.get("machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
            )
        if template == "/vm/config":
            return Reply(200, self.config)
        return fault(f"{template} is not modelled by the stand-in", 500)

    def _put_config(self, template: str, params: dict[str, str], body: Any) -> Reply:
        if template == "/boot-source":
            kernel = self.files.resolve(body["kernel_image_path"])
            if not kernel.is_file():
                return fault(f"Cannot open kernel image: {body['kernel_image_path']}: not found")
            initrd = body.get("initrd_path")
            if initrd is not None and not self.files.resolve(initrd).is_file():
                return fault(f"Cannot open initrd image: {initrd}: not found")
            self.config["boot-source"] = body
        elif template == "/drives/{drive_id}":
            if body["drive_id"] != params["drive_id"]:
                return fault("The id from the path does not match the id from the body!")
            path = body.get("path_on_host")
            if path is None or not self.files.resolve(path).exists():
                return fault(f"Unable to open block device {path}: not found")
            drives = [d for d in self.config.get("drives", []) if d["drive_id"] != body["drive_id"]]
            if body["is_root_device"] and any(d["is_root_device"] for d in drives):
                return fault("A root block device already exists!")
            self.config["drives"] = [*drives, body]
        elif template == "/network-interfaces/{iface_id}":
            if body["iface_id"] != params["iface_id"]:
                return fault("The id from the path does not match the id from the body!")
            nets = [
                n
                for n in self.config.get("network-interfaces", [])
                if n["iface_id"] != body["iface_id"]
            ]
            self.config["network-interfaces"] = [*nets, body]
        elif template == "/machine-config":
            if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
                return fault(
                    "The vCPU number is invalid! The vCPU number can only be 1 or an even "
                    "number when SMT is enabled."
                )
            self.config["machine-config"] = body
        else:
            self.config[template.strip("/").replace("/", "-")] = body
        return Reply(204)

    def _patch_config(self, template: str, params: dict[str, str], body: Any) -> Reply:
        if template == "/drives/{drive_id}":
            drives = {d["drive_id"]: d for d in self.config.get("drives", [])}
            drive = drives.get(params["drive_id"])
            if drive is None or body["drive_id"] != params["drive_id"]:
                return fault(f"Invalid block device ID: {params['drive_id']}")
            if "path_on_host" in body:
                if not self.files.resolve(body["path_on_host"]).exists():
                    return fault(f"Unable to open block device {body['path_on_host']}")
                drive["path_on_host"] = body["path_on_host"]
            return Reply(204)
        return Reply(204)

    def _action(self, action: str) -> Reply:
        if action == "InstanceStart":
            if self.started:
                return fault(NOT_AFTER_BOOT)
            if "boot-source" not in self.config:
                return fault("Cannot start microvm without kernel configuration.")
            self.started = True
            listener = self._bind_vsock()
            if listener is not None and self.guest_factory is not None:
                source = self.config["boot-source"]
                initrd = self.files.resolve(source.get("initrd_path", ""))
                self.guest = self.guest_factory(listener)
                self.guest.boot(initrd, source.get("boot_args", ""))
            return Reply(204)
        if not self.started:
            return fault(NOT_BEFORE_BOOT)
        if action == "SendCtrlAltDel":
            # A running guest booted with reboot=k reboots, and Firecracker exits.
            return Reply(204, exit_after=not self.paused)
        return Reply(204)  # FlushMetrics

    def _bind_vsock(self) -> socket.socket | None:
        vsock = self.config.get("vsock")
        if vsock is None:
            return None
        self.sockets.append(self.files.bind(vsock["uds_path"]))
        return self.sockets[-1]

    def _snapshot_create(self, body: Any) -> Reply:
        if not self.started:
            return fault(NOT_BEFORE_BOOT)
        if not self.paused:
            return fault("Cannot create a snapshot: the microVM is not paused.")
        state = self.files.resolve(body["snapshot_path"])
        memory = self.files.resolve(body["mem_file_path"])
        try:
            state.write_text(json.dumps({"stand_in": "firecracker", "config": self.config}))
            if self.guest is not None:
                self.guest.save(memory)
            else:
                memory.write_bytes(b"\0" * 4096)
        except OSError as exc:
            return fault(f"Cannot create snapshot: {exc}")
        return Reply(204)

    def _snapshot_load(self, body: Any) -> Reply:
        booted_resources = set(self.config) - {"logger", "metrics"}
        if self.started or booted_resources:
            return fault(LOAD_NOT_ALLOWED)
        if ("mem_file_path" in body) == ("mem_backend" in body):
            return fault("Exactly one of mem_file_path and mem_backend must be given.")
        memory = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
        state_path = self.files.resolve(body["snapshot_path"])
        try:
            snapshot = json.loads(state_path.read_text())
            if not self.files.resolve(memory).is_file():
                raise FileNotFoundError(memory)
        except (OSError, ValueError) as exc:
            return fault(f"Load snapshot error: Failed to restore from snapshot: {exc}")
        config = snapshot["config"]
        for drive in config.get("drives", []):
            if not self.files.resolve(drive["path_on_host"]).exists():
                return fault(
                    f"Load snapshot error: Failed to restore from snapshot: "
                    f"block device {drive['path_on_host']} not found"
                )
        override = body.get("vsock_override")
        if override is not None:
            if "vsock" not in config:
                return fault("Load snapshot error: the snapshot has no vsock device to override.")
            config["vsock"]["uds_path"] = override["uds_path"]
        for override in body.get("network_overrides", []):
            nets = [
                n
                for n in config.get("network-interfaces", [])
                if n["iface_id"] == override["iface_id"]
            ]
            if not nets:
                return fault(f"Load snapshot error: no network interface {override['iface_id']}.")
            nets[0]["host_dev_name"] = override["host_dev_name"]
        self.config = config
        self.started = True
        self.paused = not body.get("resume_vm", False)
        listener = self._bind_vsock()
        if listener is not None and self.guest_factory is not None:
            self.guest = self.guest_factory(listener)
            self.guest.paused = self.paused
            self.guest.load(self.files.resolve(memory))
        return Reply(204)


@dataclass
class CloudHypervisorModel:
    """Cloud Hypervisor's API state; `handle` answers one spec-valid request."""

    files: _Files
    vm_state: str | None = None  # None: no VM; else a VmState (Created, Running, Paused, Shutdown)
    config: dict[str, Any] = field(default_factory=dict)
    sockets: list[socket.socket] = field(default_factory=list)
    next_device: int = 4
    guest_factory: GuestFactory | None = None  # a simulated guest at boot (tests/vmm/guest.py)
    guest: SimulatedGuest | None = None

    def handle(self, match: Match, body: Any) -> Reply:
        action = match.operation.template.lstrip("/")
        handler = getattr(self, "_" + action.replace(".", "_").replace("-", "_"), None)
        if handler is None:
            return Reply(500, text=f"{action} is not modelled by the stand-in")
        reply: Reply = handler(body)
        return reply

    def _error(self, text: str, status: int = 500) -> Reply:
        return Reply(status, text=f"Error from API: {text}")

    def _vmm_ping(self, _: Any) -> Reply:
        return Reply(200, {"version": STANDIN_VERSION, "pid": os.getpid(), "build_version": "0"})

    def _vmm_shutdown(self, _: Any) -> Reply:
        return Reply(204, exit_after=True)

    def _vm_info(self, _: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The VM is not created", 404)
        return Reply(200, {"config": self.config, "state": self.vm_state})

    def _vm_create(self, body: Any) -> Reply:
        if self.vm_state is not None:
            return self._error("The VM could not be created: VmAlreadyCreated")
        cpus = body.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        if cpus["boot_vcpus"] > cpus["max_vcpus"]:
            return self._error("Invalid VM config: boot_vcpus above max_vcpus", 400)
        ids = [d.get("id") for d in body.get("disks", []) if d.get("id")]
        if len(ids) != len(set(ids)):
            return self._error("Invalid VM config: duplicate disk id", 400)
        self.config = body
        self.vm_state = "Created"
        return Reply(204)

    def _vm_delete(self, _: Any) -> Reply:
        self._close_sockets()
        self.vm_state = None
        self.config = {}
        return Reply(204)

    def _vm_boot(self, _: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The VM could not boot: VmNotCreated", 404)
        if self.vm_state in ("Running", "Paused"):
            return self._error("The VM could not boot: VmAlreadyRunning")
        payload = self.config.get("payload", {})
        for key in ("kernel", "initramfs"):
            if key in payload and not self.files.resolve(payload[key]).is_file():
                return self._error(f"The VM could not boot: cannot open {key} {payload[key]}")
        for disk in self.config.get("disks", []):
            if not self.files.resolve(disk["path"]).exists():
                return self._error(f"The VM could not boot: cannot open disk {disk['path']}")
        self.vm_state = "Running"
        listener = self._bind_vsock()
        if listener is not None and self.guest_factory is not None:
            self.guest = self.guest_factory(listener)
            self.guest.boot(
                self.files.resolve(payload.get("initramfs", "")), payload.get("cmdline", "")
            )
        return Reply(204)

    def _vm_pause(self, _: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The VM could not be paused: VmNotCreated", 404)
        if self.vm_state != "Running":
            if self.vm_state == "Paused":
                return self._error(
                    "The VM could not be paused: InvalidStateTransition(Paused, Paused)"
                )
            return self._error("The VM could not be paused: VM is not booted", 405)
        self.vm_state = "Paused"
        if self.guest is not None:
            self.guest.pause()
        return Reply(204)

    def _vm_resume(self, _: Any) -> Reply:
        if self.vm_state not in ("Running", "Paused"):
            return self._error("The VM could not be resumed: VM is not booted", 404)
        if self.vm_state != "Paused":
            return self._error("The VM could not be resumed: VM is not paused", 405)
        self.vm_state = "Running"
        if self.guest is not None:
            self.guest.resume()
        return Reply(204)

    def _vm_shutdown(self, _: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The VM could not be shut down: VmNotCreated", 404)
        if self.vm_state not in ("Running", "Paused"):
            return self._error("The VM could not be shut down: VM is not running", 405)
        self._close_sockets()
        self.vm_state = "Shutdown"
        return Reply(204)

    def _vm_snapshot(self, body: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The VM could not be snapshotted: VmNotCreated", 404)
        if self.vm_state not in ("Running", "Paused"):
            return self._error("The VM could not be snapshotted: VM is not booted", 405)
        if self.vm_state != "Paused":
            return self._error("The VM could not be snapshotted: VM is not paused")
        url = urlparse(body.get("destination_url", ""))
        target = self.files.resolve(url.path)
        if url.scheme != "file" or not target.is_dir():
            return self._error(f"The VM could not be snapshotted: bad destination {url.geturl()}")
        try:
            (target / "config.json").write_text(json.dumps(self.config))
            (target / "state.json").write_text(json.dumps({"stand_in": "cloud-hypervisor"}))
            if self.guest is not None:
                self.guest.save(target / "memory-ranges")
            else:
                (target / "memory-ranges").write_bytes(b"\0" * 4096)
        except OSError as exc:
            return self._error(f"The VM could not be snapshotted: {exc}")
        return Reply(204)

    def _vm_restore(self, body: Any) -> Reply:
        if self.vm_state is not None:
            return self._error("The VM could not be restored: VmAlreadyCreated", 404)
        url = urlparse(body["source_url"])
        source = self.files.resolve(url.path)
        names = ("config.json", "state.json", "memory-ranges")
        if url.scheme != "file" or not all((source / n).is_file() for n in names):
            return self._error(f"The VM could not be restored: no snapshot at {url.geturl()}", 400)
        config = json.loads((source / "config.json").read_text())
        for disk in config.get("disks", []):
            if not self.files.resolve(disk["path"]).exists():
                return self._error(
                    f"The VM could not be restored: cannot open disk {disk['path']}", 400
                )
        self.config = config
        self.vm_state = "Running" if body.get("resume") else "Paused"
        listener = self._bind_vsock()
        if listener is not None and self.guest_factory is not None:
            self.guest = self.guest_factory(listener)
            self.guest.paused = self.vm_state == "Paused"
            self.guest.load(source / "memory-ranges")
        return Reply(204)

    def _vm_resize(self, body: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The VM could not be resized: VmNotCreated", 404)
        cpus = self.config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        memory = self.config.setdefault("memory", {"size": 512 << 20})
        vcpus = body.get("desired_vcpus")
        if vcpus is not None and vcpus > cpus["max_vcpus"]:
            return self._error("The VM could not be resized: DesiredVCpuCountExceedsMax")
        ram = body.get("desired_ram")
        if ram is not None:
            ceiling = memory.get("size", 0) + memory.get("hotplug_size", 0)
            if ram > ceiling or (ram != memory["size"] and not memory.get("hotplug_size")):
                return self._error("The VM could not be resized: InsufficientHotplugRam")
        if vcpus is not None:
            cpus["boot_vcpus"] = vcpus
        if ram is not None:
            memory["hotplugged_size"] = ram - memory["size"]
        return Reply(204)

    def _vm_add_disk(self, body: Any) -> Reply:
        if self.vm_state is None:
            return self._error("The new disk could not be added: VmNotCreated", 404)
        disks = self.config.setdefault("disks", [])
        if body.get("id") and any(d.get("id") == body["id"] for d in disks):
            return self._error(f"The new disk could not be added: duplicate id {body['id']}", 409)
        if "path" not in body or not self.files.resolve(body["path"]).exists():
            return self._error(
                f"The new disk could not be added: cannot open {body.get('path')}", 400
            )
        disk_id = body.get("id") or f"_disk{len(disks)}"
        disks.append({**body, "id": disk_id})
        if self.vm_state == "Created":
            return Reply(204)
        self.next_device += 1
        return Reply(200, {"id": disk_id, "bdf": f"0000:00:{self.next_device:02x}.0"})

    def _bind_vsock(self) -> socket.socket | None:
        vsock = self.config.get("vsock")
        if vsock is None:
            return None
        self.sockets.append(self.files.bind(vsock["socket"]))
        return self.sockets[-1]

    def _close_sockets(self) -> None:
        # The socket file stays behind, as a VMM's does: its owner removes it.
        if self.guest is not None:  # the VM is off: so is its guest
            self.guest.stop()
            self.guest = None
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

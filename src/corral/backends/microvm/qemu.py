"""QEMU's `microvm` machine: the accelerator this host can use, the command line, QMP.

Facts this module encodes (measured on our hosts, see docs/microvm.md):
- /dev/kvm may be PVM (kvm_pvm, no VT-x/AMD-V): it only runs PVM guest kernels,
  so a stock kernel boots under TCG there. `accelerator()` says which and why.
- Under TCG the guest cannot calibrate its TSC quickly: the host's TSC rate is
  read at run time and passed as `tsc_early_khz`, or boot hangs.
- A restored VM starts paused (`-S` with `-incoming defer`) and runs on `cont`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient, QMPError

from corral.backends.microvm.host import Accelerator, accelerator, tsc_khz
from corral.errors import ExecError

__all__ = [
    "Accelerator",
    "DriveSpec",
    "VmSpec",
    "accelerator",
    "command_line",
    "qmp_call",
    "tsc_khz",
]

QEMU = "qemu-system-x86_64"
# TCG's translation cache defaults to 1 GiB per VM; 64 MiB keeps an idle VM small.
TB_SIZE_MIB = 64


@dataclass(frozen=True, slots=True)
class DriveSpec:
    """One virtio-blk disk: `serial` is how the guest agent finds it. A writable
    disk is `cache=unsafe` (scratch: flushes ignored, gone with the sandbox) unless
    `durable` (a pet's volume: the guest's flushes reach the host's disk)."""

    serial: str
    path: str
    format: Literal["raw", "qcow2"]
    read_only: bool
    durable: bool = False


@dataclass(frozen=True, slots=True)
class VmSpec:
    """Everything that must be identical between a VM and a restore of its snapshot."""

    kernel: str
    initrd: str
    cmdline: str
    vcpus: int
    memory_mib: int
    accel: Literal["kvm", "tcg"]
    ports: int
    drives: tuple[DriveSpec, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmSpec:
        drives = tuple(DriveSpec(**drive) for drive in data.pop("drives"))
        return cls(**data, drives=drives)


def command_line(spec: VmSpec, run_dir: Path, *, incoming: bool = False) -> list[str]:
    """The QEMU argv for `spec`, its sockets, console log and pid file under `run_dir`."""
    accel = f"tcg,tb-size={TB_SIZE_MIB}" if spec.accel == "tcg" else "kvm"
    argv = [
        QEMU,
        *("-name", f"corral,process=corral-vm:{run_dir.name}"),
        *("-machine", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,acpi=on"),
        *("-accel", accel),
        *("-cpu", "max" if spec.accel == "tcg" else "host"),
        *("-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M"),
        *("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"),
        *("-kernel", spec.kernel, "-initrd", spec.initrd, "-append", spec.cmdline),
        *("-chardev", f"file,id=console,path={run_dir / 'console.log'}"),
        *("-serial", "chardev:console"),
        *("-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off"),
        *("-device", f"virtio-serial-device,max_ports={spec.ports + 1}"),
    ]
    for index in range(spec.ports):
        argv += [
            *(
                "-chardev",
                f"socket,id=port{index},path={port_socket(run_dir, index)},server=on,wait=off",
            ),
            *("-device", f"virtserialport,chardev=port{index},name=corral.{index}"),
        ]
    for drive in spec.drives:
        options = f"id={drive.serial},file={drive.path},format={drive.format},if=none"
        if drive.read_only:
            options += ",readonly=on"
        else:
            options += ",cache=writeback" if drive.durable else ",cache=unsafe"
            options += ",discard=unmap"
        argv += [
            "-drive",
            options,
            "-device",
            f"virtio-blk-device,drive={drive.serial},serial={drive.serial}",
        ]
    argv += ["-daemonize", "-pidfile", str(run_dir / "qemu.pid")]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


def port_socket(run_dir: Path, index: int) -> Path:
    return run_dir / f"port-{index}.sock"


async def qmp_call(
    socket: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30
) -> Any:
    """Run one QMP command on the VM whose QMP socket is `socket`."""
    client = QMPClient("corral")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    except (QMPError, OSError, TimeoutError) as exc:
        raise ExecError(
            f"QMP {command} failed: {exc}",
            backend="microvm",
            hint="the VM's QEMU process may have exited; see its console.log",
        ) from exc
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


class QmpSession:
    """One QMP connection for a sequence of commands (snapshot, restore)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.client = QMPClient("corral")

    async def __aenter__(self) -> QmpSession:
        try:
            await asyncio.wait_for(self.client.connect(str(self.socket)), 30)
        except (QMPError, OSError, TimeoutError) as exc:
            raise ExecError(f"cannot reach QMP at {self.socket}: {exc}", backend="microvm") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.client.disconnect()

    async def quit(self) -> None:
        """Make QEMU exit; the connection ends with it, which is the answer."""
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(self.client.execute("quit"), 10)

    async def run(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), 60)
        except (QMPError, OSError, TimeoutError) as exc:
            raise ExecError(f"QMP {command} failed: {exc}", backend="microvm") from exc

    async def wait_migration(self, deadline: float = 120) -> dict[str, Any]:
        """Poll query-migrate until it completes; ExecError when it fails or stalls."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        while True:
            state: dict[str, Any] = await self.run("query-migrate")
            status = state.get("status")
            if status == "completed":
                return state
            if status in ("failed", "cancelled") or loop.time() > until:
                raise ExecError(
                    f"migration {status}: {state.get('error-desc', 'timed out')}",
                    backend="microvm",
                )
            await asyncio.sleep(0.01)

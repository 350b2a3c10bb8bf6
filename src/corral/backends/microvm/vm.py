"""One sandbox's QEMU process: start it daemonized in its host cgroup, find it, wait for it.

The pieces of a VM's life that need no sandbox record: the backend and the
snapshot code call these with the sandbox's directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from corral._sys.procs import running
from corral.backends.microvm import hostcg
from corral.backends.microvm.qemu import VmSpec, command_line
from corral.errors import BackendUnavailableError, ExecError, SandboxStartError

__all__ = ["qemu_img", "qemu_pid", "start_qemu", "tail"]

# Longest a unix socket path may be (sun_path is 108 bytes with its NUL).
_SUN_PATH_MAX = 107


def check_socket_room(sandbox_dir: Path, sandbox_id: str, ports: int) -> None:
    longest = sandbox_dir / f"port-{ports - 1}.sock"
    if len(str(longest)) > _SUN_PATH_MAX:
        raise SandboxStartError(
            f"the sandbox directory {sandbox_dir} is too long for unix sockets",
            sandbox_id=sandbox_id,
            backend="microvm",
            hint="use a shorter state directory or sandbox id",
        )


async def start_qemu(
    sandbox_id: str, sandbox_dir: Path, vm: VmSpec, cgroup: hostcg.HostCgroup, *, incoming: bool
) -> None:
    """Start QEMU for `vm`, daemonized, inside `cgroup` from its first instruction."""
    procs = cgroup.procs_files()
    argv = command_line(vm, sandbox_dir, incoming=incoming)
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
            backend="microvm",
            stderr_tail=tail(log),
            hint="run `corral doctor` to check the host",
        )


def qemu_pid(sandbox_dir: Path) -> int | None:
    """The live QEMU process of the sandbox in `sandbox_dir`, checked by its command line."""
    try:
        pid = int((sandbox_dir / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if not running(pid) or str(sandbox_dir).encode() not in cmdline:
        return None
    return pid


async def qemu_img(*args: str) -> None:
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


def tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""

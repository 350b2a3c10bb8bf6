"""A simulated guest for the stand-in VMMs: the bundle's real agent, run on the host.

When a stand-in boots a VM (Firecracker InstanceStart, Cloud Hypervisor
vm.boot) it takes /init out of the initramfs the VM was given - the guest agent
of the bundle, a static x86-64 binary - and runs it in a throwaway directory
beside the VM's vsock socket (so it goes with the sandbox's directory even when
the stand-in is killed) as an ordinary process, unprivileged when the stand-in
runs as root: `corral-agent --host ROOT SOCKDIR CMDLINE`. ROOT stands for the
guest's filesystem (the agent resolves absolute file paths and exec's cwd under
it); the agent serves the vsock port named on the kernel command line as a unix
socket in SOCKDIR.

The stand-in serves the VM's vsock device socket the way Firecracker's hybrid
vsock does (docs/vsock.md upstream, which Cloud Hypervisor follows): the host
connects, sends `CONNECT <port>\\n`; if the guest listens on the port the VMM
answers `OK <host port>\\n` and the stream is the guest's, else it closes the
connection.

Pausing the VM stops every guest process (SIGSTOP), resuming continues them. A
snapshot's memory file is a tar of the guest directory (agent, command line,
files); loading it unpacks a new guest and starts its agent afresh: files
survive a snapshot, processes do not (a real VMM keeps both). This tests the
backend's whole path over the published contract, not isolation: the "guest"
is a host process.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shlex
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
from pathlib import Path

GUEST_UID = 65534  # the simulated guest's user when the stand-in runs as root (nobody)
FIRST_HOST_PORT = 1 << 30  # Firecracker numbers host-side ports of hybrid vsock from here
_AGENT = "agent"
_CMDLINE = "cmdline"


def init_from_cpio(archive: bytes) -> bytes:
    """The file named `init` in a newc cpio archive (the kernel's initramfs format)."""
    at = 0
    while at + 110 <= len(archive):
        header = archive[at : at + 110]
        if header[:6] != b"070701":
            raise ValueError(f"not a newc cpio archive at offset {at}")
        size = int(header[54:62], 16)
        name_size = int(header[94:102], 16)
        name_at = at + 110
        name = archive[name_at : name_at + name_size - 1].decode()
        data_at = name_at + name_size + (-(name_at + name_size) % 4)
        if name == "init":
            return archive[data_at : data_at + size]
        if name == "TRAILER!!!":
            break
        at = data_at + size + (-(data_at + size) % 4)
    raise ValueError("the initramfs has no /init")


def _session_others() -> list[int]:
    """Every other process in this stand-in's session: the guest's processes."""
    mine, me = os.getsid(0), os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == mine and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


class SimulatedGuest:
    """One VM's simulated guest, serving hybrid vsock on `listener` (the vsock socket)."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        beside = Path(listener.getsockname()).parent
        self.directory = Path(tempfile.mkdtemp(prefix="simguest-", dir=beside))
        self.directory.chmod(0o755)
        self.process: asyncio.subprocess.Process | None = None
        self.server: asyncio.AbstractServer | None = None
        self.next_port = FIRST_HOST_PORT
        self.pipes: set[asyncio.Task[None]] = set()
        self.paused = False
        self.starting: asyncio.Task[None] | None = None

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def sockets(self) -> Path:
        return self.directory / "sock"

    def boot(self, initrd: Path, cmdline: str) -> None:
        """Unpack the agent from `initrd` and start it with `cmdline` (a cold boot)."""
        agent = self.directory / _AGENT
        agent.write_bytes(init_from_cpio(initrd.read_bytes()))
        agent.chmod(0o755)
        (self.directory / _CMDLINE).write_text(cmdline)
        self.root.mkdir()
        # What the agent's binds would make: the sandbox's writable places.
        for word in shlex.split(cmdline):
            if word.startswith("corral.bind="):
                target = word.split(":", 1)[1]
                (self.root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        self._start()

    def load(self, memory: Path) -> None:
        """Unpack a guest saved by `save()` and start its agent (a restore)."""
        with tarfile.open(memory) as archive:
            archive.extractall(self.directory, filter="fully_trusted")
        self._start()

    def save(self, memory: Path) -> None:
        """Write the guest (agent, cmdline, files) to `memory` as a tar."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name in (_AGENT, _CMDLINE, "root"):
                archive.add(self.directory / name, arcname=name)
        memory.write_bytes(buffer.getvalue())

    def _start(self) -> None:
        self.sockets.mkdir(exist_ok=True)
        as_root = os.geteuid() == 0
        if as_root:
            for path in (self.directory, *self.directory.rglob("*")):
                os.lchown(path, GUEST_UID, GUEST_UID)
        argv = [
            str(self.directory / _AGENT),
            "--host",
            str(self.root),
            str(self.sockets),
            (self.directory / _CMDLINE).read_text(),
        ]
        self.starting = asyncio.get_running_loop().create_task(self._spawn(argv, as_root))

    async def _spawn(self, argv: list[str], as_root: bool) -> None:
        ids: dict[str, object] = (
            {"user": GUEST_UID, "group": GUEST_UID, "extra_groups": []} if as_root else {}
        )
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                cwd=self.root,
                **ids,  # type: ignore[arg-type]
            )
        except OSError as exc:  # into the VMM's log, which the backend's errors quote
            print(f"simulated guest: cannot start the agent: {exc}", file=sys.stderr, flush=True)
            raise
        if self.paused:  # restored without resume: the guest starts stopped
            self.pause()
        self.server = await asyncio.start_unix_server(self._serve, sock=self.listener)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.pipes.add(task)
        try:
            line = await reader.readline()
            words = line.split()
            if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit():
                return  # Firecracker drops a connection that does not start with CONNECT
            path = self.sockets / f"vsock-{int(words[1])}.sock"
            try:
                guest_reader, guest_writer = await asyncio.open_unix_connection(str(path))
            except OSError:
                return  # nothing listens on that port in the guest: closed, no OK
            writer.write(b"OK %d\n" % self.next_port)
            self.next_port += 1
            await writer.drain()
            await asyncio.gather(_pipe(reader, guest_writer), _pipe(guest_reader, writer))
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()
            self.pipes.discard(task)

    def pause(self) -> None:
        self.paused = True
        for pid in _session_others():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        self.paused = False
        for pid in _session_others():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill every guest process and remove the guest's directory."""
        if self.server is not None:
            self.server.close()
        for task in list(self.pipes):
            task.cancel()
        for pid in _session_others():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.write_eof()

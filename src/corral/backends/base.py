"""The backend interface: how a sandbox is realized (OCI runtime, Podman, microVM, fake).

A backend knows nothing about tenants, pools or the store; the runtime layer
drives it through these few verbs. Every verb is async and keyed by sandbox id,
so a sandbox created by one process can be driven by another.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Literal

from corral.errors import UnsupportedError

__all__ = [
    "Backend",
    "BackendStatus",
    "Capability",
    "ExecRequest",
    "ExecResult",
    "ExitStatus",
    "HostMount",
    "ImageRef",
    "Output",
    "PortMapping",
    "SandboxConfig",
    "SandboxLimits",
    "SandboxStats",
]


class Capability(StrEnum):
    """Optional abilities a backend may advertise in `Backend.capabilities`."""

    PAUSE = "pause"  # pause() / resume()
    SNAPSHOT = "snapshot"  # snapshot() / restore()
    NETWORK_EGRESS = "network-egress"  # network="egress" works
    CPUSET = "cpuset"  # limits.cpuset is enforced
    USER_NAMESPACE = "user-namespace"  # sandbox root is not host root
    PUBLISH_PORTS = "publish-ports"  # config.ports are published on the host
    # A pet's volume is handed over as its disk image (a writable HostMount whose
    # source is the image file) and attached as a block device: the host mounts nothing.
    VOLUME_DISK = "volume-disk"


class BackendStatus(StrEnum):
    """What a backend reports about one sandbox."""

    CREATED = "created"  # exists, main process not started
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # main process exited; resources still held
    MISSING = "missing"  # the backend holds nothing for this id


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Resource limits; memory and disk in bytes, vcpus may be fractional."""

    vcpus: float = 1.0
    memory: int = 512 << 20
    pids: int = 256
    disk: int = 256 << 20
    cpuset: str | None = None


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A realized image: a rootfs directory plus the process defaults it was built with."""

    digest: str
    rootfs: Path
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/work"
    uid: int = 1000
    gid: int = 1000
    home: str = "/home/sandbox"
    layout: Path | None = None  # the OCI image layout directory, when written


@dataclass(frozen=True, slots=True)
class HostMount:
    """A host path bound at `target` inside the sandbox: read-only, unless `writable`
    (a pet's volume), when the backend also hands the directory's root to the
    sandbox user (as the host sees that user). On a backend with
    Capability.VOLUME_DISK a writable mount's `source` is the volume's ext4 image
    file, attached as a disk and mounted by the guest."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True, slots=True)
class PortMapping:
    """A TCP port inside the sandbox published on the host at `host_ip`:`host_port`
    (0: a free port the backend picks; the sandbox's record says which)."""

    container_port: int
    host_port: int = 0
    host_ip: str = "127.0.0.1"

    def as_dict(self) -> dict[str, int | str]:
        return {
            "container_port": self.container_port,
            "host_port": self.host_port,
            "host_ip": self.host_ip,
        }


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Everything a backend needs to create one sandbox."""

    sandbox_id: str
    image: ImageRef
    limits: SandboxLimits = SandboxLimits()
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[HostMount] = ()
    network: Literal["none", "egress"] = "none"
    labels: Mapping[str, str] = field(default_factory=dict)
    runtime: str | None = None  # e.g. crun, runc, runsc; None: the backend's default
    ports: Sequence[PortMapping] = ()  # needs Capability.PUBLISH_PORTS


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One command to run inside a running sandbox."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None  # None: the image's workdir
    # All of stdin up front, or chunks as they come (closed when the iterable ends).
    stdin: bytes | AsyncIterable[bytes] | None = None
    timeout: float | None = None  # seconds; None: no limit


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of output, yielded as soon as the command produced it."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """The last event of every exec stream.

    `exit_code` follows shell conventions: 124 when the timeout fired, 137 when
    killed by SIGKILL (e.g. out of memory), 127 when the command was not found,
    128+N for other signals.
    """

    exit_code: int
    timed_out: bool = False
    oom_killed: bool = False
    duration: float = 0.0
    reason: str | None = None  # one line for humans when the command did not exit by itself


ExecEvent = Output | ExitStatus


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A finished command with its whole output (see `Backend.exec`)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    oom_killed: bool = False
    duration: float = 0.0
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class SandboxStats:
    """A point-in-time reading of a sandbox's resource use."""

    memory_bytes: int
    memory_limit: int
    cpu_seconds: float
    pids: int
    pids_limit: int
    oom_kills: int = 0


class Backend(abc.ABC):
    """A way to realize sandboxes. Subclasses implement the abstract verbs.

    Contract shared by all verbs: an unknown sandbox id raises NotFoundError;
    runtime failures raise InfrastructureError subclasses carrying the sandbox
    id, the backend name and the runtime's stderr tail.
    """

    name: ClassVar[str]
    capabilities: frozenset[Capability] = frozenset()
    # The `SandboxConfig.runtime` values this backend accepts (empty: it takes none).
    runtimes: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    async def create(self, config: SandboxConfig) -> None:
        """Prepare the sandbox and start its (idle) main process.

        After success the sandbox is RUNNING and accepts exec. After failure
        (SandboxStartError) nothing is left: no process, cgroup, mount or
        directory that this call made.
        """

    @abc.abstractmethod
    def exec_stream(self, sandbox_id: str, request: ExecRequest) -> AsyncIterator[ExecEvent]:
        """Run a command; yield Output chunks as produced, then one ExitStatus.

        When the timeout fires, the command and every process it started are
        killed before the ExitStatus (exit 124) is yielded. If the consumer stops
        iterating early, the command is killed. A missing command yields exit 127.
        """

    @abc.abstractmethod
    async def stats(self, sandbox_id: str) -> SandboxStats:
        """Current resource use of a running sandbox."""

    @abc.abstractmethod
    async def status(self, sandbox_id: str) -> BackendStatus:
        """What the backend holds for `sandbox_id` (MISSING when nothing)."""

    @abc.abstractmethod
    async def list_sandboxes(self) -> list[str]:
        """Ids of every sandbox this backend holds anything for (for gc/reconcile)."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Release everything the sandbox holds: processes, cgroups, mounts, files.

        Always completes the release even when a graceful step fails, and a
        second call (or a call for an unknown id) is a harmless no-op.
        """

    async def exec(self, sandbox_id: str, request: ExecRequest) -> ExecResult:
        """Run a command to completion and collect its output."""
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        started = time.monotonic()
        status = ExitStatus(exit_code=-1)
        async for event in self.exec_stream(sandbox_id, request):
            if isinstance(event, Output):
                (stdout if event.stream == "stdout" else stderr).append(event.data)
            else:
                status = event
        return ExecResult(
            exit_code=status.exit_code,
            stdout=b"".join(stdout),
            stderr=b"".join(stderr),
            timed_out=status.timed_out,
            oom_killed=status.oom_killed,
            duration=status.duration or time.monotonic() - started,
            reason=status.reason,
        )

    async def put_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write `data` to `path` inside the sandbox as the sandbox user.

        The default goes through exec (`sh` and `cat` in the image), so the
        sandbox's own view of its filesystem and its permissions apply.
        """
        # Missing parent directories are made (as `mkdir -p`), like an upload expects.
        script = 'umask 077; mkdir -p -- "${1%/*}/" && cat > "$1" && chmod "$2" "$1"'
        result = await self.exec(
            sandbox_id,
            ExecRequest(["/bin/sh", "-c", script, "sh", path, format(mode, "o")], stdin=data),
        )
        if not result.ok:
            raise _file_error(sandbox_id, self.name, path, result)

    async def get_file(self, sandbox_id: str, path: str, max_bytes: int) -> bytes:
        """Read `path` from inside the sandbox; FileTooLargeError over `max_bytes`."""
        from corral.errors import FileTooLargeError

        script = 'test -f "$1" || { echo "not a regular file" >&2; exit 2; }; head -c "$2" "$1"'
        result = await self.exec(
            sandbox_id, ExecRequest(["/bin/sh", "-c", script, "sh", path, str(max_bytes + 1)])
        )
        if not result.ok:
            raise _file_error(sandbox_id, self.name, path, result)
        if len(result.stdout) > max_bytes:
            raise FileTooLargeError(
                f"'{path}' is larger than the limit of {max_bytes} bytes",
                sandbox_id=sandbox_id,
                backend=self.name,
                hint="raise the limit (--max-size) or copy a smaller file",
            )
        return result.stdout

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (Capability.PAUSE)."""
        raise UnsupportedError(f"{self.name} cannot pause sandboxes", backend=self.name)

    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox (Capability.PAUSE)."""
        raise UnsupportedError(f"{self.name} cannot resume sandboxes", backend=self.name)

    async def snapshot(self, sandbox_id: str, dest: Path) -> None:
        """Save the running sandbox's state (memory, processes, files) into the
        directory `dest` (Capability.SNAPSHOT); the sandbox is STOPPED after."""
        raise UnsupportedError(f"{self.name} cannot snapshot sandboxes", backend=self.name)

    async def restore(self, sandbox_id: str, source: Path) -> None:
        """Bring a snapshotted sandbox back RUNNING from `source` (Capability.SNAPSHOT):
        its processes go on where they were, its files are as they were."""
        raise UnsupportedError(f"{self.name} cannot restore sandboxes", backend=self.name)

    async def set_cpuset(self, sandbox_id: str, cpuset: str) -> None:
        """Pin the running sandbox to host CPUs `cpuset` (e.g. "2,3") without
        restarting it (Capability.CPUSET): after it returns, its processes run only
        there; on failure its pinning is unchanged."""
        raise UnsupportedError(f"{self.name} cannot re-pin running sandboxes", backend=self.name)

    async def published_ports(self, sandbox_id: str) -> list[PortMapping]:
        """The sandbox's published ports as bound on the host (host_port 0 resolved)."""
        return []

    async def recreate(self, config: SandboxConfig) -> None:
        """Destroy sandbox `config.sandbox_id` and create it again under `config`,
        keeping its writable disk (its scratch: /tmp, home, workdir); its processes
        restart. UnsupportedError, with the sandbox untouched, where the backend
        cannot keep the disk (the caller carries files over itself). After any
        other failure the sandbox is gone, as after a failed create."""
        raise UnsupportedError(
            f"{self.name} cannot re-create a sandbox with its disk kept", backend=self.name
        )

    async def attach_volume(self, sandbox_id: str, mount: HostMount) -> None:
        """Give the running sandbox a pet's volume (`mount`, writable) without
        restarting its processes: after it returns the volume is mounted at
        `mount.target`. UnsupportedError, with the sandbox untouched, where this
        backend or this sandbox cannot (a running container cannot gain a mount):
        the caller then re-creates the sandbox with the volume."""
        raise UnsupportedError(
            f"{self.name} cannot give a running sandbox a volume", backend=self.name
        )

    async def aclose(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release backend-wide resources (connections); sandboxes keep running."""


def _file_error(sandbox_id: str, backend: str, path: str, result: ExecResult) -> Exception:
    from corral.errors import NotFoundError

    tail = result.stderr.decode(errors="replace")[-500:]
    return NotFoundError(
        f"cannot access '{path}' in the sandbox (exit {result.exit_code})",
        sandbox_id=sandbox_id,
        backend=backend,
        stderr_tail=tail,
        hint="check the path exists and is writable by the sandbox user (e.g. under /work or /tmp)",
    )

"""What the podman backend does differently under gVisor (runsc): liveness and OOM
seen from the host, and checkpoint/restore (Podman's own needs CRIU)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from corral._sys import cgroups
from corral.backends.oci.execution import run
from corral.backends.oci.runtimes import OciRuntime, get_runtime
from corral.backends.podman.engine import RUNSC_EGRESS, RUNTIME_ROOTS
from corral.errors import UnsupportedError

CHECKPOINT_FILE = "checkpoint.img"


def sandbox_alive(cgroup: str) -> bool:
    """True while the cgroup holds a gVisor sandbox (sentry) process."""
    for pid in cgroups.pids(cgroup):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"runsc-sandbox"):
                return True
    return False


def kernel_reported_oom(cgroup: str) -> bool:
    """True when the kernel log has an OOM kill in `cgroup`.

    Once a gVisor sandbox has died of OOM, podman removes the container's cgroup
    and its oom_kill counter with it (and records no OOMKilled for runsc), so the
    kernel's own `oom-kill:... oom_memcg=<cgroup>,` line is what is left.
    """
    needle = f"oom_memcg={cgroup},".encode()
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return False
            except OSError as exc:  # EPIPE: records overwritten while reading; read on
                if exc.errno != errno.EPIPE:
                    return False
                continue
            if needle in record:
                return True
    finally:
        os.close(fd)


def snapshot_runtime(runtime_name: str, podman_runtime: str, sandbox_id: str) -> OciRuntime:
    """runsc for a sandbox that can be snapshotted; UnsupportedError saying why not."""
    runtime = get_runtime(runtime_name)
    if runtime.in_kernel:
        raise UnsupportedError(
            f"snapshots are not supported by {runtime.name} on this host: they need"
            " CRIU, which fails on this kernel",
            sandbox_id=sandbox_id,
            backend="podman",
            hint="create the sandbox with runtime='runsc' (gVisor checkpoints itself)",
        )
    if podman_runtime == RUNSC_EGRESS:
        raise UnsupportedError(
            "snapshots of an egress sandbox are not supported under gVisor: it uses"
            " the host's network stack (in its own namespace), which runsc cannot save",
            sandbox_id=sandbox_id,
            backend="podman",
            hint="snapshot sandboxes with network='none'",
        )
    return runtime


async def checkpoint(runtime: OciRuntime, container_id: str, dest: Path) -> str | None:
    """`runsc checkpoint` the container into `dest` (the sandbox exits); the
    runtime's error, or None on success."""
    dest.mkdir(parents=True, exist_ok=True)
    root = RUNTIME_ROOTS[runtime.name]
    rc, _, err = await run(
        runtime.command(root, "checkpoint", f"--image-path={dest}", container_id)
    )
    return None if rc == 0 else err.decode(errors="replace")[-1000:] or f"exit {rc}"


@contextlib.contextmanager
def staged_restore(restore_dir: Path, container_id: str, source: Path) -> Iterator[None]:
    """Within the block, the runsc wrapper restores `container_id` from `source`
    instead of creating it (see engine.runsc_wrapper)."""
    staged = restore_dir / container_id
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(str(source.resolve()))
    try:
        yield
    finally:
        staged.unlink(missing_ok=True)
        staged.with_suffix(".restored").unlink(missing_ok=True)

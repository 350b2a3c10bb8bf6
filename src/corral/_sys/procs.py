"""Find and kill host processes by session, reading /proc directly."""

from __future__ import annotations

import contextlib
import os
import signal


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not finished (a zombie has: only its
    parent can reap it)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def session_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[3])


def session_members(sid: int) -> list[int]:
    """Pids whose session id is `sid` (field 6 of /proc/PID/stat)."""
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL every process in session `sid`; returns how many were signalled.

    Children inherit the session even when re-parented, so this reaches a
    command's whole tree unless a member called setsid() itself.
    """
    members = session_members(sid)
    for pid in members:
        kill(pid)
    return len(members)


def has_environ_entry(pid: int, entry: bytes) -> bool:
    """True when `entry` (b"NAME=value") is in the process's initial environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return entry in environ.read().split(b"\0")
    except OSError:
        return False


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def use_pidfd_child_watcher() -> None:
    """Wait for subprocesses through pidfds instead of a thread each (Python 3.11's
    default starts a thread per child: ~1-2 ms per runtime call on a busy host).
    Python 3.12+ does this by itself; elsewhere (no pidfd_open) nothing changes."""
    import asyncio
    import sys

    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel without pidfds
        return
    watcher = asyncio.PidfdChildWatcher()
    asyncio.set_child_watcher(watcher)
    # From a running loop: attach to it (a later asyncio.run attaches by itself).
    with contextlib.suppress(RuntimeError):
        watcher.attach_loop(asyncio.get_running_loop())

"""Sandbox ids, and which process is in the middle of changing a record.

A record in a transition (creating, destroying) carries its owner, "host:pid";
reconcile settles it when that process is gone, or when it has been stuck longer
than STALE_TRANSITION_SECONDS.
"""

from __future__ import annotations

import os
import secrets
import socket

STALE_TRANSITION_SECONDS = 600.0


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


def this_process() -> str:
    """The owner tag written on records this process is changing ("host:pid")."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that tagged a record may still be working on it."""
    if owner is None:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another host's process: only the stale timeout settles it
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True

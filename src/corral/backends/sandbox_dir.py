"""On-disk pieces every local backend shares: the sandbox's directory and its scratch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral._sys import mounts
from corral.backends.base import SandboxConfig
from corral.errors import NotFoundError, SandboxStartError, UnsupportedError

# Writable places inside a sandbox, all on its one size-limited scratch tmpfs.
SCRATCH_DIRS = (("tmp", 0o1777), ("home", 0o755), ("work", 0o755))


def refuse_network(config: SandboxConfig, backend: str, hint: str) -> None:
    if config.network != "none":
        raise UnsupportedError(
            f"network '{config.network}' is not available on the {backend} backend",
            sandbox_id=config.sandbox_id,
            backend=backend,
            hint=hint,
        )


def sandbox_path(sandboxes_dir: Path, sandbox_id: str, backend: str) -> Path:
    """The sandbox's directory; an id that is not a plain name is unknown."""
    if "/" in sandbox_id or sandbox_id in ("", ".", ".."):
        raise NotFoundError(f"no sandbox '{sandbox_id}'", backend=backend)
    return sandboxes_dir / sandbox_id


def claim_dir(sandboxes_dir: Path, sandbox_id: str, backend: str) -> Path:
    """Create the sandbox's directory; SandboxStartError if the id is taken."""
    sandbox_dir = sandbox_path(sandboxes_dir, sandbox_id, backend)
    sandboxes_dir.mkdir(parents=True, exist_ok=True)
    try:
        sandbox_dir.mkdir()
    except FileExistsError:
        raise SandboxStartError(
            f"sandbox '{sandbox_id}' already exists", sandbox_id=sandbox_id, backend=backend
        ) from None
    return sandbox_dir


def make_scratch(sandbox_dir: Path, *, size: int, uid: int, gid: int) -> Path:
    """Mount the sandbox's scratch tmpfs (`size` bytes) with its /tmp, $HOME and
    workdir owned by `uid`:`gid` as the host sees them."""
    scratch = sandbox_dir / "scratch"
    scratch.mkdir()
    mounts.mount_tmpfs(scratch, size=size)
    for sub, mode in SCRATCH_DIRS:
        path = scratch / sub
        path.mkdir()
        os.chown(path, uid, gid)
        path.chmod(mode)
    return scratch


async def released_on_failure(
    work: Awaitable[None], destroy: Callable[[str], Awaitable[None]], sandbox_id: str
) -> None:
    """Await `work`; if it fails (or is cancelled), destroy the sandbox, then re-raise."""
    try:
        await work
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(destroy(sandbox_id))
        raise


def read_meta(sandbox_dir: Path, name: str, sandbox_id: str, backend: str) -> dict[str, Any]:
    """The JSON record a backend keeps in the sandbox's directory; NotFoundError when
    the sandbox (or a readable record of it) is not there."""
    try:
        data = json.loads((sandbox_dir / name).read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise NotFoundError(
            f"no sandbox '{sandbox_id}'",
            sandbox_id=sandbox_id,
            backend=backend,
            hint="list sandboxes with `corral ls`",
        )
    return data

"""Directories in and out of a sandbox as tar streams, packed and unpacked inside it
(as the sandbox user, with its own sh and tar), so nothing lands outside what it may
write and nothing is read that it could not."""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

from corral.backends.base import Backend, ExecEvent, ExecRequest, ExecResult, Output
from corral.errors import CorralError, ExecError, NotFoundError, UnsupportedError, UserError


async def unpack(backend: Backend, sandbox_id: str, path: str, tar: bytes) -> None:
    check_tar(tar)
    script = 'mkdir -p "$1" && tar -x -f - -C "$1"'
    result = await backend.exec(
        sandbox_id, ExecRequest(["/bin/sh", "-c", script, "sh", absolute(path)], stdin=tar)
    )
    if not result.ok:
        raise tar_error(sandbox_id, path, "unpack", result)


async def pack(
    backend: Backend, sandbox_id: str, path: str, check_size: Callable[[int], None]
) -> bytes:
    """The tar of `path`'s contents; `check_size` sees the running size and may refuse."""
    script = 'test -d "$1" || { echo "not a directory" >&2; exit 2; }; tar -c -f - -C "$1" .'
    request = ExecRequest(["/bin/sh", "-c", script, "sh", absolute(path)])
    chunks: list[bytes] = []
    stderr = b""
    size = 0
    stream = backend.exec_stream(sandbox_id, request)
    async with contextlib.aclosing(cast("AsyncGenerator[ExecEvent]", stream)) as events:
        async for event in events:
            if isinstance(event, Output):
                if event.stream == "stderr":
                    stderr += event.data
                    continue
                size += len(event.data)
                check_size(size)
                chunks.append(event.data)
            elif event.exit_code != 0:
                result = ExecResult(event.exit_code, b"", stderr)
                raise tar_error(sandbox_id, path, "pack", result)
    return b"".join(chunks)


def absolute(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise UserError(f"'{path}' is not an absolute path", hint="e.g. /work/src")
    return path


def check_tar(data: bytes) -> None:
    """UserError unless `data` is a readable tar stream (checked before any exec)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for _ in archive:
                pass
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(
            f"the upload is not a valid tar archive ({exc})",
            hint="send a tar stream, e.g. made by `tar -c -f - -C DIR .`",
        ) from None


def tar_error(sandbox_id: str, path: str, verb: str, result: ExecResult) -> CorralError:
    tail = result.stderr.decode(errors="replace")[-500:]
    facts: dict[str, Any] = {"sandbox_id": sandbox_id, "stderr_tail": tail}
    if result.exit_code == 127:
        return UnsupportedError(
            "the sandbox image has no sh and tar to move directories with",
            hint="use a template whose image has /bin/sh and tar, or copy single files",
            **facts,
        )
    if verb == "pack" and result.exit_code == 2:
        return NotFoundError(f"'{path}' is not a directory in the sandbox", **facts)
    if verb == "unpack":
        return UserError(
            f"cannot unpack into '{path}' (tar exited {result.exit_code})",
            hint="check the sandbox user may write there (e.g. under /work or /tmp)",
            **facts,
        )
    return ExecError(
        f"cannot {verb} '{path}' (tar exited {result.exit_code})",
        hint="check the sandbox user may read the directory",
        **facts,
    )

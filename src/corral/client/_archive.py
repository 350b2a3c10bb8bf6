"""Directory trees to and from the tar streams of the archive endpoints.

What comes back from a sandbox is untrusted: it is extracted with tarfile's
`data` filter; absolute names and members that filter refuses (`..` paths,
links leading out of the target, device files) are skipped and reported.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from corral.errors import NotFoundError, ServerUnavailableError


def pack_dir(local_dir: str | os.PathLike[str]) -> bytes:
    """A tar of the contents of `local_dir` (names relative to it; links kept as links)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFoundError(
            f"'{root}' is not a local directory", hint="upload_dir sends a directory's contents"
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name, recursive=True)
    return buffer.getvalue()


def unpack_into(data: bytes, local_dir: str | os.PathLike[str], *, sandbox_id: str) -> list[str]:
    """Extract `data` under `local_dir` (created if needed); the names of refused members."""
    target = Path(local_dir)
    target.mkdir(parents=True, exist_ok=True)
    refused: list[str] = []
    if not data:
        return refused

    def only_safe(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        try:
            # The data filter would strip a leading '/'; a name like that is refused instead.
            if member.name.startswith("/"):
                raise tarfile.AbsolutePathError(member)
            return tarfile.data_filter(member, dest)
        except tarfile.FilterError:
            refused.append(member.name.removeprefix("./"))
            return None

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.extractall(target, filter=only_safe)
    except tarfile.TarError as exc:
        raise ServerUnavailableError(
            f"the archive from sandbox {sandbox_id} is not a valid tar: {exc}",
            sandbox_id=sandbox_id,
            hint="the server may run a different Corral version",
        ) from exc
    return refused

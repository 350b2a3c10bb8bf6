"""The part of every rootfs that comes from the template, whatever the base.

Mount points, accounts, a few /etc basics and the template's [[files]], all
owned by the builder (root) with fixed modes, written without ever following
a symlink: a base's absolute symlinks would otherwise lead writes to the host.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from corral.errors import ImageBuildError
from corral.spec.template import Template, User

__all__ = ["home_of", "write_skeleton"]

_NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
# Directories the runtime mounts over (proc, sys, dev), the scratch, and
# /.corral, where the runtime binds its init.
_DIRECTORIES = (
    ("/proc", 0o555),
    ("/sys", 0o555),
    ("/dev", 0o755),
    ("/tmp", 0o1777),
    ("/etc", 0o755),
    ("/root", 0o700),
    ("/.corral", 0o755),
)


def home_of(user: User) -> str:
    """The user's home directory: /root for uid 0, else /home/<name>."""
    return "/root" if user.uid == 0 else f"/home/{user.name}"


def write_skeleton(rootfs: Path, template: Template) -> None:
    """Add the template's directories, accounts, /etc basics and files to `rootfs`.

    Runs after the base, so it wins over the base's /etc/hosts, hostname and
    nsswitch.conf; a base's other accounts (Debian's system users) are kept.
    """
    user = template.user
    home = home_of(user)
    bound_usr = template.base == "host"  # the host's /usr hides whatever is put there
    for path in (template.workdir, home, *(f.path for f in template.files)):
        if bound_usr and _under(path, "/usr"):
            raise ImageBuildError(
                f"'{path}' is under /usr, which base 'host' replaces with the host's /usr",
                hint="put files, the workdir and the home directory elsewhere (e.g. /opt)",
            )
    for path, mode in _DIRECTORIES:
        _make_dir(rootfs, path, mode)
    for path in (home, template.workdir):
        _make_dir(rootfs, path, 0o700 if path == "/root" else 0o755)
    for mount in template.mounts:
        # Under base host a target in /usr must already exist in the host's /usr.
        if not (bound_usr and _under(mount.target, "/usr")):
            _make_dir(rootfs, mount.target, 0o755)
    if template.volume is not None:  # a pet's volume is bound here
        _make_dir(rootfs, template.volume.path, 0o755)

    root_entries = ("root:x:0:0:root:/root:/bin/sh", "root:x:0:")
    user_entries = (
        f"{user.name}:x:{user.uid}:{user.gid}:{user.name}:{home}:/bin/sh",
        f"{user.name}:x:{user.gid}:",
    )
    for index, name in enumerate(("passwd", "group")):
        existing = rootfs / "etc" / name
        text = existing.read_text() if existing.is_file() and not existing.is_symlink() else ""
        entries = [root_entries[index]] + ([user_entries[index]] if user.name != "root" else [])
        _write_file(rootfs, f"/etc/{name}", _merge_accounts(text, entries), 0o644)
    _write_file(rootfs, "/etc/hosts", _HOSTS, 0o644)
    _write_file(rootfs, "/etc/hostname", "sandbox\n", 0o644)
    _write_file(rootfs, "/etc/nsswitch.conf", _NSSWITCH, 0o644)
    for entry in template.files:
        _write_file(rootfs, entry.path, entry.content, int(entry.mode, 8))


def _merge_accounts(existing: str, entries: list[str]) -> str:
    """`entries` (root first, the user last) around the base's other accounts."""
    names = {entry.split(":", 1)[0] for entry in entries}
    kept = [line for line in existing.splitlines() if line and line.split(":", 1)[0] not in names]
    return "\n".join([entries[0], *kept, *entries[1:]]) + "\n"


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def _refuse_symlink(rootfs: Path, path: str, current: Path) -> None:
    if current.is_symlink():
        raise ImageBuildError(
            f"'{path}' goes through the symlink '/{current.relative_to(rootfs)}' in the image",
            hint="use the path the symlink points to in the template instead",
        )


def _make_dir(rootfs: Path, path: str, mode: int, *, set_mode: bool = True) -> None:
    """Create `path` and missing parents (0755); `mode` applies to `path` itself."""
    current = rootfs
    parts = PurePosixPath(path).parts[1:]
    for depth, part in enumerate(parts, 1):
        current = current / part
        _refuse_symlink(rootfs, path, current)
        last = depth == len(parts)
        if not current.exists():
            current.mkdir()
            os.chmod(current, mode if last else 0o755)  # chmod: the umask must not matter
        elif not current.is_dir():
            raise ImageBuildError(
                f"'{path}' needs '/{current.relative_to(rootfs)}' to be a directory, "
                "but it is a file in the image",
                hint="fix the template's files, workdir or mount targets",
            )
        elif last and set_mode:
            os.chmod(current, mode)


def _write_file(rootfs: Path, path: str, content: str, mode: int) -> None:
    _make_dir(rootfs, str(PurePosixPath(path).parent), 0o755, set_mode=False)
    target = rootfs / path.lstrip("/")
    _refuse_symlink(rootfs, path, target)
    if target.is_dir():
        raise ImageBuildError(
            f"cannot write the file '{path}': it is a directory in the image",
            hint="choose another path for this [[files]] entry",
        )
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
        os.fchmod(handle.fileno(), mode)

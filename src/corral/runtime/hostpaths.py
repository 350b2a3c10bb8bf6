"""Resolve special mount sources in templates (e.g. `@rust-sysroot`) to host paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path


def resolve_mount_source(source: str) -> Path | None:
    """A host path for `source`, or None when a special source has no match here."""
    if source == "@rust-sysroot":
        return rust_sysroot()
    return Path(source)


@cache
def rust_sysroot() -> Path | None:
    """The host's Rust toolchain directory, or None when rustc lives in /usr (Debian's).

    Reads rustup's settings first: `rustc --print sysroot` through the rustup
    proxy costs tens of milliseconds on every sandbox create.
    """
    rustup_home = Path(os.environ.get("RUSTUP_HOME", Path.home() / ".rustup"))
    settings = rustup_home / "settings.toml"
    if settings.is_file():
        try:
            default = tomllib.loads(settings.read_text()).get("default_toolchain")
        except (OSError, tomllib.TOMLDecodeError):
            default = None
        if isinstance(default, str):
            candidates = sorted((rustup_home / "toolchains").glob(f"{default}*"))
            for candidate in candidates:
                if (candidate / "bin" / "rustc").exists():
                    return candidate
    rustc = shutil.which("rustc")
    if rustc is None:
        return None
    try:
        out = subprocess.run(
            [rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    sysroot = Path(out)
    return None if sysroot == Path("/usr") or not sysroot.is_dir() else sysroot

"""`corral host prepare`: apply the safe, idempotent host fixes that `doctor` asks for.

It mounts a v1 hugetlb hierarchy on hybrid hosts (so crun works) and creates the
state directory. It installs nothing and loads no modules: missing packages are
reported with the `apt-get install` line (the README's set-up script runs it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from corral.host.doctor import (
    HUGETLB_FIX,
    STATE_DIR,
    TOOLS,
    cgroup_layout,
    is_static_elf,
    locate,
)

STATE_DIR_MODE = 0o755  # runtimes in user namespaces must traverse it to reach bundles


@dataclass(frozen=True)
class Action:
    """One step of `prepare`.

    `done` is True when the host is in the wanted state after the call (changed now,
    or already so); False when it is still to do (a dry run, a failure, or a manual
    step such as installing packages, spelled out in `detail`).
    """

    description: str
    done: bool
    detail: str


def _mount_cgroup_v1(target: Path, controller: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    rc = libc.mount(b"cgroup", os.fsencode(target), b"cgroup", 0, controller.encode())
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount -t cgroup -o {controller} on {target}: {os.strerror(errno)}")


def _hugetlb_action(cgroup_root: Path, dry_run: bool) -> Action:
    what = "move hugetlb out of the cgroup v2 hierarchy (crun refuses hybrid mode otherwise)"
    layout = cgroup_layout(cgroup_root)
    target = cgroup_root / "hugetlb"
    if "hugetlb" in layout.v1_hierarchies:
        return Action(what, True, f"a v1 hugetlb hierarchy is already mounted at {target}")
    if not layout.hugetlb_blocks_crun:
        return Action(what, True, f"not needed: cgroups are {layout.mode} without hugetlb in v2")
    if dry_run:
        return Action(what, False, f"would run: {HUGETLB_FIX.format(cgroup_root)}")
    created = not target.exists()
    try:
        target.mkdir(exist_ok=True)  # the cgroup root is a tmpfs here: the mount point may be new
        _mount_cgroup_v1(target, "hugetlb")
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()
        return Action(what, False, f"failed: {exc}; by hand: {HUGETLB_FIX.format(cgroup_root)}")
    if cgroup_layout(cgroup_root).hugetlb_blocks_crun:
        return Action(what, False, f"mounted {target}, but hugetlb is still listed in v2")
    return Action(what, True, f"mounted a v1 hugetlb hierarchy at {target} (keep it mounted)")


def _state_dir_action(state_dir: Path, dry_run: bool) -> Action:
    what = "create the state directory"
    if state_dir.is_dir():
        return Action(what, True, f"{state_dir} already exists")
    if dry_run:
        return Action(what, False, f"would create {state_dir} (mode {STATE_DIR_MODE:o})")
    try:
        state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        return Action(what, False, f"failed: {exc}; set CORRAL_STATE_DIR to a writable path")
    return Action(what, True, f"created {state_dir}")


def missing_packages(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Debian packages to install: (required, optional), judged from what is on PATH."""
    required: list[str] = []
    optional: list[str] = []
    for tool in TOOLS:
        path = locate(tool, environ)
        if path is None or (tool.static and not is_static_elf(path.resolve())):
            (required if tool.required else optional).append(tool.package)
    return required, optional


def _package_actions(environ: Mapping[str, str]) -> list[Action]:
    required, optional = missing_packages(environ)
    if not required and not optional:
        return [Action("install packages", True, "every package Corral uses is installed")]
    actions = []
    if required:
        detail = "apt-get install -y " + " ".join(required)
        actions.append(Action("install required packages (not done by prepare)", False, detail))
    if optional:
        detail = "apt-get install -y " + " ".join(optional)
        what = "install packages for optional runtimes, backends and bases (not done by prepare)"
        actions.append(Action(what, False, detail))
    return actions


def prepare_host(
    *,
    dry_run: bool = False,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    environ: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
) -> list[Action]:
    """Apply the safe fixes (each idempotent) and list what is left to do by hand.

    With `dry_run`, nothing on the host changes; the actions say what would be done.
    """
    env = os.environ if environ is None else environ
    state = state_dir or Path(env.get("CORRAL_STATE_DIR", STATE_DIR))
    return [
        _hugetlb_action(cgroup_root, dry_run),
        _state_dir_action(state, dry_run),
        *_package_actions(env),
    ]

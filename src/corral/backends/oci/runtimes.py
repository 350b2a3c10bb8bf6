"""What differs between the OCI runtimes Corral drives: flags, user namespaces, messages."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.errors import BackendUnavailableError


@dataclass(frozen=True, slots=True)
class OciRuntime:
    """One OCI runtime CLI (crun, runc or runsc) and its quirks."""

    name: str
    apt_package: str
    user_namespace: bool  # run sandboxes in a user namespace (host root never inside)
    force_flag: str  # `delete` flag that kills a running container
    extra_global: tuple[str, ...] = ()
    in_kernel: bool = True  # processes are host processes (not inside a gVisor sentry)
    missing_command: re.Pattern[str] = re.compile(r"executable file .* not found|no such file")

    def binary(self) -> str:
        path = _which(self.name)
        if path is None:
            raise BackendUnavailableError(
                f"OCI runtime '{self.name}' is not installed",
                backend="oci",
                hint=f"apt-get install {self.apt_package} (or run `corral host prepare`)",
            )
        return path

    def command(self, root: Path, *args: str) -> list[str]:
        return [self.binary(), "--root", str(root), *self.extra_global, *args]


def _which(name: str) -> str | None:
    """shutil.which, remembered once found (it stats every PATH entry per call)."""
    path = _FOUND.get(name)
    if path is None or not os.access(path, os.X_OK):
        path = _FOUND[name] = shutil.which(name)
    return path


_FOUND: dict[str, str | None] = {}

RUNTIMES: dict[str, OciRuntime] = {
    "crun": OciRuntime(
        "crun",
        "crun",
        user_namespace=True,
        force_flag="--force",
        missing_command=re.compile(r"executable file `.*` not found"),
    ),
    "runc": OciRuntime(
        "runc",
        "runc",
        user_namespace=True,
        force_flag="--force",
        missing_command=re.compile(r"executable file not found|no such file or directory"),
    ),
    # Debian's runsc (2022) misdetects the root netns on new kernels: --network=none.
    # Its KVM platform hangs here; ptrace works. The sentry is its own user namespace.
    "runsc": OciRuntime(
        "runsc",
        "runsc",
        user_namespace=False,
        force_flag="-force",
        extra_global=("--network=none", "--platform=ptrace"),
        in_kernel=False,
        missing_command=re.compile(r"failed to load .*: no such file or directory"),
    ),
}


def get_runtime(name: str) -> OciRuntime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise BackendUnavailableError(
            f"unknown OCI runtime '{name}'",
            backend="oci",
            hint="choose one of: " + ", ".join(RUNTIMES),
        ) from None

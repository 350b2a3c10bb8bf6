"""Corral's own Podman: config files under the state dir and the CLI run against them.

Every podman call gets CONTAINERS_CONF and CONTAINERS_STORAGE_CONF pointing at
`<state>/podman/`, so Corral never reads or edits the host's /etc/containers
files and two Corral installs on one host never see each other's containers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from corral.backends.oci.bundle import NOFILE, seccomp_profile
from corral.errors import BackendUnavailableError

# Podman's rootful default (nofile/nproc 1048576) fails under our hard nofile limit
# of 20000 (DESIGN.md). A --ulimit flag replaces the whole default list, so every
# container gets both explicitly.
NPROC = 4096
ULIMITS = (f"nofile={NOFILE}:{NOFILE}", f"nproc={NPROC}:{NPROC}", "core=0:0")

# Debian's runsc (2022) misdetects the root netns on new kernels and its KVM
# platform hangs here: podman runs it through wrappers that add these flags. An
# `egress` sandbox runs on "runsc-egress": gVisor's host network mode, inside the
# network namespace Podman made and slirp4netns serves (never the host's own).
RUNSC_FLAGS = ("--network=none", "--platform=ptrace")
RUNSC_EGRESS_FLAGS = ("--network=host", "--platform=ptrace")
RUNSC_EGRESS = "runsc-egress"
# Where each runtime keeps its containers' state when Podman runs it as root (its
# default --root): Corral's exec and checkpoint talk to the runtime directly there.
RUNTIME_ROOTS = {
    "crun": Path("/run/crun"),
    "runc": Path("/run/runc"),
    "runsc": Path("/var/run/runsc"),
}


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def error(self) -> str:
        return self.stderr.decode(errors="replace").strip()[-1000:]


class Podman:
    """The podman CLI bound to Corral's configuration under `<state_dir>/podman`."""

    def __init__(self, state_dir: Path) -> None:
        self.home = Path(state_dir) / "podman"
        self.storage_conf = self.home / "storage.conf"
        self.containers_conf = self.home / "containers.conf"
        # The oci backend's deny-list: Podman's default profile allows ptrace and more.
        self.seccomp_profile = self.home / "seccomp.json"
        # Checkpoints staged for the runsc wrapper to restore at the next start.
        self.restore_dir = self.home / "restore"
        self._ready = False

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
        }

    def binary(self) -> str:
        path = shutil.which("podman")
        if path is None:
            raise BackendUnavailableError(
                "podman is not installed",
                backend="podman",
                hint="apt-get install podman fuse-overlayfs slirp4netns uidmap "
                "(or run scripts/setup)",
            )
        return path

    def ensure_config(self) -> None:
        """Write Corral's storage.conf, containers.conf, seccomp profile and runsc
        wrapper (idempotent)."""
        if self._ready:
            return
        self.home.mkdir(parents=True, exist_ok=True)
        wrapper = self.home / "bin" / "runsc"
        egress_wrapper = self.home / "bin" / RUNSC_EGRESS
        files = {
            self.storage_conf: storage_conf(self.home),
            self.containers_conf: containers_conf(self.home, runsc=wrapper),
            self.home / "policy.json": POLICY,
            self.seccomp_profile: json.dumps(seccomp_profile(), indent=1) + "\n",
            wrapper: runsc_wrapper(RUNSC_FLAGS, self.restore_dir),
            egress_wrapper: runsc_wrapper(RUNSC_EGRESS_FLAGS, self.restore_dir),
        }
        for path, text in files.items():
            executable = path in (wrapper, egress_wrapper)
            _write_if_changed(path, text, mode=0o755 if executable else 0o644)
        self._ready = True

    def command(self, *args: str) -> list[str]:
        self.ensure_config()
        return [self.binary(), *args]

    async def run(self, *args: str) -> Completed:
        proc = await asyncio.create_subprocess_exec(
            *self.command(*args),
            env=self.env,
            cwd=self.home,  # conmon inherits it and drops an `oom` file there on OOM
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return Completed(proc.returncode or 0, out, err)


def storage_conf(home: Path) -> str:
    # skip_mount_home: c/storage would otherwise keep a private bind mount of
    # graphroot/overlay for as long as the host runs.
    return (
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{home / "storage"}"\n'
        f'runroot = "{home / "run"}"\n'
        "\n[storage.options.overlay]\n"
        'skip_mount_home = "true"\n'
    )


def containers_conf(home: Path, *, runsc: Path) -> str:
    ulimits = ", ".join(f'"{u}"' for u in ULIMITS)
    return (
        "[containers]\n"
        f"default_ulimits = [{ulimits}]\n"
        'netns = "none"\n'
        'log_driver = "k8s-file"\n'
        "\n[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{home / "events.log"}"\n'
        f'tmp_dir = "{home / "tmp"}"\n'
        'runtime = "crun"\n'
        "\n[engine.runtimes]\n"
        'crun = ["/usr/bin/crun", "/usr/local/bin/crun"]\n'
        'runc = ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/bin/runc"]\n'
        f'runsc = ["{runsc}"]\n'
        f'{RUNSC_EGRESS} = ["{runsc.with_name(RUNSC_EGRESS)}"]\n'
        "\n[network]\n"
        f'network_config_dir = "{home / "networks"}"\n'
    )


def runsc_wrapper(flags: tuple[str, ...], restore_dir: Path) -> str:
    """runsc with Corral's flags. Podman starts a container with `runsc create ID`
    then `runsc start ID`: for a checkpoint staged at `restore_dir/ID` (a file
    naming its directory) they become `runsc restore --detach` and a no-op."""
    runsc = shutil.which("runsc") or "/usr/bin/runsc"
    return f"""#!/bin/sh
runsc="{runsc} {" ".join(flags)}"
staged="{restore_dir}"
for id; do :; done
if [ -n "$id" ] && [ -f "$staged/$id" ]; then
  image=$(cat "$staged/$id")
  for arg; do
    shift
    if [ "$arg" = create ]; then
      set -- "$@" restore --detach "--image-path=$image"
      : > "$staged/$id.restored"
    else
      set -- "$@" "$arg"
    fi
  done
fi
if [ -n "$id" ] && [ -f "$staged/$id.restored" ]; then
  for arg; do
    if [ "$arg" = start ]; then rm -f "$staged/$id.restored"; exit 0; fi
  done
fi
exec $runsc "$@"
"""


# Images come only from Corral's own OCI layouts, so no signature policy applies.
POLICY = json.dumps({"default": [{"type": "insecureAcceptAnything"}]}) + "\n"


def _write_if_changed(path: Path, text: str, *, mode: int) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(text)
    temp.chmod(mode)
    os.replace(temp, path)

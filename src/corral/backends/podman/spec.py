"""The Podman container spec (libpod "specgen") of a sandbox: locked down like the oci bundle.

What `podman run` flags would say, as the JSON the REST API takes: `podman
inspect` shows the same limits, labels and lockdown either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.backends.base import SandboxConfig
from corral.backends.oci.bundle import NOFILE, SANDBOX_INIT, UID_BASE, UID_RANGE
from corral.backends.oci.runtimes import get_runtime
from corral.backends.podman.engine import NPROC

# Under gVisor the host cgroup also counts the sentry's and gofer's own threads and
# the ptrace platform's stub processes (~60 at idle through podman): without this
# headroom a busy sandbox's sentry dies of EAGAIN well before `limits.pids`.
RUNSC_PIDS_OVERHEAD = 128
SANDBOX_LABEL = "io.corral.sandbox-id"
TENANT_LABEL = "io.corral.tenant"
# The address slirp4netns gives the host inside an `egress` sandbox (its 10.0.2.2).
SLIRP_HOST = "10.0.2.2"


def pids_overhead(runtime: str) -> int:
    return RUNSC_PIDS_OVERHEAD if get_runtime(runtime).in_kernel is False else 0


def sandbox_env(config: SandboxConfig) -> dict[str, str]:
    """The environment of the sandbox's processes (exec adds the request's)."""
    image = config.image
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": image.home,
        **image.env,
        **config.env,
    }


def container_spec(
    config: SandboxConfig,
    *,
    runtime: str,
    container: str,
    image_name: str,
    scratch: Path,
    support_dir: Path,
    cgroup_parent: str,
    seccomp_profile: Path,
    host_loopback: bool = False,
) -> dict[str, Any]:
    """The create body for `config`. `host_loopback`: an egress sandbox may reach the
    host's 127.0.0.1 at 10.0.2.2 (tests; off by default, as it exposes host services)."""
    image = config.image
    limits = config.limits
    labels = {SANDBOX_LABEL: config.sandbox_id}
    if "tenant" in config.labels:
        labels[TENANT_LABEL] = config.labels["tenant"]
    labels |= {f"io.corral.label.{key}": value for key, value in config.labels.items()}
    mounts = [_bind(support_dir, SANDBOX_INIT.rsplit("/", 1)[0], "ro")]
    for sub, target in (("tmp", "/tmp"), ("home", image.home), ("work", image.workdir)):
        mounts.append(_bind(scratch / sub, target, "rw"))
    mounts += [
        _bind(mount.source, mount.target, "rw" if mount.writable else "ro")
        for mount in config.mounts
    ]
    quota_period = 100_000
    cpu: dict[str, Any] = {"quota": int(limits.vcpus * quota_period), "period": quota_period}
    if limits.cpuset:
        cpu["cpus"] = limits.cpuset
    spec: dict[str, Any] = {
        "name": container,
        "image": image_name,
        "command": [SANDBOX_INIT, "-P"],
        "oci_runtime": runtime,  # informative: Podman 4.3 takes the service's runtime
        "hostname": config.sandbox_id,
        "labels": labels,
        "env": sandbox_env(config),
        "user": f"{image.uid}:{image.gid}",
        "read_only_filesystem": True,
        "cap_drop": ["all"],
        "no_new_privileges": True,
        "seccomp_profile_path": str(seccomp_profile),
        # Private IPC: /dev/shm is a tmpfs inside the sandbox, not a host mount that
        # podman must unmount (and that races its own cleanup on removal).
        "ipcns": {"nsmode": "private"},
        "netns": {"nsmode": "none"},
        "resource_limits": {
            "memory": {"limit": limits.memory, "swap": limits.memory},
            "pids": {"limit": limits.pids + pids_overhead(runtime)},
            "cpu": cpu,
        },
        "r_limits": [
            {"type": "nofile", "soft": NOFILE, "hard": NOFILE},
            {"type": "nproc", "soft": NPROC, "hard": NPROC},
            {"type": "core", "soft": 0, "hard": 0},
        ],
        "cgroup_parent": cgroup_parent,
        "systemd": "false",
        "stop_timeout": 0,  # stop = SIGKILL: nothing in a sandbox gets a grace period
        "mounts": mounts,
    }
    if config.network == "egress":
        spec["netns"] = {"nsmode": "slirp4netns"}
        options = [f"allow_host_loopback={'true' if host_loopback else 'false'}"]
        spec["network_options"] = {"slirp4netns": options}
    if get_runtime(runtime).user_namespace:
        # Container ids 0-65535 are host UID_BASE+: host root is never inside. (runsc
        # runs without one, as on the oci backend: gVisor's sentry is the boundary.)
        mapping = [{"container_id": 0, "host_id": UID_BASE, "size": UID_RANGE}]
        spec["userns"] = {"nsmode": "private"}
        spec["idmappings"] = {"UIDMap": mapping, "GIDMap": mapping}
    return spec


def _bind(source: Path, target: str, mode: str) -> dict[str, Any]:
    return {
        "destination": target,
        "source": str(source),
        "type": "bind",
        "options": ["rbind", mode, "nosuid", "nodev"],
    }

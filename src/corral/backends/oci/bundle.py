"""OCI runtime bundle (config.json) for a sandbox: locked down by default.

All namespaces (user namespace where the runtime supports it), no capabilities,
no_new_privileges, a seccomp deny-list, masked /proc paths, a read-only root
with a size-limited scratch, cgroup limits and rlimits below the host's hard
nofile limit.
"""

from __future__ import annotations

from typing import Any

from corral.backends.base import SandboxConfig

# Host uids that sandbox uids 0..65535 map to. Host root is never inside.
UID_BASE = 200_000
UID_RANGE = 65_536

# rlimits that work under a host hard nofile limit of 20000 (see DESIGN.md).
NOFILE = 4096

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# Syscalls no sandbox needs: kernel modules, mounts, namespaces, tracing of the
# host, clocks, keyrings, bpf, io_uring. They fail with EPERM.
DENIED_SYSCALLS = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
    "vm86",
    "vm86old",
)

SANDBOX_INIT = "/.corral/init"

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)


def seccomp_profile() -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            # clone(CLONE_NEW*) would give a new namespace (a user namespace gets
            # capabilities in it); clone3 cannot be filtered, so glibc falls back to clone.
            *(
                {
                    "names": ["clone"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 1,
                    "args": [
                        {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
                    ],
                }
                for flag in CLONE_NAMESPACE_FLAGS
            ),
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        ],
    }


def process_spec(
    *, uid: int, gid: int, args: list[str], env: dict[str, str], cwd: str
) -> dict[str, Any]:
    """An OCI `process`: no capabilities, no_new_privileges, rlimits under the host's."""
    no_caps: dict[str, list[str]] = {
        k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
    }
    return {
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "capabilities": no_caps,
        "noNewPrivileges": True,
        "rlimits": [
            {"type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE},
            {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
        ],
    }


def make_config(
    config: SandboxConfig,
    *,
    scratch: str,
    support_dir: str,
    cgroup_path: str,
    user_namespace: bool,
    seccomp: bool = True,
) -> dict[str, Any]:
    """The config.json for `config`; `scratch` is the host dir of its writable storage."""
    image = config.image
    limits = config.limits
    env = {"HOME": image.home, **image.env, **config.env}
    mounts: list[dict[str, Any]] = [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": SANDBOX_INIT.rsplit("/", 1)[0],
            "type": "bind",
            "source": support_dir,
            "options": ["rbind", "ro", "nosuid", "nodev"],
        },
    ]
    for sub, target in (("tmp", "/tmp"), ("home", image.home), ("work", image.workdir)):
        mounts.append(
            {
                "destination": target,
                "type": "bind",
                "source": f"{scratch}/{sub}",
                "options": ["rbind", "rw", "nosuid", "nodev"],
            }
        )
    for mount in config.mounts:
        mounts.append(
            {
                "destination": mount.target,
                "type": "bind",
                "source": str(mount.source),
                "options": ["rbind", "rw" if mount.writable else "ro", "nosuid", "nodev"],
            }
        )

    quota_period = 100_000
    resources: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}],
        "memory": {"limit": limits.memory, "swap": limits.memory},
        "pids": {"limit": limits.pids},
        "cpu": {"quota": int(limits.vcpus * quota_period), "period": quota_period},
    }
    if limits.cpuset:
        resources["cpu"]["cpus"] = limits.cpuset

    namespaces = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    linux: dict[str, Any] = {
        "resources": resources,
        "cgroupsPath": cgroup_path,
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if seccomp:
        linux["seccomp"] = seccomp_profile()
    if user_namespace:
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [{"containerID": 0, "hostID": UID_BASE, "size": UID_RANGE}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": UID_BASE, "size": UID_RANGE}]

    return {
        "ociVersion": "1.0.2",
        "process": process_spec(
            uid=image.uid, gid=image.gid, args=[SANDBOX_INIT, "-P"], env=env, cwd="/"
        ),
        "root": {"path": str(image.rootfs), "readonly": True},
        "hostname": config.sandbox_id,
        "mounts": mounts,
        "annotations": {f"io.corral.label.{k}": v for k, v in config.labels.items()}
        | {"io.corral.sandbox-id": config.sandbox_id},
        "linux": linux,
    }

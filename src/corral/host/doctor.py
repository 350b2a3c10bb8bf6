"""`corral host doctor`: what this host can run, and the concrete fix for what it cannot.

Probes read through injectable roots (/proc, /sys, /dev, cgroups, PATH) so tests fake a host.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from corral._sys import cgroups
from corral.backends.microvm.host import Accelerator, accelerator
from corral.backends.microvm.settings import MicrovmSettings
from corral.backends.oci.backend import CGROUP_PARENT
from corral.backends.oci.runtimes import RUNTIMES
from corral.backends.podman.engine import Podman

if TYPE_CHECKING:
    from rich.table import Table

Status = Literal["ok", "warn", "fail"]
STATE_DIR = "/var/lib/corral"  # unless $CORRAL_STATE_DIR says otherwise
CRUN_HYBRID_ERROR = "cgroups in hybrid mode not supported"
HUGETLB_FIX = "mkdir -p {0}/hugetlb && mount -t cgroup -o hugetlb cgroup {0}/hugetlb"
NOFILE_WANTED = 65536
SANDBOX_NOFILE = 4096  # what Corral sets inside sandboxes; the host's hard limit must allow it
NPROC_WANTED = 4096
PVM_WARNING = (
    "KVM present but is PVM (or no hardware virtualization): stock guest kernels do not boot;"
    " the microVM backend uses TCG"
)
RUNSC_NETWORK_NOTE = (
    "runsc misdetects the root network namespace on this kernel;"
    " Corral runs gVisor with --network=none"
)


@dataclass(frozen=True)
class Check:
    """One finding about the host; `fix` says what to run or change when it is not ok."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Tool:
    """A host binary Corral uses, the Debian package that ships it, and why it matters."""

    binary: str
    package: str
    purpose: str
    required: bool  # missing -> fail (else warn: only one backend or base needs it)
    static: bool = False  # bound into sandboxes, so it must not need a dynamic loader
    version_args: tuple[str, ...] = ("--version",)


TOOLS: tuple[Tool, ...] = (  # crun, the default runtime, is required; runc and runsc are not
    *(
        Tool(r.name, r.apt_package, f"runtime={r.name}", r.name == "crun")
        for r in RUNTIMES.values()
    ),
    Tool("podman", "podman", "the podman backend", required=False),
    Tool("qemu-system-x86_64", "qemu-system-x86", "the microVM backend", required=False),
    Tool("catatonit", "catatonit", "the init bound into every sandbox", True, static=True),
    Tool("busybox", "busybox-static", "the 'busybox' base", False, static=True, version_args=()),
    Tool("mmdebstrap", "mmdebstrap", "the 'debian:bookworm' base", required=False),
)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def locate(tool: Tool, environ: Mapping[str, str]) -> Path | None:
    """Where `tool` is on the PATH of `environ` (None when missing)."""
    found = shutil.which(tool.binary, path=environ.get("PATH", os.defpath))
    return Path(found) if found else None


def is_static_elf(path: Path) -> bool:
    """True for an ELF file without a PT_INTERP header (it needs no dynamic loader)."""
    try:
        with path.open("rb") as elf:
            data = elf.read(1 << 16)  # the program headers follow the ELF header
    except OSError:
        return False
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return False
    order = "<" if data[5] == 1 else ">"
    wide = data[4] == 2  # ELFCLASS64
    (phoff,) = struct.unpack_from(order + ("Q" if wide else "I"), data, 32 if wide else 28)
    phentsize, phnum = struct.unpack_from(order + "HH", data, 54 if wide else 42)
    offsets = range(phoff, phoff + phentsize * phnum, phentsize)
    if phentsize < 4 or offsets.stop > len(data):
        return False
    return all(struct.unpack_from(order + "I", data, at)[0] != 3 for at in offsets)  # PT_INTERP


def tool_version(path: Path, args: tuple[str, ...]) -> str:
    """First non-empty output line of `<path> <args>` ('' when it prints nothing)."""
    argv = [str(path), *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    lines = (line.strip() for line in (out.stdout + "\n" + out.stderr).splitlines())
    return next((line for line in lines if line), "")


@dataclass(frozen=True)
class CgroupLayout:
    mode: Literal["v1", "v2", "hybrid", "none"]
    v1_hierarchies: tuple[str, ...]  # directories under the root holding a v1 hierarchy
    v2_controllers: tuple[str, ...]  # controllers bound to the v2 hierarchy

    @property
    def hugetlb_blocks_crun(self) -> bool:
        """crun refuses hybrid hosts while hugetlb sits in the v2 hierarchy."""
        return self.mode == "hybrid" and "hugetlb" in self.v2_controllers


def cgroup_layout(cgroup_root: Path = Path("/sys/fs/cgroup")) -> CgroupLayout:
    """Classify the host as cgroup v1, v2 (unified), hybrid, or none mounted."""
    if (cgroup_root / "cgroup.controllers").exists():
        return CgroupLayout("v2", (), tuple(_read(cgroup_root / "cgroup.controllers").split()))
    entries = sorted(cgroup_root.iterdir()) if cgroup_root.is_dir() else []
    v1 = tuple(p.name for p in entries if not p.is_symlink() and (p / "tasks").exists())
    unified = cgroup_root / "unified" / "cgroup.controllers"
    if unified.exists():
        return CgroupLayout("hybrid", v1, tuple(_read(unified).split()))
    return CgroupLayout("v1" if v1 else "none", v1, ())


def _hard_limit(proc_root: Path, label: str, which: int) -> int | None:
    """A hard rlimit (None = unlimited) from <proc>/self/limits, else from getrlimit()."""
    for line in _read(proc_root / "self" / "limits").splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 3 and parts[0] == label:
            return None if parts[2] == "unlimited" else int(parts[2])
    hard = resource.getrlimit(which)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def _check_tool(tool: Tool, environ: Mapping[str, str]) -> tuple[Check, str | None]:
    missing: Status = "fail" if tool.required else "warn"
    fix = f"apt-get install {tool.package}"
    path = locate(tool, environ)
    if path is None:
        return Check(tool.binary, missing, f"not installed (needed for {tool.purpose})", fix), None
    if tool.static and not is_static_elf(path.resolve()):
        return Check(tool.binary, missing, f"{path} is dynamically linked", fix), None
    try:
        version = tool_version(path, tool.version_args)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check(tool.binary, missing, f"{path} does not run: {exc}", fix), None
    return Check(tool.binary, "ok", f"{version or 'installed'} ({path})"), version


def _check_cgroups(cgroup_root: Path) -> Check:
    layout = cgroup_layout(cgroup_root)
    if layout.mode == "none":
        fix = f"mount -t cgroup2 cgroup2 {cgroup_root}"
        return Check("cgroups", "fail", f"none mounted under {cgroup_root}", fix)
    if layout.mode == "v2":
        return Check("cgroups", "ok", f"v2 (unified): {' '.join(layout.v2_controllers)}")
    v1 = f"v1 controllers: {' '.join(layout.v1_hierarchies)}"
    if layout.mode == "v1":
        return Check("cgroups", "ok", f"v1 ({v1})")
    detail = f"hybrid ({v1}; cgroup2 at {cgroup_root / 'unified'})"
    if layout.hugetlb_blocks_crun:
        detail += f"; hugetlb sits in the v2 hierarchy, so crun fails: '{CRUN_HYBRID_ERROR}'"
        fix = f"corral host prepare (it runs: {HUGETLB_FIX.format(cgroup_root)})"
        return Check("cgroups", "fail", detail, fix)
    return Check("cgroups", "ok", detail + "; hugetlb is not in v2, so crun works")


def _check_rlimits(proc_root: Path) -> list[Check]:
    nofile = _hard_limit(proc_root, "Max open files", resource.RLIMIT_NOFILE)
    nproc = _hard_limit(proc_root, "Max processes", resource.RLIMIT_NPROC)
    fix = "raise the hard limit of Corral's service ({}) or in /etc/security/limits.conf"
    checks = [
        Check("nofile", "ok", f"hard RLIMIT_NOFILE {nofile or 'unlimited'}"),
        Check("nproc", "ok", f"hard RLIMIT_NPROC {nproc or 'unlimited'}"),
    ]
    if nofile is not None and nofile < NOFILE_WANTED:
        status: Status = "fail" if nofile < SANDBOX_NOFILE else "warn"
        verdict = "cannot start them" if status == "fail" else f"works under {nofile}"
        detail = (
            f"hard RLIMIT_NOFILE {nofile} < {NOFILE_WANTED}; Corral sets nofile {SANDBOX_NOFILE}"
            f" inside sandboxes, so it {verdict} (podman's default 1048576 would fail)"
        )
        checks[0] = Check("nofile", status, detail, fix.format(f"LimitNOFILE={NOFILE_WANTED}"))
    if nproc is not None and nproc < NPROC_WANTED:
        detail = f"hard RLIMIT_NPROC {nproc} < {NPROC_WANTED}: all sandboxes share it"
        checks[1] = Check("nproc", "warn", detail, fix.format(f"LimitNPROC={NPROC_WANTED}"))
    return checks


def _check_userns(proc_root: Path) -> Check:
    text = _read(proc_root / "sys" / "user" / "max_user_namespaces")
    fix = "sysctl -w user.max_user_namespaces=15000"
    if not text.isdigit():
        return Check("userns", "fail", "the kernel offers no user namespaces", fix)
    if int(text) == 0:
        return Check("userns", "fail", "user.max_user_namespaces is 0: no id mapping", fix)
    return Check("userns", "ok", f"user.max_user_namespaces = {text}")


def _check_kvm(proc_root: Path, sys_root: Path, dev_root: Path) -> Check:
    release = _read(proc_root / "sys" / "kernel" / "osrelease")
    cpuinfo = _read(proc_root / "cpuinfo")
    hardware = re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.MULTILINE) is not None
    kvm = dev_root / "kvm"
    if not kvm.exists():
        fix = "modprobe kvm_intel (or kvm_amd)" if hardware else "enable (nested) virtualization"
        return Check("kvm", "warn", f"no {kvm}: the microVM backend uses TCG (slow)", fix)
    pvm = "pvm" in release.lower() or (sys_root / "module" / "kvm_pvm").exists()
    if pvm or not hardware:
        fix = "nothing to do for TCG; to use KVM, boot PVM guest kernels or use a host with vmx/svm"
        return Check("kvm", "warn", PVM_WARNING, fix)
    if not os.access(kvm, os.R_OK | os.W_OK):
        return Check("kvm", "warn", f"{kvm} is not accessible", f"run as root or chmod/chgrp {kvm}")
    return Check("kvm", "ok", "hardware virtualization (vmx/svm): stock guest kernels boot")


def _check_runsc_network(version: str, proc_root: Path) -> Check:
    release = _read(proc_root / "sys" / "kernel" / "osrelease")
    major = release.partition(".")[0]
    affected = major.isdigit() and int(major) >= 6 and "2022" in version
    if not affected:
        return Check("runsc-network", "ok", f"{version} on kernel {release}: no known problem")
    if "--network=none" in RUNTIMES["runsc"].extra_global:
        return Check("runsc-network", "ok", RUNSC_NETWORK_NOTE)
    fix = "run runsc with --network=none, or install a newer gVisor"
    return Check("runsc-network", "warn", RUNSC_NETWORK_NOTE.split(";")[0], fix)


# -- podman, through Corral's own config (never the host's /etc/containers) ------------


def _podman(podman: Podman, binary: Path, environ: Mapping[str, str], *args: str) -> str:
    """stdout of `podman <args>` under Corral's config; CalledProcessError on failure."""
    env = {
        **environ,
        "CONTAINERS_CONF": str(podman.containers_conf),
        "CONTAINERS_STORAGE_CONF": str(podman.storage_conf),
    }
    argv = [str(binary), *args]
    done = subprocess.run(
        argv,
        env=env,
        cwd=podman.home,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def _failure(exc: Exception) -> str:
    stderr = getattr(exc, "stderr", None)
    return (stderr or str(exc)).strip()[-300:]


def _check_podman(
    binary: Path, state_dir: Path, environ: Mapping[str, str], runtimes: Iterable[str]
) -> list[Check]:
    """Podman's version, storage driver and cgroup manager under Corral's config, and
    whether each installed runtime starts a container through it."""
    if not (state_dir.is_dir() and os.access(state_dir, os.W_OK | os.X_OK)):
        detail = f"not probed: Corral's podman config lives under {state_dir}, not ready yet"
        return [Check("podman-config", "warn", detail, "corral host prepare (creates it)")]
    podman = Podman(state_dir)
    fix = f"CONTAINERS_CONF={podman.containers_conf} podman info (shows the whole error)"
    try:
        podman.ensure_config()
        info = json.loads(_podman(podman, binary, environ, "info", "--format", "json"))
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return [Check("podman-config", "fail", f"podman info failed: {_failure(exc)}", fix)]
    store, host = info.get("store", {}), info.get("host", {})
    version = info.get("version", {}).get("Version", "?")
    checks = [Check("podman-config", "ok", f"podman {version} with {podman.containers_conf}")]
    driver, graph_root = store.get("graphDriverName", "?"), store.get("graphRoot", "?")
    storage_status: Status = "ok" if driver == "overlay" else "warn"
    checks.append(
        Check(
            "podman-storage",
            storage_status,
            f"{driver} at {graph_root}",
            None if driver == "overlay" else f"Corral's {podman.storage_conf} asks for overlay",
        )
    )
    manager = host.get("cgroupManager", "?")
    cgroups_status: Status = "ok" if manager == "cgroupfs" else "warn"
    checks.append(
        Check(
            "podman-cgroups",
            cgroups_status,
            f"cgroup manager {manager}",
            None
            if manager == "cgroupfs"
            else f"Corral's {podman.containers_conf} asks for cgroupfs",
        )
    )
    checks.append(_check_podman_api(podman, binary, environ))
    checks += [_check_podman_runtime(podman, binary, environ, name) for name in runtimes]
    return checks


def _check_podman_api(podman: Podman, binary: Path, environ: Mapping[str, str]) -> Check:
    """Podman's REST API service, which the backend drives, answers on a unix socket."""
    import httpx

    env = {
        **environ,
        "CONTAINERS_CONF": str(podman.containers_conf),
        "CONTAINERS_STORAGE_CONF": str(podman.storage_conf),
    }
    scratch = Path(tempfile.mkdtemp(prefix="doctor-api-", dir=podman.home))
    socket = scratch / "api.sock"
    started = time.monotonic()
    service = subprocess.Popen(
        [str(binary), "system", "service", "--time=5", f"unix://{socket}"],
        env=env,
        cwd=podman.home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    answered = False
    try:
        # Wait for the socket to accept before asking httpx: httpcore's sync unix
        # transport leaks its socket object when a connect is refused.
        while service.poll() is None and time.monotonic() - started < 15:
            if _accepts(socket):
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=2) as c:
                    try:
                        answered = c.get("http://podman/_ping").status_code == 200
                    except httpx.TransportError:
                        answered = False
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - started
    finally:
        service.terminate()
        try:
            _, err = service.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            service.kill()
            _, err = service.communicate()
        shutil.rmtree(scratch, ignore_errors=True)
    if answered:
        return Check(
            "podman-api", "ok", f"the API service answers ({elapsed * 1000:.0f} ms to start)"
        )
    tail = err.decode(errors="replace").strip()[-300:]
    fix = f"CONTAINERS_CONF={podman.containers_conf} podman system service --time=5 unix:///tmp/x.sock"
    return Check("podman-api", "fail", f"the API service did not answer: {tail}", fix)


def _check_podman_runtime(
    podman: Podman, binary: Path, environ: Mapping[str, str], runtime: str
) -> Check:
    """Start a container on `runtime` from a one-file rootfs (catatonit): no image needed."""
    name = f"podman/{runtime}"
    init = shutil.which("catatonit", path=environ.get("PATH", os.defpath))
    if init is None:
        return Check(name, "warn", "not probed: catatonit is missing", "apt-get install catatonit")
    podman.home.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="doctor-", dir=podman.home))
    cgroup_parent = f"{CGROUP_PARENT}/{rootfs.name}"
    try:
        rootfs.chmod(0o755)
        shutil.copy(init, rootfs / "init")
        shown = json.loads(
            _podman(
                podman,
                binary,
                environ,
                "--runtime",
                runtime,
                "info",
                "--format",
                "{{json .Host.OCIRuntime}}",
            )
        )
        # Under Corral's own cgroup parent, removed after: podman's default parent
        # (/libpod_parent) would stay behind on the host, empty, for good.
        run = ["run", "--rm", "--runtime", runtime, "--network", "none"]
        run += ["--cgroup-parent", cgroup_parent, "--rootfs", str(rootfs)]
        _podman(podman, binary, environ, *run, "/init", "--version")
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        fix = f"apt-get install --reinstall {RUNTIMES[runtime].apt_package}, then doctor again"
        return Check(name, "fail", f"cannot start a container: {_failure(exc)}", fix)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        cgroups.remove(cgroup_parent)
    version = str(shown.get("version", "")).partition("\n")[0]
    return Check(name, "ok", f"starts containers: {version} ({shown.get('path')})")


def _check_state_dir(path: Path) -> Check:
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK):
            return Check("state-dir", "ok", f"{path} is writable")
        return Check("state-dir", "fail", f"{path} is not writable", f"chown {os.getuid()} {path}")
    if path.exists():
        return Check("state-dir", "fail", f"{path} is not a directory", "set CORRAL_STATE_DIR")
    parent = next(p for p in path.parents if p.exists())
    if os.access(parent, os.W_OK | os.X_OK):
        detail = f"{path} does not exist yet ({parent} is writable)"
        return Check("state-dir", "warn", detail, "corral host prepare (creates it)")
    detail = f"{path} cannot be created: {parent} is not writable"
    return Check("state-dir", "fail", detail, "set CORRAL_STATE_DIR to a writable directory")


def run_checks(
    *,
    environ: Mapping[str, str] | None = None,
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    sys_root: Path = Path("/sys"),
    dev_root: Path = Path("/dev"),
    state_dir: Path | None = None,
    microvm: MicrovmSettings | None = None,
) -> list[Check]:
    """Probe the host; one Check per tool and per kernel feature Corral relies on.

    `microvm` (default: the config file's [microvm] section) names the VMM
    binaries to look for."""
    env = os.environ if environ is None else environ
    if microvm is None:
        microvm = _microvm_settings(env)
    checks: list[Check] = []
    versions: dict[str, str | None] = {}
    for tool in TOOLS:
        check, versions[tool.binary] = _check_tool(tool, env)
        checks.append(check)
    checks += [_check_cgroups(cgroup_root), *_check_rlimits(proc_root), _check_userns(proc_root)]
    checks.append(_check_kvm(proc_root, sys_root, dev_root))
    accel = accelerator(dev_root / "kvm", sys_root / "module")
    if versions.get("qemu-system-x86_64"):
        checks.append(Check("microvm-accel", "ok", f"--vmm qemu uses {accel.name}: {accel.reason}"))
    checks += _check_vmms(env, accel, bool(versions.get("qemu-system-x86_64")), microvm)
    if runsc_version := versions.get("runsc"):
        checks.append(_check_runsc_network(runsc_version, proc_root))
    state = state_dir or Path(env.get("CORRAL_STATE_DIR", STATE_DIR))
    checks.append(_check_state_dir(state))
    podman_path = shutil.which("podman", path=env.get("PATH", os.defpath))
    if podman_path and versions.get("podman"):
        runtimes = [name for name in RUNTIMES if versions.get(name)]
        checks += _check_podman(Path(podman_path), state, env, runtimes)
    return checks


def _microvm_settings(environ: Mapping[str, str]) -> MicrovmSettings:
    from corral.config import Settings
    from corral.errors import UserError

    try:
        return Settings.load(environ=environ).microvm
    except UserError:  # a broken config file: the defaults still say what the host can do
        return MicrovmSettings()


def _check_vmms(
    environ: Mapping[str, str], accel: Accelerator, has_qemu: bool, microvm: MicrovmSettings
) -> list[Check]:
    """One check per VMM the microvm backend can drive: usable here, or why not."""
    path = environ.get("PATH", os.defpath)
    selected: dict[str, str] = {microvm.vmm: " (the configured --vmm)"}
    checks = []
    if has_qemu:
        detail = f"usable{selected.get('qemu', '')}: {accel.name} ({accel.reason})"
        checks.append(Check("vmm-qemu", "ok", detail))
    else:
        detail = f"not usable{selected.get('qemu', '')}: qemu-system-x86_64 is not installed"
        checks.append(Check("vmm-qemu", "warn", detail, "apt-get install qemu-system-x86"))
    wanted = {
        "firecracker": [microvm.firecracker.binary or "firecracker"],
        "cloud-hypervisor": [microvm.cloud_hypervisor.binary or "cloud-hypervisor"],
    }
    if microvm.firecracker.jailer is not None:
        wanted["firecracker"].append(microvm.firecracker.jailer.binary or "jailer")
    for name, binaries in wanted.items():
        found, why_not = [], []
        for binary in binaries:
            located = shutil.which(binary, path=path)
            if located is None:
                where = "is not executable" if os.sep in binary else "is not on PATH"
                why_not.append(f"{binary} {where}")
            else:
                found.append(located)
        if accel.name != "kvm":  # neither VMM has an emulator to fall back to
            why_not.append(
                f"it needs hardware KVM, and {accel.reason.removesuffix(': TCG emulation')}"
            )
        if why_not:
            detail = f"not usable{selected.get(name, '')}: " + "; ".join(why_not)
            fix = (
                f"install {name} (a static release binary) on PATH or set [microvm.{name}] binary,"
                " on a host with VT-x/AMD-V KVM; use --vmm qemu here"
            )
            checks.append(Check(f"vmm-{name}", "warn", detail, fix))
        else:
            detail = f"usable{selected.get(name, '')}: {', '.join(found)} with {accel.reason}"
            checks.append(Check(f"vmm-{name}", "ok", detail))
    return checks


def format_checks(checks: Iterable[Check]) -> Table:
    """A rich table of the checks (status coloured), for `corral host doctor`."""
    from rich.markup import escape
    from rich.table import Table

    styles = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title="corral host doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        status = f"[{styles[check.status]}]{check.status}[/]"
        table.add_row(escape(check.name), status, escape(check.detail), escape(check.fix or ""))
    return table


def checks_to_json(checks: Iterable[Check]) -> list[dict[str, str | None]]:
    """The checks as JSON-ready dicts (name, status, detail, fix)."""
    return [asdict(check) for check in checks]


def _accepts(path: Path) -> bool:
    """Whether something listens on unix socket `path` (a connect that is closed at once)."""
    import socket as sockets

    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True

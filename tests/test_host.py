"""`corral host doctor` / `prepare` against fake hosts in tmp dirs, then on this machine."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.host import Check, checks_to_json, format_checks, prepare_host, run_checks
from corral.host.doctor import (
    CRUN_HYBRID_ERROR,
    HUGETLB_FIX,
    PVM_WARNING,
    RUNSC_NETWORK_NOTE,
    cgroup_layout,
    is_static_elf,
)

CGROUP_TREES: dict[str, tuple[list[str], str | None]] = {
    # name: (v1 hierarchies, controllers of the cgroup2 mount: at the root for v2,
    # at unified/ for hybrid, None when there is none)
    "v2": ([], "cpuset cpu io memory hugetlb pids"),
    "v1": (["cpu", "cpuacct", "memory", "pids", "hugetlb"], None),
    "hybrid-hugetlb-in-v2": (["cpu", "cpuacct", "memory", "pids", "systemd"], "hugetlb"),
    "hybrid-fixed": (["cpu", "cpuacct", "memory", "pids", "systemd", "hugetlb"], ""),
    "none": ([], None),
}
LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max processes             {nproc:<20} {nproc:<20} processes
Max open files            1024                 {nofile:<20} files
"""


@dataclass
class FakeHost:
    """A host described by files under `root`; `checks()` runs the doctor on it."""

    root: Path
    cgroups: str = "v2"
    release: str = "6.1.0-13-amd64"
    cpu_flags: str = "fpu sse2 vmx"
    kvm: bool = True
    pvm_module: bool = False
    nofile: str = "1048576"
    nproc: str = "unlimited"
    userns: str = "15000"
    tools: dict[str, str] = field(default_factory=dict)  # binary -> its --version output

    @property
    def cgroup_root(self) -> Path:
        return self.root / "cgroup"

    @property
    def environ(self) -> dict[str, str]:
        return {"PATH": str(self.root / "bin"), "CORRAL_STATE_DIR": str(self.root / "state")}

    def build(self) -> FakeHost:
        write = _write
        proc = self.root / "proc"
        write(proc / "sys" / "kernel" / "osrelease", self.release + "\n")
        write(proc / "cpuinfo", f"processor\t: 0\nflags\t\t: {self.cpu_flags}\n\n")
        write(proc / "self" / "limits", LIMITS.format(nofile=self.nofile, nproc=self.nproc))
        write(proc / "sys" / "user" / "max_user_namespaces", self.userns + "\n")
        (self.root / "dev").mkdir()
        if self.kvm:
            write(self.root / "dev" / "kvm", "")
        (self.root / "sys" / "module").mkdir(parents=True)
        if self.pvm_module:
            (self.root / "sys" / "module" / "kvm_pvm").mkdir()
        v1, v2 = CGROUP_TREES[self.cgroups]
        self.cgroup_root.mkdir()
        for hierarchy in v1:
            write(self.cgroup_root / hierarchy / "tasks", "1\n")
        if v2 is not None:
            v2_root = self.cgroup_root / ("unified" if v1 else "")
            write(v2_root / "cgroup.controllers", v2 + "\n")
        (self.root / "bin").mkdir()
        for name, output in self.tools.items():
            script = self.root / "bin" / name
            write(script, f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
            script.chmod(0o755)
        return self

    def checks(self) -> dict[str, Check]:
        found = run_checks(
            environ=self.environ,
            proc_root=self.root / "proc",
            cgroup_root=self.cgroup_root,
            sys_root=self.root / "sys",
            dev_root=self.root / "dev",
        )
        return {check.name: check for check in found}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- cgroups ------------------------------------------------------------------------------


def test_hybrid_with_hugetlb_in_v2_fails_with_the_prepare_fix(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, cgroups="hybrid-hugetlb-in-v2").build()
    check = host.checks()["cgroups"]
    assert check.status == "fail"
    assert check.detail.startswith("hybrid")
    assert CRUN_HYBRID_ERROR in check.detail
    assert check.fix is not None
    assert check.fix.startswith("corral host prepare")
    assert HUGETLB_FIX.format(host.cgroup_root) in check.fix


def test_hybrid_with_hugetlb_on_v1_is_ok(tmp_path: Path) -> None:
    check = FakeHost(tmp_path, cgroups="hybrid-fixed").build().checks()["cgroups"]
    assert (check.status, check.fix) == ("ok", None)
    assert check.detail.startswith("hybrid")
    assert "hugetlb" in check.detail


@pytest.mark.parametrize(("tree", "mode"), [("v2", "v2 (unified)"), ("v1", "v1")])
def test_pure_v1_and_v2_are_ok(tmp_path: Path, tree: str, mode: str) -> None:
    check = FakeHost(tmp_path, cgroups=tree).build().checks()["cgroups"]
    assert check.status == "ok"
    assert check.detail.startswith(mode)


def test_no_cgroups_mounted_fails(tmp_path: Path) -> None:
    check = FakeHost(tmp_path, cgroups="none").build().checks()["cgroups"]
    assert check.status == "fail"
    assert check.fix is not None
    assert "mount -t cgroup2" in check.fix


# --- KVM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "flags", "pvm_module", "status"),
    [
        ("6.18.44-pvm-host", "fpu vmx", False, "warn"),  # PVM named in the kernel release
        ("6.18.44-fc-v657", "fpu vmx", True, "warn"),  # kvm_pvm module loaded
        ("6.18.44-fc-v657", "fpu sse2", False, "warn"),  # /dev/kvm but no vmx/svm flag
        ("6.1.0-13-amd64", "fpu vmx sse2", False, "ok"),
        ("6.1.0-13-amd64", "fpu svm", False, "ok"),
    ],
)
def test_kvm_detects_pvm(
    tmp_path: Path, release: str, flags: str, pvm_module: bool, status: str
) -> None:
    host = FakeHost(tmp_path, release=release, cpu_flags=flags, pvm_module=pvm_module)
    check = host.build().checks()["kvm"]
    assert check.status == status
    if status == "warn":
        assert check.detail == PVM_WARNING
        assert check.fix


def test_missing_dev_kvm_warns_that_microvms_use_tcg(tmp_path: Path) -> None:
    check = FakeHost(tmp_path, kvm=False).build().checks()["kvm"]
    assert check.status == "warn"
    assert "TCG" in check.detail
    assert check.fix is not None
    assert "modprobe kvm_intel" in check.fix  # the fake CPU has vmx


# --- tools and runsc ---------------------------------------------------------------------


def test_missing_tools_name_their_apt_package(tmp_path: Path) -> None:
    checks = FakeHost(tmp_path).build().checks()  # empty PATH
    expected = {
        "crun": ("fail", "crun"),
        "runc": ("warn", "runc"),
        "runsc": ("warn", "runsc"),
        "podman": ("warn", "podman"),
        "qemu-system-x86_64": ("warn", "qemu-system-x86"),
        "catatonit": ("fail", "catatonit"),
        "busybox": ("warn", "busybox-static"),
        "mmdebstrap": ("warn", "mmdebstrap"),
    }
    for name, (status, package) in expected.items():
        assert checks[name].status == status, checks[name]
        assert checks[name].fix == f"apt-get install {package}"
    assert "runsc-network" not in checks


def test_tool_version_is_the_first_line(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, tools={"crun": "crun version 1.8.1\ncommit: abc\n+SYSTEMD"})
    check = host.build().checks()["crun"]
    assert check.status == "ok"
    assert check.detail.startswith("crun version 1.8.1 (")
    assert "commit" not in check.detail


def test_dynamic_busybox_is_not_enough(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).build()
    (tmp_path / "bin" / "busybox").symlink_to(Path("/bin/sh").resolve())
    check = host.checks()["busybox"]
    assert check.status == "warn"
    assert "dynamically linked" in check.detail
    assert check.fix == "apt-get install busybox-static"


def test_is_static_elf(tmp_path: Path) -> None:
    assert is_static_elf(Path("/usr/bin/busybox"))  # Debian's busybox-static
    assert not is_static_elf(Path("/bin/sh").resolve())
    (tmp_path / "script").write_text("#!/bin/sh\n")
    (tmp_path / "truncated").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    assert not is_static_elf(tmp_path / "script")
    assert not is_static_elf(tmp_path / "truncated")
    assert not is_static_elf(tmp_path / "missing")


@pytest.mark.parametrize(
    ("release", "expected"), [("6.18.44", RUNSC_NETWORK_NOTE), ("5.10.0", "no known problem")]
)
def test_runsc_2022_network_on_new_kernels(tmp_path: Path, release: str, expected: str) -> None:
    host = FakeHost(tmp_path, release=release, tools={"runsc": "runsc version 0.0~20221219.0"})
    check = host.build().checks()["runsc-network"]
    assert check.status == "ok"  # handled: Corral runs runsc with --network=none
    assert expected in check.detail


# --- limits, namespaces, state dir -------------------------------------------------------


@pytest.mark.parametrize(
    ("nofile", "status"),
    [("20000", "warn"), ("1048576", "ok"), ("unlimited", "ok"), ("1024", "fail")],
)
def test_nofile_hard_limit(tmp_path: Path, nofile: str, status: str) -> None:
    check = FakeHost(tmp_path, nofile=nofile).build().checks()["nofile"]
    assert check.status == status
    if status != "ok":
        assert "4096" in check.detail
        assert check.fix is not None
    if nofile == "20000":
        assert "works under 20000" in check.detail


def test_low_nproc_warns(tmp_path: Path) -> None:
    checks = FakeHost(tmp_path, nproc="1000").build().checks()
    assert checks["nproc"].status == "warn"
    assert checks["nofile"].status == "ok"


@pytest.mark.parametrize(("value", "status"), [("0", "fail"), ("15000", "ok")])
def test_user_namespaces(tmp_path: Path, value: str, status: str) -> None:
    check = FakeHost(tmp_path, userns=value).build().checks()["userns"]
    assert check.status == status
    assert (check.fix is not None) == (status == "fail")


def test_state_dir(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).build()
    missing = host.checks()["state-dir"]
    assert missing.status == "warn"
    assert missing.fix == "corral host prepare (creates it)"
    (tmp_path / "state").mkdir()
    assert host.checks()["state-dir"].status == "ok"
    (tmp_path / "state").rmdir()
    (tmp_path / "state").write_text("")
    assert host.checks()["state-dir"].status == "fail"


def test_table_and_json(tmp_path: Path) -> None:
    from rich.console import Console

    checks = list(FakeHost(tmp_path, cgroups="hybrid-hugetlb-in-v2").build().checks().values())
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(format_checks(checks))
    text = out.getvalue()
    assert "cgroups" in text
    assert "fail" in text
    assert "corral host prepare" in text
    rows = json.loads(json.dumps(checks_to_json(checks)))
    assert rows[0].keys() == {"name", "status", "detail", "fix"}
    assert {row["name"] for row in rows} == {check.name for check in checks}


# --- prepare on fake hosts ---------------------------------------------------------------


def test_prepare_dry_run_reports_the_hugetlb_mount(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, cgroups="hybrid-hugetlb-in-v2").build()
    actions = prepare_host(dry_run=True, cgroup_root=host.cgroup_root, environ=host.environ)
    hugetlb, state = actions[0], actions[1]
    assert not hugetlb.done
    assert hugetlb.detail == f"would run: {HUGETLB_FIX.format(host.cgroup_root)}"
    assert not state.done
    assert state.detail.startswith("would create")
    assert not (host.cgroup_root / "hugetlb").exists()
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("tree", "detail"), [("v2", "not needed"), ("hybrid-fixed", "already")])
def test_prepare_skips_the_mount_when_not_needed(tmp_path: Path, tree: str, detail: str) -> None:
    host = FakeHost(tmp_path, cgroups=tree).build()
    action = prepare_host(cgroup_root=host.cgroup_root, environ=host.environ)[0]
    assert action.done
    assert detail in action.detail


def test_prepare_creates_the_state_dir_once(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).build()
    first = prepare_host(cgroup_root=host.cgroup_root, environ=host.environ)[1]
    assert first.done
    assert (tmp_path / "state").is_dir()
    again = prepare_host(cgroup_root=host.cgroup_root, environ=host.environ)[1]
    assert again.done
    assert "already exists" in again.detail


def test_prepare_lists_packages_but_installs_nothing(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, tools={"runc": "runc version 1.1.5"}).build()
    actions = prepare_host(dry_run=True, cgroup_root=host.cgroup_root, environ=host.environ)
    details = [a.detail for a in actions if a.detail.startswith("apt-get")]
    assert details == [
        "apt-get install -y crun catatonit",
        "apt-get install -y runsc podman qemu-system-x86 busybox-static mmdebstrap",
    ]
    assert not any(a.done for a in actions[2:])


# --- this machine ------------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the real host tests need root (CI runs them as root)")


def _cgroup_mounts() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if line.split(" ")[4].startswith("/sys/fs/cgroup")]


@pytest.mark.runtime
def test_real_host_runtimes_and_cgroup_mode() -> None:
    _require_root()
    checks = {check.name: check for check in run_checks()}
    for runtime in ("crun", "runc", "runsc"):
        assert checks[runtime].status == "ok", checks[runtime]
        assert checks[runtime].detail.startswith(f"{runtime} version"), checks[runtime]
    assert checks["cgroups"].detail.split()[0] in ("v1", "v2", "hybrid")
    assert {"nofile", "nproc", "userns", "kvm", "state-dir"} <= checks.keys()


@pytest.mark.runtime
def test_real_prepare_dry_run_changes_nothing() -> None:
    _require_root()
    state_dir = Path(os.environ.get("CORRAL_STATE_DIR", "/var/lib/corral"))
    existed, mounts_before = state_dir.exists(), _cgroup_mounts()
    actions = prepare_host(dry_run=True)
    assert _cgroup_mounts() == mounts_before
    assert state_dir.exists() == existed
    assert actions[0].description.startswith("move hugetlb")


@pytest.mark.runtime
def test_real_hugetlb_mount_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """The mount(2) call prepare uses, run where it cannot touch the host's mounts."""
    _require_root()
    if cgroup_layout().mode == "v2":
        pytest.skip("a cgroup v2 host has no v1 hugetlb hierarchy to mount")
    target = tmp_path / "hugetlb"
    target.mkdir()
    code = (
        "import sys; from pathlib import Path; from corral.host.prepare import _mount_cgroup_v1;"
        "_mount_cgroup_v1(Path(sys.argv[1]), 'hugetlb');"
        "print((Path(sys.argv[1]) / 'tasks').exists())"
    )
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code]
    done = subprocess.run([*argv, str(target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()

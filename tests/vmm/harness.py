"""Helpers for the VMM driver tests: stand-in binaries, fake bundles, the request record, leaks."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from corral.backends.microvm.vmm import BootSpec, VmmDriver, VsockSpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_script(path: Path, argv: list[str], env: dict[str, str] | None = None) -> Path:
    """An executable shell script that execs `argv` with the test's Python on the path."""
    assignments = {"PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in assignments.items())
    command = " ".join(shlex.quote(a) for a in argv)
    path.write_text(f'#!/bin/sh\nexport {exports}\nexec {command} "$@"\n')
    path.chmod(0o755)
    return path


def standin_vmm(bin_dir: Path, flavor: str, record: Path, *extra: str) -> Path:
    """A binary named like the VMM that runs the spec server for `flavor`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tests.vmm.spec_server", flavor, "--record", str(record), *extra]
    return write_script(bin_dir / flavor, argv)


def standin_jailer(bin_dir: Path, record: Path) -> Path:
    argv = [sys.executable, "-m", "tests.vmm.jailer_standin"]
    return write_script(bin_dir / "jailer", argv, {"STANDIN_JAILER_RECORD": str(record)})


def read_record(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def operations(record: list[dict[str, Any]]) -> list[str]:
    """The requests as "METHOD path", readiness probes left out."""
    return [
        f"{e['method']} {e['path']}"
        for e in record
        if (e["method"], e["path"]) not in {("GET", "/"), ("GET", "/api/v1/vmm.ping")}
    ]


def assert_all_valid(record: list[dict[str, Any]]) -> None:
    """Every request was in the spec, and every reply had a documented status and shape."""
    assert record, "the stand-in recorded no requests"
    for entry in record:
        assert entry["spec_errors"] == [], entry
        assert entry["documented"], entry
        assert entry["response_errors"] == [], entry


def bundle(directory: Path, *, vsock: bool = True) -> BootSpec:
    """Stand-in bundle files (the stand-ins only check that they exist)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinux", "initrd.cpio", "rootfs.ext4", "overlay.raw"):
        (directory / name).write_bytes(b"\0" * 512)
    return BootSpec(
        kernel=directory / "vmlinux",
        initrd=directory / "initrd.cpio",
        rootfs=directory / "rootfs.ext4",
        overlay=directory / "overlay.raw",
        cmdline="console=ttyS0 reboot=k panic=1",
        vcpus=2,
        memory_mib=256,
        vsock=VsockSpec(guest_cid=3, uds_path=directory / "vsock.sock") if vsock else None,
    )


def standin_pids() -> set[int]:
    """Pids of stand-in VMM processes (anything running tests.vmm.spec_server)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"tests.vmm.spec_server" in cmdline:
            found.add(int(entry.name))
    return found


def assert_released(driver: VmmDriver, pid: int | None) -> None:
    """No process, no API socket left after shutdown/kill."""
    assert driver.pid is None
    assert not driver.api_socket.exists(), driver.api_socket
    if pid is not None:
        assert not Path(f"/proc/{pid}").exists(), f"VMM process {pid} left behind"

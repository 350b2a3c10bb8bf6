"""What the podman backend adds over the conformance suite: Podman's own view.

Operators' tooling (`podman ps`, `podman inspect`) sees Corral's sandboxes when
pointed at Corral's config; that config lives under the state dir only; a
failed start leaves no container behind. The conformance suite covers the
backend verbs on crun, runc and runsc (conftest.PODMAN_SUITES).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import (
    Backend,
    BackendStatus,
    Capability,
    ExecRequest,
    HostMount,
    Output,
    SandboxLimits,
)
from corral.backends.oci import OciBackend
from corral.backends.oci.bundle import UID_BASE, UID_RANGE
from corral.backends.podman import PodmanBackend
from corral.backends.podman.images import IMAGE_REPOSITORY
from corral.backends.podman.service import service_pids
from corral.errors import SandboxStartError, UnsupportedError
from corral.host.doctor import Check, run_checks
from tests.conftest import Harness, counter_script, require_binary, require_root, traversable_dir

pytestmark = pytest.mark.runtime


@pytest.fixture
async def podman(state_root: Path, default_image: Any) -> AsyncIterator[Harness]:
    require_root()
    for binary in ("podman", "crun", "catatonit"):
        require_binary(binary)
    backend = PodmanBackend(state_root, runtime="crun")
    h = Harness(
        backend, default_image.to_ref(), tuple(default_image.host_mounts), "crun", [], state_root
    )
    yield h
    for sandbox_id in h.created:
        await backend.destroy(sandbox_id)
    await backend.aclose()


def podman_cli(backend: PodmanBackend, *args: str) -> subprocess.CompletedProcess[str]:
    """The podman CLI as an operator runs it against Corral's config."""
    return subprocess.run(
        ["podman", *args], env=backend.podman.env, capture_output=True, text=True, check=False
    )


def inspect(backend: PodmanBackend, sandbox_id: str) -> dict[str, Any]:
    done = podman_cli(backend, "container", "inspect", f"corral-{sandbox_id}")
    assert done.returncode == 0, done.stderr
    entry: dict[str, Any] = json.loads(done.stdout)[0]
    return entry


def containers_with_label(backend: PodmanBackend, sandbox_id: str) -> list[str]:
    done = podman_cli(
        backend,
        *("ps", "--all", "--filter", f"label=io.corral.sandbox-id={sandbox_id}"),
        *("--format", "{{.Names}}"),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


async def test_podman_ps_shows_the_sandbox_with_its_labels(podman: Harness) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    sid = await podman.sandbox(labels={"tenant": "acme", "corral.test": "1"})
    assert containers_with_label(podman.backend, sid) == [f"corral-{sid}"]
    labels = inspect(podman.backend, sid)["Config"]["Labels"]
    assert labels["io.corral.sandbox-id"] == sid
    assert labels["io.corral.tenant"] == "acme"
    await podman.backend.destroy(sid)
    assert containers_with_label(podman.backend, sid) == []


async def test_limits_and_lockdown_are_visible_in_podman_inspect(
    podman: Harness, state_root: Path
) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    limits = SandboxLimits(vcpus=0.5, memory=200 << 20, pids=100, disk=32 << 20, cpuset="0")
    sid = await podman.sandbox(limits=limits)
    info = inspect(podman.backend, sid)
    host = info["HostConfig"]
    assert host["Memory"] == 200 << 20
    assert host["MemorySwap"] == 200 << 20, "no swap beyond the memory limit"
    assert host["PidsLimit"] == 100
    assert host["NanoCpus"] == 500_000_000
    assert host["CpusetCpus"] == "0"
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "none"
    assert "no-new-privileges" in host["SecurityOpt"]
    assert "CAP_SYS_CHROOT" in host["CapDrop"]
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert ulimits["RLIMIT_NOFILE"] == (4096, 4096)
    assert ulimits["RLIMIT_NPROC"][1] <= 20000
    assert info["Config"]["User"] == "1000:1000"
    mapping = f"0:{UID_BASE}:{UID_RANGE}"
    assert host["IDMappings"] == {"UidMap": [mapping], "GidMap": [mapping]}
    scratch = state_root / "sandboxes" / sid / "scratch" / "home"
    assert (scratch.stat().st_uid, scratch.stat().st_gid) == (UID_BASE + 1000, UID_BASE + 1000)
    stats = await podman.backend.stats(sid)
    assert (stats.memory_limit, stats.pids_limit) == (200 << 20, 100)
    result = await podman.backend.exec(sid, ExecRequest(["/bin/sh", "-c", "ulimit -n; id -u"]))
    assert result.stdout == b"4096\n1000\n"


async def test_running_sandbox_is_re_pinned(podman: Harness) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    sid = await podman.sandbox(limits=SandboxLimits(cpuset="0"))
    status = ExecRequest(["grep", "Cpus_allowed_list", "/proc/self/status"])
    assert (await podman.backend.exec(sid, status)).stdout == b"Cpus_allowed_list:\t0\n"
    await podman.backend.set_cpuset(sid, "1")
    assert (await podman.backend.exec(sid, status)).stdout == b"Cpus_allowed_list:\t1\n"
    # (Podman 4.3's inspect still shows the cpuset the container was created with.)


async def test_writable_mount_belongs_to_the_sandbox_user(podman: Harness, tmp_path: Path) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    volume = tmp_path / "volume"
    volume.mkdir()
    tmp_path.chmod(0o755)
    mounts = [*podman.host_mounts, HostMount(volume, "/data", writable=True)]
    sid = await podman.sandbox(mounts=mounts)
    result = await podman.backend.exec(sid, ExecRequest(["/bin/sh", "-c", "echo kept > /data/f"]))
    assert result.ok, result
    assert (volume / "f").read_text() == "kept\n"
    assert (volume / "f").stat().st_uid == UID_BASE + 1000  # the sandbox user, shifted


def test_user_namespace_is_advertised_off_gvisor(state_root: Path) -> None:
    # runsc runs without one, as on the oci backend: gVisor's sentry is the boundary.
    for runtime, userns in (("crun", True), ("runc", True), ("runsc", False)):
        backend = PodmanBackend(state_root, runtime=runtime)
        assert (Capability.USER_NAMESPACE in backend.capabilities) is userns, runtime


async def test_failed_start_leaves_no_container(podman: Harness, state_root: Path) -> None:
    # The runtime cannot bind a file over a directory: podman has already created
    # the container when the start fails (the case that leaks a Created container).
    mounts = [*podman.host_mounts, HostMount(Path("/etc/hostname"), "/etc")]
    config = podman.config(mounts=mounts)
    with pytest.raises(SandboxStartError) as info:
        await podman.backend.create(config)
    assert info.value.stderr_tail
    assert isinstance(podman.backend, PodmanBackend)
    assert containers_with_label(podman.backend, config.sandbox_id) == []
    assert await podman.backend.status(config.sandbox_id) == BackendStatus.MISSING
    assert not (state_root / "sandboxes" / config.sandbox_id).exists()
    await podman.backend.destroy(config.sandbox_id)  # still harmless


async def test_config_lives_under_the_state_dir(podman: Harness, state_root: Path) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    host_config = Path("/etc/containers")
    before = tree_digest(host_config) if host_config.exists() else None
    sid = await podman.sandbox()
    assert (await podman.backend.exec(sid, ExecRequest(["/bin/true"]))).ok
    home = state_root / "podman"
    assert (home / "storage.conf").is_file()
    assert (home / "containers.conf").is_file()
    done = podman_cli(podman.backend, "info", "--format", "json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["store"]["graphRoot"] == str(home / "storage")
    assert info["store"]["graphDriverName"] == "overlay"
    assert info["host"]["cgroupManager"] == "cgroupfs"
    after = tree_digest(host_config) if host_config.exists() else None
    assert before == after, "the host's /etc/containers must stay as it was"
    assert os.environ.get("CONTAINERS_CONF") is None, "the test process's env is untouched"


async def test_image_is_loaded_once_per_digest(podman: Harness) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    first = await podman.sandbox()
    second = PodmanBackend(podman.backend.state_dir)  # a new process: no in-memory cache
    podman.created.append("sb-t-second")
    await second.create(podman.config(sandbox_id="sb-t-second"))
    done = podman_cli(podman.backend, "images", "--format", "{{.Repository}}:{{.Tag}}")
    tag = podman.image.digest.removeprefix("sha256:")
    assert done.stdout.split() == [f"{IMAGE_REPOSITORY}:{tag}"]
    for sid in (first, "sb-t-second"):
        assert (await second.exec(sid, ExecRequest(["/bin/true"]))).ok


def test_doctor_reports_podman_through_corrals_config(state_root: Path) -> None:
    require_root()
    for binary in ("podman", "crun", "runc", "runsc", "catatonit"):
        require_binary(binary)
    libpod_parent = Path("/sys/fs/cgroup/pids/libpod_parent")
    had_libpod_parent = libpod_parent.exists()
    checks = {check.name: check for check in run_checks(state_dir=state_root)}
    if not had_libpod_parent:
        assert not libpod_parent.exists(), "the probe left podman's default cgroup parent"
    assert checks["podman-config"].status == "ok", checks["podman-config"]
    assert checks["podman-config"].detail.startswith("podman 4."), checks["podman-config"]
    storage = checks["podman-storage"]
    assert (storage.status, storage.detail) == ("ok", f"overlay at {state_root / 'podman/storage'}")
    assert checks["podman-cgroups"] == Check("podman-cgroups", "ok", "cgroup manager cgroupfs")
    api = checks["podman-api"]
    assert api.status == "ok", api
    assert api.detail.startswith("the API service answers"), api
    assert not any((state_root / "podman").glob("doctor-api-*")), "the probe's socket dir stayed"
    for runtime in ("crun", "runc", "runsc"):
        check = checks[f"podman/{runtime}"]
        assert check.status == "ok", check
        assert check.detail.startswith(f"starts containers: {runtime} version"), check
    assert not any((state_root / "podman").glob("doctor-*")), "the probe's rootfs stayed"
    assert PodmanBackend(state_root).podman.storage_conf.is_file()


def test_doctor_does_not_create_a_missing_state_dir(tmp_path: Path) -> None:
    require_binary("podman")
    missing = tmp_path / "not-yet"
    checks = {c.name: c for c in run_checks(state_dir=missing)}
    assert checks["podman-config"].status == "warn", checks["podman-config"]
    assert checks["podman-config"].fix == "corral host prepare (creates it)"
    assert "podman/crun" not in checks
    assert not missing.exists()


# -- the API service ---------------------------------------------------------------


async def test_api_service_is_started_on_demand_and_stopped_by_aclose(
    podman: Harness, state_root: Path
) -> None:
    assert isinstance(podman.backend, PodmanBackend)
    home = state_root / "podman"
    sid = await podman.sandbox()
    [pid] = service_pids(home)
    # Supervised: a service that died is started again by the next call.
    os.kill(pid, signal.SIGKILL)
    assert await podman.backend.status(sid) == BackendStatus.RUNNING
    [restarted] = service_pids(home)
    assert restarted != pid
    # Another backend on the same state dir uses the running service.
    other = PodmanBackend(state_root)
    assert await other.status(sid) == BackendStatus.RUNNING
    assert service_pids(home) == [restarted]
    await podman.backend.aclose()
    assert service_pids(home) == []
    assert await podman.backend.status(sid) == BackendStatus.RUNNING  # started again
    await podman.backend.destroy(sid)
    await podman.backend.aclose()
    assert service_pids(home) == []


async def test_api_service_ends_by_itself_when_idle(podman: Harness, state_root: Path) -> None:
    home = state_root / "podman"
    backend = PodmanBackend(state_root, service_idle_timeout=1)
    podman.created.append("sb-t-idle")
    await backend.create(podman.config(sandbox_id="sb-t-idle"))
    assert len(service_pids(home)) == 1
    for _poll in range(50):
        if not service_pids(home):
            break
        await asyncio.sleep(0.2)
    assert service_pids(home) == [], "an idle service outlived its timeout"
    # The sandbox runs on without it, and the next call brings it back.
    assert (await backend.exec("sb-t-idle", ExecRequest(["/bin/true"]))).ok
    assert await backend.status("sb-t-idle") == BackendStatus.RUNNING
    await backend.destroy("sb-t-idle")
    await backend.aclose()


# -- exec stdin, on both backends that run `<runtime> exec` --------------------------


async def chunks(*parts: bytes, pause: float = 0.05) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(pause)
        yield part


@pytest.mark.parametrize("backend_name", ["oci", "podman"])
async def test_streamed_stdin_reaches_cat(
    backend_name: str, state_root: Path, default_image: Any
) -> None:
    require_root()
    backend: Backend = (
        PodmanBackend(state_root) if backend_name == "podman" else OciBackend(state_root)
    )
    h = Harness(backend, default_image.to_ref(), tuple(default_image.host_mounts), "crun")
    try:
        sid = await h.sandbox()
        request = ExecRequest(["cat"], stdin=chunks(b"one ", b"two ", b"three\n"))
        result = await backend.exec(sid, request)
        assert (result.exit_code, result.stdout) == (0, b"one two three\n")
        # A consumer that stops early kills the command, even with stdin still open.
        endless = ExecRequest(["cat"], stdin=chunks(*[b"tick\n"] * 1000, pause=0.01))
        async with contextlib.aclosing(backend.exec_stream(sid, endless)) as events:
            async for event in events:
                assert isinstance(event, Output)
                assert event.data.startswith(b"tick")
                break
        listing = await backend.exec(sid, ExecRequest(["ps", "-eo", "stat=,comm="]))
        # Killed: at most a zombie its init has not reaped yet.
        alive = [line.split()[1] for line in listing.stdout.splitlines() if line[:1] != b"Z"]
        assert b"cat" not in alive, listing.stdout
    finally:
        for sandbox_id in h.created:
            await backend.destroy(sandbox_id)
        await backend.aclose()


# -- snapshots ------------------------------------------------------------------------

COUNTER = counter_script(0.05)


async def read_count(backend: Backend, sandbox_id: str) -> int:
    result = await backend.exec(sandbox_id, ExecRequest(["cat", "/tmp/count"]))
    assert result.ok, result
    return int(result.stdout)


async def test_gvisor_snapshot_and_restore_keep_processes_and_files(
    state_root: Path, default_image: Any, tmp_path: Path
) -> None:
    require_root()
    for binary in ("podman", "runsc", "catatonit"):
        require_binary(binary)
    backend = PodmanBackend(state_root, runtime="runsc")
    assert Capability.SNAPSHOT in backend.capabilities
    h = Harness(backend, default_image.to_ref(), tuple(default_image.host_mounts), "runsc")
    try:
        sid = await h.sandbox()
        script = f"echo kept > /work/before; ({COUNTER}) >/dev/null 2>&1 &"
        assert (await backend.exec(sid, ExecRequest(["/bin/sh", "-c", script]))).ok
        await asyncio.sleep(0.5)
        counted = await read_count(backend, sid)
        assert counted > 1

        await backend.snapshot(sid, tmp_path / "snap")
        assert (tmp_path / "snap" / "checkpoint.img").is_file()
        assert await backend.status(sid) == BackendStatus.STOPPED
        await backend.restore(sid, tmp_path / "snap")
        assert await backend.status(sid) == BackendStatus.RUNNING

        after = await backend.exec(sid, ExecRequest(["cat", "/work/before"]))
        assert after.stdout == b"kept\n"
        resumed = await read_count(backend, sid)
        assert resumed >= counted, "the counter started again instead of going on"
        await asyncio.sleep(0.5)
        assert await read_count(backend, sid) > resumed, "the counter stopped"
        assert not any(backend.podman.restore_dir.iterdir()), "a staged restore was left"
        with pytest.raises(UnsupportedError, match="cannot re-pin"):
            await backend.set_cpuset(sid, "0")
    finally:
        for sandbox_id in h.created:
            await backend.destroy(sandbox_id)
        await backend.aclose()


@pytest.mark.parametrize("runtime", ["crun", "runc"])
async def test_snapshot_is_refused_where_criu_would_be_needed(
    runtime: str, state_root: Path, default_image: Any, tmp_path: Path
) -> None:
    require_root()
    require_binary(runtime)
    backend = PodmanBackend(state_root, runtime=runtime)
    assert Capability.SNAPSHOT not in backend.capabilities
    h = Harness(backend, default_image.to_ref(), tuple(default_image.host_mounts), runtime)
    try:
        sid = await h.sandbox()
        with pytest.raises(UnsupportedError, match=f"not supported by {runtime} on this host"):
            await backend.snapshot(sid, tmp_path / "snap")
        with pytest.raises(UnsupportedError, match=f"not supported by {runtime} on this host"):
            await backend.restore(sid, tmp_path / "snap")
        assert await backend.status(sid) == BackendStatus.RUNNING
    finally:
        for sandbox_id in h.created:
            await backend.destroy(sandbox_id)
        await backend.aclose()


async def test_image_loads_under_a_state_dir_with_capitals(default_image: Any) -> None:
    # `pull oci:<path>` names the image after the path; capitals are not allowed there.
    require_root()
    require_binary("podman")
    root = traversable_dir("Podman-State")
    backend = PodmanBackend(root)
    try:
        name = await backend.images.ensure(default_image.to_ref(), "sb-t-capitals")
        listed = podman_cli(backend, "images", "--format", "{{.Repository}}:{{.Tag}}")
        assert listed.stdout.split() == [name]
        assert not any((root / "podman" / "layouts").iterdir()), "the load's link stayed"
    finally:
        await backend.aclose()
        shutil.rmtree(root, ignore_errors=True)

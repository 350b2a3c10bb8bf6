"""Shared fixtures: real backends per runtime, a session image store, and leak checks.

Every sandbox a test creates is tagged and destroyed in a finalizer; after each
module the leak check asserts nothing is left: sandbox processes, cgroups under
/corral, mounts and directories under the state dirs the module used.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral._sys import cgroups, mounts, procs
from corral.backends.base import Backend, HostMount, ImageRef, SandboxConfig, SandboxLimits
from corral.backends.oci import OciBackend
from corral.backends.podman import PodmanBackend
from corral.backends.podman.service import service_pids
from corral.images import ImageStore
from corral.spec.template import load_template
from tests.postgres_harness import PostgresServer
from tests.server_harness import ServerProcess

RUNTIMES = ("crun", "runc", "runsc")
# The podman backend on each runtime, as `harness` parameters ("podman/<runtime>").
PODMAN_HARNESSES = tuple(f"podman/{runtime}" for runtime in RUNTIMES)
# Test modules whose `harness` also runs on podman (the others stay on the oci backend).
PODMAN_SUITES = ("tests.test_conformance", "tests.test_hostile")
# Test modules whose `harness` also runs on the microvm backend (QEMU; select with -k microvm).
MICROVM_SUITES = ("tests.test_conformance",)
TEST_LABEL = {"corral.test": "1"}


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the runtime tests need root (CI runs them as root)")


def require_binary(name: str) -> None:
    # In CI every prerequisite is installed: a missing one is a failure, never a skip.
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: run `bash .ci/setup` (apt-get install {name})")


def traversable_dir(prefix: str) -> Path:
    """A fresh dir whose ancestors a user-namespaced sandbox root can traverse.

    pytest's tmp dirs sit under a 0700 directory; the runtime, running as the
    sandbox's mapped root, could not reach a rootfs or scratch inside them.
    """
    path = Path(tempfile.mkdtemp(prefix=f"corral-{prefix}-", dir="/var/tmp"))
    path.chmod(0o755)
    return path


def counter_script(interval: float = 0.2) -> str:
    """A shell loop that counts in memory and publishes each value to /tmp/count by
    rename, so a reader never sees the file half-written: a restarted process would
    count from 1 again, a restored one goes on."""
    return (
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new;"
        f" mv /tmp/count.new /tmp/count; sleep {interval}; done"
    )


@pytest.fixture(scope="session")
def image_store() -> Iterator[ImageStore]:
    root = traversable_dir("images")
    yield ImageStore(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def default_image(image_store: ImageStore) -> Any:
    return image_store.build(load_template("default"))


@dataclass
class Harness:
    """A backend under test plus what a test needs to make sandboxes with it."""

    backend: Backend
    image: ImageRef
    host_mounts: tuple[HostMount, ...]
    runtime: str | None = None
    created: list[str] = field(default_factory=list)
    state_dir: Path | None = None

    def reopen(self) -> Backend:
        """A second instance of the backend on the same state dir (as another process has)."""
        assert self.state_dir is not None
        return type(self.backend)(self.state_dir, runtime=self.runtime or "crun")  # type: ignore[call-arg]

    def config(self, **overrides: Any) -> SandboxConfig:
        sandbox_id = overrides.pop("sandbox_id", "sb-t" + secrets.token_hex(5))
        self.created.append(sandbox_id)
        values: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "image": self.image,
            "limits": SandboxLimits(memory=256 << 20, pids=128, disk=64 << 20),
            "mounts": list(self.host_mounts),
            "labels": TEST_LABEL,
            "runtime": self.runtime,
        }
        values.update(overrides)
        return SandboxConfig(**values)

    async def sandbox(self, **overrides: Any) -> str:
        config = self.config(**overrides)
        await self.backend.create(config)
        return config.sandbox_id


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    """A state dir per module; the leak check runs when the module is done."""
    root = traversable_dir("state")
    inits_before = _sandbox_inits()
    yield root
    assert_no_leaks(root, inits_before)
    stop_podman_services(root)
    shutil.rmtree(root, ignore_errors=True)


def assert_no_leaks(root: Path, inits_before: set[int]) -> None:
    """Nothing of a sandbox is left under state dir `root` (then its cgroup parent goes)."""
    cgroup_parent = OciBackend(root).cgroup_parent
    leaks: list[str] = []
    left_cgroups = cgroups.children(cgroup_parent)
    if left_cgroups:
        leaks.append(f"cgroups under {cgroup_parent}: {sorted(left_cgroups)}")
    left_pids = cgroups.pids(cgroup_parent)
    if left_pids:
        leaks.append(f"processes in {cgroup_parent}: {left_pids}")
    left_mounts = mounts.mounts_under(root)
    if left_mounts:
        leaks.append(f"mounts: {left_mounts}")
    sandboxes = root / "sandboxes"
    if sandboxes.is_dir() and any(sandboxes.iterdir()):
        leaks.append(f"sandbox dirs: {sorted(p.name for p in sandboxes.iterdir())}")
    left_containers = _podman_containers(root)
    if left_containers:
        leaks.append(f"podman containers: {left_containers}")
    new_inits = _sandbox_inits(root) - inits_before
    if new_inits:
        leaks.append(f"sandbox processes: {sorted(new_inits)}")
    assert not leaks, "leaked: " + "; ".join(leaks)
    cgroups.remove(cgroup_parent)  # the install's now-empty parent


def stop_podman_services(state_dir: Path, deadline: float = 15.0) -> None:
    """Stop the Podman API services still serving under `state_dir` and wait until they
    are gone. One started by a process that has ended (a `corral serve`, a CLI run)
    gets SIGTERM from the kernel when its starter dies, or idles out 30 s later; if
    it exits after the state dir was removed, it re-creates its storage skeleton
    there (a 0700 `corral-state-*` dir with only `podman/` left in /var/tmp)."""
    pids = service_pids(PodmanBackend(state_dir).podman.home)
    for sig, wait in ((signal.SIGTERM, deadline), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + wait
        while (pids := [pid for pid in pids if procs.running(pid)]) and time.monotonic() < end:
            time.sleep(0.05)
    assert not pids, f"podman services under {state_dir} would not stop: {pids}"


def _podman_containers(state_dir: Path) -> list[str]:
    """Sandbox containers in the podman backend's storage under `state_dir`."""
    podman = PodmanBackend(state_dir).podman
    if not podman.storage_conf.exists():
        return []
    listed = subprocess.run(
        [
            "podman",
            "ps",
            "--all",
            "--filter",
            "label=io.corral.sandbox-id",
            "--format",
            "{{.Names}}",
        ],
        env=podman.env,
        capture_output=True,
        text=True,
        check=False,
    )
    return listed.stdout.split() if listed.returncode == 0 else [f"podman ps: {listed.stderr}"]


def _sandbox_inits(root: Path | None = None) -> set[int]:
    """Host pids of sandbox main processes (catatonit as /.corral/init), gVisor
    sandboxes and port forwarders; with `root`, only those of sandboxes under that
    state dir (so tests running elsewhere at the same time are not counted)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # Sandbox inits, gVisor's processes, and Corral's port forwarders.
        forwarder = b"/corral/_sys/portfwd.py\0" in cmdline
        if not forwarder and not cmdline.startswith(
            (b"/.corral/init", b"runsc-sandbox", b"runsc-gofer")
        ):
            continue
        if root is not None and not _belongs_to(int(entry), cmdline, root):
            continue
        found.add(int(entry))
    return found


def _belongs_to(pid: int, cmdline: bytes, root: Path) -> bool:
    """Whether a sandbox process runs from state dir `root`: its rootfs (for the
    catatonit init) or its runtime state (runsc's --root) lies under it. When that
    cannot be read, it counts as ours (a leak check must not miss leaks)."""
    if str(root).encode() in cmdline:
        return True
    try:
        return os.readlink(f"/proc/{pid}/root").startswith(str(root))
    except OSError:
        return True


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`harness` runs on oci/<runtime>, and on podman/<runtime> in PODMAN_SUITES."""
    if "harness" in metafunc.fixturenames and not _parametrizes_harness(metafunc):
        podman = metafunc.module.__name__ in PODMAN_SUITES
        params = [*RUNTIMES, *PODMAN_HARNESSES] if podman else list(RUNTIMES)
        if metafunc.module.__name__ in MICROVM_SUITES:
            params.append("microvm")
        metafunc.parametrize("harness", params, indirect=True)


# Shared tests that still name the oci backend where they mean "this backend".
def _parametrizes_harness(metafunc: pytest.Metafunc) -> bool:
    """True when the test picks its own harness parameters (@parametrize(..., indirect))."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "harness" in names:
            return True
    return False


@pytest.fixture
async def harness(
    request: pytest.FixtureRequest, state_root: Path, default_image: Any
) -> AsyncIterator[Harness]:
    """A real backend on each real runtime: oci/<runtime> ("crun", "runc", "runsc") and,
    for PODMAN_SUITES, podman/<runtime>. Every sandbox is destroyed afterwards."""
    require_root()
    if request.param == "microvm":
        async for h in _microvm_harness(state_root, default_image):
            yield h
        return
    backend_name, _, runtime = str(request.param).rpartition("/")
    require_binary(runtime)
    require_binary("catatonit")
    backend: Backend
    if backend_name == "podman":
        require_binary("podman")
        backend = PodmanBackend(state_root, runtime=runtime)
    else:
        backend = OciBackend(state_root, runtime=runtime)
    h = Harness(
        backend, default_image.to_ref(), tuple(default_image.host_mounts), runtime, [], state_root
    )
    yield h
    for sandbox_id in h.created:
        await backend.destroy(sandbox_id)


async def _microvm_harness(state_root: Path, default_image: Any) -> AsyncIterator[Harness]:
    from corral.backends.microvm import MicrovmBackend

    require_binary("qemu-system-x86_64")
    backend = MicrovmBackend(state_root)
    h = Harness(
        backend, default_image.to_ref(), tuple(default_image.host_mounts), None, [], state_root
    )
    yield h
    for sandbox_id in h.created:
        await backend.destroy(sandbox_id)


@dataclass
class ApiServer:
    """The session's `corral serve` (oci backend) and keys for two tenants and an admin."""

    process: ServerProcess
    key_a: str
    key_b: str
    admin_key: str

    @property
    def url(self) -> str:
        return self.process.url


@pytest.fixture(scope="session")
def api_server() -> Iterator[ApiServer]:
    """A real server on a loopback port for the whole session (SDK, CLI, API tests).
    Leak-checked when the session ends."""
    require_root()
    root = traversable_dir("server")
    inits_before = _sandbox_inits()
    process = ServerProcess(
        root, config="[server]\nreap_interval = 0.2\nmax_upload_bytes = 1048576\n"
    )
    key_a = process.tenant("tenant-a")
    key_b = process.tenant("tenant-b")
    admin_key = process.tenant("ops", admin=True)
    process.start()
    try:
        yield ApiServer(process, key_a, key_b, admin_key)
    finally:
        process.stop()
        # Destroy whatever tests left (by the store), then nothing may remain.
        for record in process.store.list():
            subprocess.run(
                [str(Path(sys.executable).with_name("corral")), "rm", record.id],
                env=process.env(),
                check=False,
                capture_output=True,
            )
        leftovers = [r.id for r in process.store.list()]
        process.close()
        assert not leftovers, f"sandboxes left on the session server: {leftovers}"
        assert_no_leaks(root, inits_before)
        stop_podman_services(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (installed by scripts/setup)."""
    root = traversable_dir("pg")
    server = PostgresServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'corral.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database("t_" + secrets.token_hex(6))

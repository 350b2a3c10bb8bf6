"""Hostile workloads on every runtime: the sandbox holds; the host and its neighbours stay fine.

Runs on the oci and the podman backend (conftest.PODMAN_SUITES); host-side checks
look at the cgroup the backend puts the sandbox's processes in.

The workloads live in tests/hostile/: one Rust program (std only, raw syscalls
through `asm!`) with a mode per behaviour, built once per session with the
host's rustc, and a few POSIX shell snippets. Where gVisor (runsc) behaves
differently from crun/runc, the test asserts what gVisor does and says why.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from corral.backends.base import BackendStatus, ExecRequest, ExecResult, SandboxLimits
from corral.backends.oci.backend import OciBackend
from corral.backends.oci.bundle import UID_BASE
from corral.backends.podman import PodmanBackend
from tests.conftest import Harness, require_binary

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

HOSTILE_DIR = Path(__file__).parent / "hostile"
BINARY = "/work/hostile"
SANDBOX_UID = 1000
# How long past its own timeout an exec may run before the test calls it hung.
HANG_MARGIN = 30.0
# The longest a neighbour's `echo` may take while another sandbox misbehaves.
NEIGHBOUR_LATENCY = 2.0
# Other engineers' tests share this host; host-wide process counts get this much slack.
HOST_PROCESS_SLACK = 200
ZERO_CAPS = "0" * 16

# -- workloads -------------------------------------------------------------


@pytest.fixture(scope="session")
def hostile_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """tests/hostile/hostile.rs built with the host's rustc.

    Dynamically linked to glibc, which every sandbox has through the bound /usr.
    """
    require_binary("rustc")
    out = tmp_path_factory.mktemp("hostile") / "hostile"
    source = HOSTILE_DIR / "hostile.rs"
    argv = ["rustc", "-O", "--edition", "2021", "-C", "strip=symbols", "-o", str(out), str(source)]
    build = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, f"rustc could not build {source}:\n{build.stderr}"
    return out.read_bytes()


def snippet(name: str) -> bytes:
    return (HOSTILE_DIR / name).read_bytes()


async def hostile_sandbox(
    harness: Harness, binary: bytes, limits: SandboxLimits | None = None
) -> str:
    """A sandbox (limits or the harness defaults) holding the hostile binary at BINARY."""
    sid = await (harness.sandbox(limits=limits) if limits else harness.sandbox())
    await harness.backend.put_file(sid, BINARY, binary, mode=0o755)
    return sid


async def run(
    harness: Harness, sid: str, argv: Sequence[str], *, timeout: float = 10
) -> ExecResult:
    """Run with a timeout; an exec its timeout does not end fails the test instead of hanging it."""
    request = ExecRequest(list(argv), timeout=timeout)
    try:
        return await asyncio.wait_for(harness.backend.exec(sid, request), timeout + HANG_MARGIN)
    except TimeoutError:
        pytest.fail(f"{argv} was still running {HANG_MARGIN}s after its {timeout}s timeout")


async def hostile(harness: Harness, sid: str, *args: str, timeout: float = 10) -> ExecResult:
    return await run(harness, sid, [BINARY, *args], timeout=timeout)


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def fields(output: bytes) -> dict[str, str]:
    """The `key=value` tokens a workload printed; a later value of a key wins."""
    found: dict[str, str] = {}
    for line in output.decode(errors="replace").splitlines():
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                found[key] = value
    return found


async def echo_latency(harness: Harness, sid: str) -> float:
    started = time.monotonic()
    result = await run(harness, sid, ["echo", "ok"], timeout=10)
    assert result.stdout == b"ok\n", f"the neighbour stopped answering: {result}"
    return time.monotonic() - started


async def ping_until_done(
    harness: Harness, sid: str, busy: Sequence[asyncio.Task[object]]
) -> list[float]:
    """Time `echo` in the neighbour `sid` over and over until every task in `busy` is done."""
    latencies: list[float] = []
    while not all(task.done() for task in busy):
        latencies.append(await echo_latency(harness, sid))
        await asyncio.sleep(0.2)
    return latencies


# -- the host's view -------------------------------------------------------


def host_pids() -> set[int]:
    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}


def sandbox_cgroup(harness: Harness, sandbox_id: str) -> str:
    """The cgroup holding the sandbox's processes: the oci backend's per-sandbox cgroup,
    or the podman container's own (podman's conmon, host root, sits beside it)."""
    backend = harness.backend
    if isinstance(backend, PodmanBackend):
        return backend.cgroup(sandbox_id)
    assert isinstance(backend, OciBackend)
    return f"{backend.cgroup_parent}/{sandbox_id}"


def sandbox_host_processes(harness: Harness, sandbox_id: str) -> dict[int, str]:
    """Host pid -> /proc/PID/status of every host process in the sandbox's cgroup."""
    cgroup = sandbox_cgroup(harness, sandbox_id)
    found: dict[int, str] = {}
    for pid in host_pids():
        try:
            membership = Path(f"/proc/{pid}/cgroup").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        paths = {line.split(":", 2)[-1] for line in membership.splitlines()}
        if any(path == cgroup or path.startswith(cgroup + "/") for path in paths):
            found[pid] = status
    return found


def status_field(status: str, name: str) -> str:
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def host_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


async def settled(harness: Harness, sandbox_id: str, most: int, within: float = 10) -> int:
    """Wait until at most `most` host processes remain in the sandbox's cgroup; return the count."""
    deadline = time.monotonic() + within
    while True:
        count = len(sandbox_host_processes(harness, sandbox_id))
        if count <= most or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


# -- resource limits -------------------------------------------------------


@pytest.mark.parametrize("bomb", ["raw-fork", "shell"])
async def test_fork_bomb_is_capped_by_pids(
    harness: Harness, hostile_binary: bytes, bomb: str
) -> None:
    # gVisor's sentry and gofer alone hold ~50 host threads, all counted by the pids cgroup.
    pids_limit = 128 if harness.runtime == "runsc" else 64
    neighbour = await harness.sandbox()
    limits = SandboxLimits(pids=pids_limit, vcpus=0.5, memory=256 << 20, disk=64 << 20)
    sid = await hostile_sandbox(harness, hostile_binary, limits)
    if bomb == "shell":
        await harness.backend.put_file(sid, "/work/forkbomb.sh", snippet("forkbomb.sh"))
        argv = ["/bin/sh", "/work/forkbomb.sh"]
    else:
        argv = [BINARY, "forkbomb"]
    host_before = len(host_pids())

    bombing = asyncio.create_task(run(harness, sid, argv, timeout=3))
    peak = 0
    latencies: list[float] = []
    while not bombing.done():
        peak = max(peak, len(sandbox_host_processes(harness, sid)))
        latencies.append(await echo_latency(harness, neighbour))
        await asyncio.sleep(0.1)
    result = await bombing

    assert result.duration < 3 + 5, f"the bomb outlived its timeout: {result}"
    assert peak <= pids_limit, f"the host saw {peak} processes in a sandbox limited to {pids_limit}"
    assert latencies, "the neighbour was never asked while the bomb ran"
    assert max(latencies) < NEIGHBOUR_LATENCY, latencies
    assert await echo_latency(harness, neighbour) < NEIGHBOUR_LATENCY
    if harness.runtime == "runsc":
        # gVisor: guest processes are not host processes, but the sentry's threads and
        # (on the ptrace platform) one stub process per address space are. The bomb
        # drives them into the host pids limit, Go cannot start an OS thread
        # ("fatal error: newosproc" in the sentry's log) and the whole sandbox dies:
        # the exec ends early and the sandbox is stopped. `runsc exec` itself reports
        # 128 or, now and then, 0: Corral checks the sandbox and says what happened.
        assert result.exit_code == 128, result
        assert result.reason is not None, result
        assert "gVisor kernel exited" in result.reason, result
        assert await harness.backend.status(sid) == BackendStatus.STOPPED
        assert await settled(harness, sid, most=0) == 0, "processes of a dead gVisor sandbox linger"
    else:
        if bomb == "raw-fork":
            assert result.timed_out, result
            assert int(fields(result.stdout)["eagain"]) > 0, "fork never failed: no pids limit"
        else:
            # dash gives up when fork fails, so the shell bomb may collapse before its timeout.
            assert b"Cannot fork" in result.stderr, result
        assert await settled(harness, sid, most=1) <= 1, "bomb processes survived the exec"
        assert (await run(harness, sid, ["echo", "ok"])).stdout == b"ok\n"
        assert (await harness.backend.stats(sid)).pids <= 2
    grown = len(host_pids()) - host_before
    assert grown < HOST_PROCESS_SLACK, f"the host has {grown} more processes than before the bomb"


async def test_memory_hog_is_killed_as_out_of_memory(
    harness: Harness, hostile_binary: bytes
) -> None:
    limit_mib = 128
    limits = SandboxLimits(memory=limit_mib << 20, pids=128, disk=64 << 20)
    sid = await hostile_sandbox(harness, hostile_binary, limits)
    result = await hostile(harness, sid, "memhog", "512", timeout=30)
    report = fields(result.stdout)
    assert "done_mib" not in report, "touched 512 MiB under a 128 MiB limit"
    assert 0 < int(report.get("touched_mib", "0")) < limit_mib, result
    assert result.oom_killed, result
    assert (await harness.backend.stats(sid)).oom_kills > 0
    if harness.runtime == "runsc":
        # gVisor: guest memory is the sentry's (a memfd it maps into its stubs), so the
        # host OOM killer strikes inside the sentry's cgroup and the whole sandbox dies.
        # The exit code/reason are test_gvisor_oom_is_reported_as_out_of_memory's business.
        assert await harness.backend.status(sid) == BackendStatus.STOPPED
        assert await settled(harness, sid, most=0) == 0
        return
    assert result.exit_code == 137, result
    assert result.reason is not None, result
    assert "memory" in result.reason, result
    # Only the hog died: the sandbox answers and still has its memory to use.
    again = await hostile(harness, sid, "memhog", "64", timeout=30)
    assert fields(again.stdout).get("done_mib") == "64", again


@pytest.mark.parametrize("harness", ["runsc", "podman/runsc"], indirect=True)
async def test_gvisor_oom_is_reported_as_out_of_memory(
    harness: Harness, hostile_binary: bytes
) -> None:
    sid = await hostile_sandbox(harness, hostile_binary, SandboxLimits(memory=128 << 20))
    result = await hostile(harness, sid, "memhog", "512", timeout=30)
    assert result.oom_killed
    assert result.exit_code == 137, result
    assert result.reason is not None, result
    assert "memory" in result.reason, result


async def test_cpu_spinner_is_held_to_its_quota(harness: Harness, hostile_binary: bytes) -> None:
    vcpus = 0.2
    limits = SandboxLimits(vcpus=vcpus, pids=128, memory=256 << 20, disk=64 << 20)
    sid = await hostile_sandbox(harness, hostile_binary, limits)
    before = await harness.backend.stats(sid)
    started = time.monotonic()
    result = await hostile(harness, sid, "spin", "2", "2", timeout=20)
    wall = time.monotonic() - started
    used = (await harness.backend.stats(sid)).cpu_seconds - before.cpu_seconds
    assert result.exit_code == 0, result
    # Unthrottled, two spinning threads would use ~4 cpu-seconds on our 2 cores. Under
    # runsc the cgroup holds the sentry, gofer and stubs: the quota covers gVisor's own
    # work too, and it measures the same ~0.2 cpu-seconds per second of wall time.
    assert used <= vcpus * wall * 1.5 + 0.1, f"{used:.2f} cpu-s in {wall:.2f} s at {vcpus} vcpus"
    assert used >= vcpus * wall * 0.5, f"the spinner barely ran ({used:.2f} cpu-s): nothing tested"


async def test_scratch_disk_fill_is_capped(
    harness: Harness, hostile_binary: bytes, state_root: Path
) -> None:
    disk = 32 << 20
    limits = SandboxLimits(disk=disk, memory=256 << 20, pids=128)
    sid = await hostile_sandbox(harness, hostile_binary, limits)
    await harness.backend.put_file(sid, "/work/fill.sh", snippet("fill.sh"))

    shell = await run(harness, sid, ["/bin/sh", "/work/fill.sh", "/tmp/fill"], timeout=30)
    assert b"No space left on device" in shell.stderr, shell
    assert disk // 2 < int(fields(shell.stdout)["written"]) <= disk, shell
    cleared = await run(harness, sid, sh("rm /tmp/fill && echo cleared"))
    assert cleared.stdout == b"cleared\n", cleared

    result = await hostile(harness, sid, "diskfill", "/work/fill", "100", timeout=30)
    report = fields(result.stdout)
    assert report["error"] == "ENOSPC", result
    written = int(report["written"])
    assert disk // 2 < written <= disk, result
    # The scratch is a tmpfs: its pages count against the sandbox's memory (under
    # runsc the gofer that writes them sits in the sandbox's cgroup too) ...
    assert (await harness.backend.stats(sid)).memory_bytes >= written * 0.9
    # ... and nothing the sandbox holds on the host's disk grew.
    disk_device = state_root.stat().st_dev
    on_disk = 0
    for directory, _dirs, files in os.walk(state_root / "sandboxes" / sid):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            if info.st_dev == disk_device:
                on_disk += info.st_blocks * 512
    assert on_disk < 1 << 20, f"{on_disk} bytes of the sandbox landed on the host's disk"
    # A full scratch leaves the sandbox usable, and freeing it gives the space back.
    assert (await run(harness, sid, ["echo", "ok"])).stdout == b"ok\n"
    await run(harness, sid, ["rm", "/work/fill"])
    refill = await hostile(harness, sid, "diskfill", "/work/again", "4", timeout=30)
    assert fields(refill.stdout)["error"] == "none", refill


# -- isolation -------------------------------------------------------------


async def test_no_network_egress(harness: Harness, hostile_binary: bytes) -> None:
    sid = await hostile_sandbox(harness, hostile_binary)
    abstract_name = f"corral-hostile-{secrets.token_hex(6)}"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        port = tcp.getsockname()[1]
        abstract.bind("\0" + abstract_name)
        abstract.listen(8)
        # The listeners work from the host: a sandbox that connected would be seen.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            tcp.accept()[0].close()

        loopback = await hostile(harness, sid, "connect", "127.0.0.1", str(port))
        unix = await hostile(harness, sid, "connect-abstract", abstract_name)

        # A completed handshake waits in the backlog whether or not we accepted it.
        for listener in (tcp, abstract):
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()
    # The sandbox's 127.0.0.1 is its own empty loopback; abstract unix sockets are per
    # network namespace (gVisor: per sentry), so the host's is not there either.
    assert fields(loopback.stdout) == {"connect": "failed", "error": "ECONNREFUSED"}, loopback
    assert fields(unix.stdout) == {"connect": "failed", "error": "ECONNREFUSED"}, unix

    # No way off the box either: only a loopback interface and no route. (Nothing is
    # sent to a non-loopback address: this suite never puts traffic on the wire.)
    net = await run(harness, sid, sh("cat /proc/net/route; echo ---; cat /proc/net/dev"))
    route, _, dev = net.stdout.decode().partition("---\n")
    assert net.exit_code == 0, net
    assert route.strip().splitlines()[1:] == [], f"the sandbox has routes:\n{route}"
    interfaces = [line.split(":")[0].strip() for line in dev.splitlines() if ":" in line]
    assert interfaces == ["lo"], dev


@pytest.fixture
def host_secret() -> Iterator[Path]:
    """A world-readable file on the host, outside every sandbox mount."""
    directory = Path(tempfile.mkdtemp(prefix="corral-secret-", dir="/var/tmp"))
    directory.chmod(0o755)
    secret = directory / "secret"
    secret.write_text(f"host secret {secrets.token_hex(16)}\n")
    secret.chmod(0o644)
    yield secret
    shutil.rmtree(directory)


async def test_host_files_are_out_of_reach(
    harness: Harness, hostile_binary: bytes, host_secret: Path
) -> None:
    sid = await hostile_sandbox(harness, hostile_binary)
    token = host_secret.read_text().split()[-1].encode()
    attempts = [
        str(host_secret),
        f"/proc/1/root{host_secret}",
        f"/proc/self/root/../..{host_secret}",
        f"/proc/{os.getpid()}/root{host_secret}",  # the test process's root, were it visible
        "/etc/shadow",
    ]
    attempts += [f"/root/{entry}" for entry in sorted(os.listdir("/root"))[:5]]
    host_shadow = Path("/etc/shadow").read_bytes()
    for path in attempts:
        result = await hostile(harness, sid, "read", path)
        assert token not in result.stdout, f"read the host's secret through {path}"
        report = fields(result.stdout.splitlines()[0] if result.stdout else b"")
        if report.get("read") == "ok":
            # The image may have files of its own at these paths, never the host's.
            assert path.startswith(("/etc/", "/root/")), (path, result)
            assert host_shadow.strip() not in result.stdout, f"{path} is the host's: {result}"
        else:
            assert report.get("read") == "failed", (path, result)
            assert report["error"] in ("ENOENT", "EACCES"), (path, result)


async def test_host_processes_are_invisible(harness: Harness, hostile_binary: bytes) -> None:
    sid = await hostile_sandbox(harness, hostile_binary)
    result = await hostile(harness, sid, "pids")
    seen: dict[int, str] = {}
    for line in result.stdout.decode().splitlines():
        if line.startswith("pid="):
            pid, _, command = line.removeprefix("pid=").partition(" cmd=")
            seen[int(pid)] = command
    assert seen.get(1, "").startswith("/.corral/init"), seen
    assert set(seen.values()) <= {"/.corral/init -P", f"{BINARY} pids"}, seen
    assert int(fields(result.stdout)["count"]) == len(seen) <= 3, seen
    # The test process's pid inside (if it exists there at all) is not the test process.
    mine = host_cmdline(os.getpid())
    probe = await hostile(harness, sid, "read", f"/proc/{os.getpid()}/cmdline")
    assert mine.encode() not in probe.stdout.replace(b"\0", b" "), probe


async def test_rootfs_is_read_only(harness: Harness, hostile_binary: bytes) -> None:
    sid = await hostile_sandbox(harness, hostile_binary)
    name = f"corral-hostile-{secrets.token_hex(6)}"
    # /usr is the host's own /usr and /.corral/init the init every sandbox shares.
    targets = [f"/usr/{name}", f"/etc/{name}", f"/{name}", "/.corral/init", f"/.corral/{name}"]
    targets.append("/proc/sys/kernel/hostname")
    # gVisor answers writes to its read-only mounts with EACCES rather than EROFS.
    expected = "EACCES" if harness.runtime == "runsc" else "EROFS"
    for path in targets:
        result = await hostile(harness, sid, "write", path)
        assert fields(result.stdout) == {"write": "failed", "error": expected}, (path, result)
    assert not Path(f"/usr/{name}").exists(), "the sandbox wrote into the host's /usr"


async def test_runs_unprivileged(harness: Harness, hostile_binary: bytes) -> None:
    sid = await hostile_sandbox(harness, hostile_binary)
    probe = fields((await hostile(harness, sid, "rawsyscalls")).stdout)
    await harness.backend.put_file(sid, "/work/whoami.sh", snippet("whoami.sh"))
    status = fields((await run(harness, sid, ["/bin/sh", "/work/whoami.sh"])).stdout)

    uid = str(SANDBOX_UID)
    assert (probe["uid"], probe["euid"], probe["gid"], status["id_u"]) == (uid, uid, uid, uid)
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd"):
        assert status[caps] == ZERO_CAPS, (caps, status)
    for call in ("setuid0", "mount", "chroot", "ptrace_init"):
        assert probe[call] == "EPERM", (call, probe)
    if harness.runtime == "runsc":
        # gVisor implements these calls in its sentry. runsc does not load the OCI
        # seccomp profile for `runsc exec` processes (its --oci-seccomp covers only the
        # init), so status shows Seccomp 0 and no NoNewPrivs line, and unshare() works:
        # the new namespaces exist only inside the sentry's kernel. setns() on another
        # netns file is EOPNOTSUPP there.
        assert status["Seccomp"] == "0", status
        assert "NoNewPrivs" not in status, status
        assert probe["unshare_user"] == "ok", probe
        assert probe["setns_init_net"] == "EOPNOTSUPP", probe
    else:
        assert status["CapAmb"] == ZERO_CAPS, status
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), status
        for call in ("setns_init_net", "unshare_user", "unshare_net", "unshare_mount"):
            assert probe[call] == "EPERM", (call, probe)

    # The host's view, with a command running: nobody in the sandbox is host root.
    sleeper = asyncio.create_task(run(harness, sid, ["sleep", "3"]))
    try:
        deadline = time.monotonic() + 5
        processes = sandbox_host_processes(harness, sid)
        while len(processes) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            processes = sandbox_host_processes(harness, sid)
    finally:
        await sleeper
    assert processes, "no host process found in the sandbox's cgroup"
    for pid, text in processes.items():
        uids = set(status_field(text, "Uid").split())
        if harness.runtime == "runsc":
            # gVisor's sentry and stubs run as nobody; its gofer (the file proxy) is
            # host root with a few file capabilities, by gVisor's design.
            if host_cmdline(pid).startswith("runsc-gofer"):
                continue
            assert uids == {"65534"}, (pid, host_cmdline(pid), text)
        else:
            assert uids == {str(UID_BASE + SANDBOX_UID)}, (pid, host_cmdline(pid), text)
            assert status_field(text, "CapEff") == ZERO_CAPS, text
        assert status_field(text, "NoNewPrivs") == "1", text


async def test_sysfs_shows_no_host_devices_or_cgroups(
    harness: Harness, hostile_binary: bytes, request: pytest.FixtureRequest
) -> None:
    neighbour = await harness.sandbox()
    sid = await hostile_sandbox(harness, hostile_binary)
    script = f"""
        for p in /sys/class/net/*; do echo "iface=${{p##*/}}"; done
        cat /sys/class/net/*/address 2>/dev/null
        for p in /sys/fs/cgroup/*/corral /sys/fs/cgroup/corral; do
            test -e "$p" && echo "seen=$p"
        done
        test -e /sys/fs/cgroup/memory/corral/{neighbour} && echo "neighbour=visible"
        true
    """
    result = await run(harness, sid, sh(script))
    lines = result.stdout.decode().splitlines()
    assert [line for line in lines if line.startswith("iface=")] == ["iface=lo"], lines
    assert not [line for line in lines if line.startswith(("seen=", "neighbour="))], lines
    host_macs = set()
    for address in Path("/sys/class/net").glob("*/address"):
        mac = address.read_text().strip()
        if mac and mac != "00:00:00:00:00:00":
            host_macs.add(mac)
    assert not host_macs & set(lines), "the sandbox reads the host's MAC addresses"


async def test_timeout_kills_a_command_that_left_its_session(
    harness: Harness, hostile_binary: bytes, request: pytest.FixtureRequest
) -> None:
    sid = await hostile_sandbox(harness, hostile_binary)
    # `escape 6`: fork, setsid() in the child, write a heartbeat for 6 s.
    result = await hostile(harness, sid, "escape", "6", timeout=1)
    assert result.timed_out, result
    assert result.duration < 4, f"the exec ended {result.duration:.1f}s after a 1s timeout"
    beat = sh("cat /tmp/escape-heartbeat 2>/dev/null || echo none")
    first = (await run(harness, sid, beat)).stdout
    await asyncio.sleep(0.5)
    second = (await run(harness, sid, beat)).stdout
    assert first == second, "the escaped process still runs after the timeout"


# -- neighbours ------------------------------------------------------------


async def test_neighbour_answers_while_one_misbehaves(
    harness: Harness, hostile_binary: bytes
) -> None:
    neighbour = await harness.sandbox()
    limits = SandboxLimits(vcpus=1.0, memory=128 << 20, pids=128, disk=64 << 20)
    noisy = await hostile_sandbox(harness, hostile_binary, limits)

    async def hog_repeatedly() -> None:
        # Start once the spinner is busy; under runsc the first OOM ends the sandbox.
        await asyncio.sleep(1)
        for _ in range(3):
            result = await hostile(harness, noisy, "memhog", "512", timeout=10)
            if result.exit_code != 137:
                return
            await asyncio.sleep(0.3)

    spinner = asyncio.create_task(hostile(harness, noisy, "spin", "2", "3", timeout=10))
    hog = asyncio.create_task(hog_repeatedly())
    latencies = await ping_until_done(harness, neighbour, [spinner, hog])
    await spinner
    await hog
    assert len(latencies) >= 3, latencies
    assert max(latencies) < NEIGHBOUR_LATENCY, latencies

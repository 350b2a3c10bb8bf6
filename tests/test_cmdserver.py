"""The CLI command server: same behaviour as a direct run, warm, and it always leaves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.cli.cmdserver import stop_server
from corral.cli.launcher import SOCKET_NAME, run_through_server, send_request

pytestmark = pytest.mark.runtime
CORRAL = [sys.executable, "-m", "corral.cli"]


def env_for(state: Path, mode: str) -> dict[str, str]:
    return {**os.environ, "CORRAL_STATE_DIR": str(state), "CORRAL_CLI_SERVER": mode,
            "CORRAL_RUNTIME": "crun"}  # fmt: skip


def corral(state: Path, *args: str, mode: str = "require", stdin: bytes | None = None):
    return subprocess.run(
        [*CORRAL, *args], input=stdin, capture_output=True, env=env_for(state, mode),
        timeout=120, check=False,
    )  # fmt: skip


def server_pids(state: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"corral.cli.cmdserver" in cmdline and str(state).encode() in cmdline:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def served(state_root: Path) -> Iterator[Path]:
    """A state dir whose command server was started by a first, direct command."""
    first = corral(state_root, "run", "--", "/bin/true", mode="1")
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + 60
    while not (state_root / SOCKET_NAME).exists():
        assert time.monotonic() < deadline, "the command server never came up"
        time.sleep(0.1)
    yield state_root
    assert stop_server(state_root)
    deadline = time.monotonic() + 10
    while server_pids(state_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_pids(state_root) == [], "the command server outlived stop_server"


def test_output_and_status_pass_through(served: Path) -> None:
    r = corral(served, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_reasons_and_stdin(served: Path) -> None:
    r = corral(served, "run", "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 124
    assert r.stderr.decode().strip().endswith("corral: timed out after 1s; killed")
    sandbox = corral(served, "create").stdout.decode().strip()
    try:
        r = corral(served, "exec", "-i", sandbox, "--", "cat", stdin=b"through the server")
        assert r.stdout == b"through the server"
    finally:
        assert corral(served, "rm", sandbox).returncode == 0
    bad = corral(served, "run", "--template", "nosuch", "--", "true")
    assert bad.returncode == 125
    assert "unknown template 'nosuch'" in bad.stderr.decode()


def test_interrupt_is_forwarded_and_the_sandbox_destroyed(served: Path) -> None:
    client = subprocess.Popen(
        [*CORRAL, "run", "--", "sleep", "60"], env=env_for(served, "require"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not any((served / "sandboxes").glob("sb-*")):
        assert time.monotonic() < deadline, "the sandbox never appeared"
        time.sleep(0.05)
    client.send_signal(signal.SIGINT)
    client.communicate(timeout=30)
    assert client.returncode != 0
    assert corral(served, "ls", "--json").stdout.strip() == b"[]"
    assert not any((served / "sandboxes").glob("sb-*"))


def test_other_users_are_refused(served: Path) -> None:
    path = str(served / SOCKET_NAME)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            send_request(conn, ["run", "--", "/bin/true"], "any")
            code = 0 if conn.recv(4) == b"" else 1
        except PermissionError:
            code = 0  # the socket's 0600 mode already keeps it out
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a foreign uid got an answer"


def test_stale_code_makes_the_server_leave(state_root: Path, served: Path) -> None:
    # Last in the module: a client with other code gets "run it yourself" and the
    # server leaves (the fixture's stop then finds nothing to stop).
    assert run_through_server(str(served / SOCKET_NAME), ["ls"], "other-code") is None
    deadline = time.monotonic() + 10
    while server_pids(served) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_pids(served) == []
    r = corral(served, "run", "--", "/bin/true", mode="0")
    assert r.returncode == 0

"""The `corral` entry point: hand the command to a warm command server, or run it here.

Importing typer, pydantic and SQLAlchemy costs ~0.5 s per process, ten times
the work of a sandbox run. Like Mercurial's chg, a per-state-dir command server
keeps them imported and forks a child per command; this client (stdlib only)
passes it argv, cwd, the environment and its own stdin/stdout/stderr file
descriptors, then waits for the exit status. The child runs the very same typer
app, writing straight to this process's terminal or pipes.

No server yet: the command runs here as usual and a server is started in the
background for the next one. `CORRAL_CLI_SERVER=0` turns the server off;
`CORRAL_CLI_SERVER=require` fails instead of running here (tests, debugging).
"""

from __future__ import annotations

import array
import contextlib
import marshal
import os
import signal
import socket
import struct
import sys

SOCKET_NAME = "cli.sock"
DEFAULT_STATE_DIR = "/var/lib/corral"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_stamp(package_dir: str = _PACKAGE_DIR) -> str:
    """Changes whenever Corral's code does, so a server never runs stale code."""
    newest = 0
    count = 0
    for dirpath, _dirs, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime_ns)
                count += 1
    return f"{os.path.realpath(sys.executable)}:{count}:{newest}"


def state_dir_from(argv: list[str], environ: os._Environ[str] | dict[str, str]) -> str:
    """The state dir the command will use: --state-dir, CORRAL_STATE_DIR, config, default."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--state-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--state-dir="):
            return arg.split("=", 1)[1]
    if environ.get("CORRAL_STATE_DIR"):
        return environ["CORRAL_STATE_DIR"]
    config = environ.get("CORRAL_CONFIG", "/etc/corral/config.toml")
    if os.path.isfile(config):
        import tomllib

        try:
            with open(config, "rb") as f:
                value = tomllib.load(f).get("state_dir")
        except (OSError, tomllib.TOMLDecodeError):
            value = None
        if isinstance(value, str):
            return value
    return DEFAULT_STATE_DIR


def send_request(conn: socket.socket, argv: list[str], stamp: str) -> None:
    # marshal, not json: it is built in (json's import costs the client ~8 ms), and
    # the peer is our own server, checked by uid, decoding plain str/list/dict data.
    payload = marshal.dumps(
        {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "stamp": stamp}
    )
    fds = array.array("i", [0, 1, 2])
    header = struct.pack("!I", len(payload))
    conn.sendmsg([header + payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def run_through_server(path: str, argv: list[str], stamp: str) -> int | None:
    """The command's exit status, or None when no (current) server answered."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        send_request(conn, argv, stamp)
        first = recv_exact(conn, 4)
    except OSError:
        conn.close()
        return None
    if first is None:
        conn.close()
        return None
    (child,) = struct.unpack("!i", first)
    if child <= 0:  # the server refused (stale code): run here
        conn.close()
        return None

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    status = recv_exact(conn, 4)
    conn.close()
    if status is None:
        sys.stderr.write("corral: host error: the command server's child died\n")
        return 125
    return int(struct.unpack("!i", status)[0])


def start_server(state_dir: str) -> None:
    """Start a command server for `state_dir` in the background (best effort)."""
    if not os.path.isdir(state_dir) or not os.access(state_dir, os.W_OK):
        return
    import subprocess

    subprocess.Popen(
        [sys.executable, "-m", "corral.cli.cmdserver", "--state-dir", state_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


# Global options that take a value (to find the command name after them).
_VALUE_OPTIONS = ("--state-dir", "--backend", "--runtime", "--context", "--vmm")
# Long-running commands: never through (or starting) a command server.
IN_PROCESS_COMMANDS = ("serve",)


def command_name(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    argv = sys.argv[1:]
    mode = os.environ.get("CORRAL_CLI_SERVER", "1")
    if command_name(argv) in IN_PROCESS_COMMANDS:
        mode = "0"
    if mode != "0":
        state_dir = state_dir_from(argv, os.environ)
        path = os.path.join(state_dir, SOCKET_NAME)
        stamp = code_stamp()
        status = run_through_server(path, argv, stamp) if os.path.exists(path) else None
        if status is not None:
            sys.exit(status)
        if mode == "require":  # for tests and debugging: never run in this process
            sys.stderr.write(f"corral: host error: no command server answered at {path}\n")
            sys.exit(125)
        start_server(state_dir)
    from corral.cli.main import main as run_here

    run_here()


if __name__ == "__main__":
    main()

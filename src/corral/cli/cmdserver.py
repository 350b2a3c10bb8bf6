"""The CLI command server: Corral imported once, one forked child per command.

Listens on `<state>/cli.sock` (mode 0600, same-uid peers only). For each
request (see launcher.py) it forks; the child takes the client's stdin, stdout
and stderr, cwd, environment and argv, runs the typer app and reports the exit
status. The server leaves when idle for `--idle` seconds, when a client brings
newer code, or when its socket is removed.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import io
import marshal
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from corral.cli.launcher import SOCKET_NAME, code_stamp, recv_exact

MAX_REQUEST = 4 << 20


def _preload(state_dir: Path) -> None:
    """Import and warm what commands need, so forked children start hot.

    Opening the store once runs its migration check, and building the built-in
    templates' images (cached) fills the per-process caches of host inputs;
    the engine is disposed so no connection crosses a fork.
    """
    import asyncio

    import rich.console
    import rich.table

    import corral.backends.oci
    import corral.backends.registry
    import corral.cli.main
    from corral.cli._common import STATE
    from corral.images import ImageStore
    from corral.spec.template import BUILTIN_TEMPLATES, load_template

    os.environ["CORRAL_STATE_DIR"] = str(state_dir)
    images = ImageStore(state_dir / "images")
    for name in BUILTIN_TEMPLATES:
        with contextlib.suppress(Exception):
            images.build(load_template(name))
    corral.cli.main.click_command()
    with contextlib.suppress(Exception):
        asyncio.run(_warm_cycle())
    STATE.manager().store.close()
    rich.console.Console(file=io.StringIO()).print("")


async def _warm_cycle() -> None:
    """One real create -> exec -> destroy: the first of each costs ~25 ms more
    (statement compilation, subprocess plumbing), paid here instead of per command."""
    from corral.cli._common import STATE

    manager = STATE.manager()
    record = await manager.create("default", labels={"corral.warmup": "1"}, timeout=60)
    try:
        await manager.exec(record.id, ["/bin/true"])
    finally:
        await manager.destroy(record.id)


def _recv_request(conn: socket.socket) -> tuple[dict[str, object], list[int]] | None:
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(4 + 65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if len(msg) < 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    (size,) = struct.unpack("!I", msg[:4])
    body = msg[4:]
    if size > MAX_REQUEST:
        return None
    if len(body) < size:
        rest = recv_exact(conn, size - len(body))
        if rest is None:
            return None
        body += rest
    request = marshal.loads(body)
    if not isinstance(request, dict):
        return None
    return request, list(fds)


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def _run_child(
    conn: socket.socket, request: dict[str, object], fds: list[int], server_fds: list[int]
) -> None:
    """In the forked child: become the client's command and report its status."""
    for fd in server_fds:  # the listener, selector and lock stay the server's alone
        with contextlib.suppress(OSError):
            os.close(fd)
    conn.sendall(struct.pack("!i", os.getpid()))  # the client forwards signals to us
    os.setsid()
    # As in a fresh interpreter: Ctrl-C (forwarded by the client) raises
    # KeyboardInterrupt, so `corral run` still destroys its sandbox on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), line_buffering=os.isatty(1)
    )
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)), line_buffering=True
    )
    env = request["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    code = 125
    try:
        os.chdir(str(request["cwd"]))
        argv = request["argv"]
        assert isinstance(argv, list)
        sys.argv = ["corral", *map(str, argv)]
        from corral.cli.main import main

        try:
            main()
            code = 0
        except SystemExit as exit_:
            if exit_.code is None:
                code = 0
            elif isinstance(exit_.code, int):
                code = exit_.code
            else:
                sys.stderr.write(f"{exit_.code}\n")
                code = 1
    except BaseException as error:  # the child must always report a status
        sys.stderr.write(f"corral: host error: {error!r}\n")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!i", code))
        os._exit(code & 0xFF)


def serve(state_dir: Path, idle: float) -> None:
    """Serve commands until idle, stale or displaced; then exit the process."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "cli.lock", "w")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server owns this state dir
    _preload(state_dir)
    stamp = code_stamp()
    path = state_dir / SOCKET_NAME
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    inode = path.stat().st_ino
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    last_used = time.monotonic()
    children: set[int] = set()
    try:
        while True:
            if selector.select(timeout=1.0):
                conn, _ = listener.accept()
                last_used = time.monotonic()
                server_fds = [listener.fileno(), selector.fileno(), lock.fileno()]
                if not _handle(conn, stamp, children, server_fds):
                    break
            children -= _reaped(children)
            try:
                if path.stat().st_ino != inode:
                    break  # replaced or removed: someone else serves now
            except FileNotFoundError:
                break
            if not children and time.monotonic() - last_used > idle:
                break
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:
                path.unlink()
        listener.close()
        for child in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
        # Leave at once, still holding the lock: tearing down a warm interpreter takes
        # ~1 s, and `stop_server` takes the lock's release to mean "gone".
        os._exit(0)


def _handle(conn: socket.socket, stamp: str, children: set[int], server_fds: list[int]) -> bool:
    """Serve one request; False when the server should leave (stale code)."""
    with conn:
        if not _same_user(conn):
            return True
        try:
            received = _recv_request(conn)
        except (OSError, ValueError, EOFError, TypeError):
            return True
        if received is None:
            return True
        request, fds = received
        if request.get("stamp") != stamp:
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("!i", 0))  # "run it yourself"; a new server follows
            return False
        child = os.fork()
        if child == 0:
            _run_child(conn, request, fds, server_fds)
        for fd in fds:
            os.close(fd)
        children.add(child)
    return True


def _reaped(children: set[int]) -> set[int]:
    done: set[int] = set()
    for child in children:
        try:
            pid, _ = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pid = child
        if pid:
            done.add(child)
    return done


def stop_server(state_dir: Path, *, timeout: float = 10.0) -> bool:
    """Ask the state dir's server to leave (remove its socket) and wait until it has.

    Returns True when no server holds the state dir any more.
    """
    (state_dir / SOCKET_NAME).unlink(missing_ok=True)
    lock_path = state_dir / "cli.lock"
    if not lock_path.exists():
        return True
    deadline = time.monotonic() + timeout
    with open(lock_path, "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--stop", action="store_true", help="stop the running server")
    idle = float(os.environ.get("CORRAL_CLI_IDLE", 600))
    parser.add_argument("--idle", type=float, default=idle, help="seconds before leaving")
    args = parser.parse_args()
    if args.stop:
        sys.exit(0 if stop_server(args.state_dir) else 1)
    serve(args.state_dir, args.idle)


if __name__ == "__main__":
    main()

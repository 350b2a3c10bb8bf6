"""A real long-lived service as a pet, end to end: a Rust actor service (std only:
actor threads with mailboxes, a supervisor thread restarting a panicked actor,
state persisted to the pet's volume, a TCP health port) deployed through the API
on a real `corral serve` (oci/crun). Killed from inside, Corral restarts it and
its state survives; the server is stopped and started, then killed with -9, and
the pet is still there with its state; a crash loop is stopped and reported;
`corral service deploy`, `corral logs` and `corral promote` work from the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral import Corral
from corral.client.sync import Sandbox
from corral.errors import CorralError
from tests.conftest import (
    _sandbox_inits,
    assert_no_leaks,
    require_binary,
    require_root,
    traversable_dir,
)
from tests.server_harness import ServerProcess

pytestmark = pytest.mark.runtime

HERE = Path(__file__).parent
PORT = 7000
ACTOR = {
    "name": "actor",
    "kind": "persistent",
    "volume": {"size": "16M", "path": "/data"},
    "service": {
        # Deployed first, the binary uploaded after: the service waits for it.
        "command": [
            "/bin/sh",
            "-c",
            "mkdir -p /data/state; while [ ! -x /data/bin/actor ]; do sleep 0.1; done;"
            f" exec /data/bin/actor {PORT} /data/state/counter",
        ],
        "ports": [PORT],
        "restart": "always",
        "backoff": 0.2,
        "max_backoff": 1.0,
        "crash_limit": 3,
        "health": {"tcp": PORT, "interval": 0.5, "timeout": 2, "retries": 3},
    },
}


@pytest.fixture(scope="module")
def actor_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    require_binary("rustc")
    out = tmp_path_factory.mktemp("actor") / "actor"
    subprocess.run(
        ["rustc", "-O", "--edition", "2021", "-o", str(out), str(HERE / "pets" / "actor.rs")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out.read_bytes()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    require_root()
    require_binary("crun")
    root = traversable_dir("pets")
    inits_before = _sandbox_inits()
    process = ServerProcess(root)
    try:
        yield process
    finally:
        process.stop()
        process.close()
        assert_no_leaks(root, inits_before)
        shutil.rmtree(root, ignore_errors=True)


def ask(sandbox: Sandbox, command: str) -> str:
    """One line command to the actor's port, from inside the pet."""
    script = f'exec 3<>/dev/tcp/127.0.0.1/{PORT}; echo "$1" >&3; head -1 <&3'
    result = sandbox.exec(["bash", "-c", script, "ask", command], timeout=10)
    return result.stdout.decode().strip() if result.exit_code == 0 else ""


def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def answers(sandbox: Sandbox, expected: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return ask(sandbox, "get").startswith(expected)
        except CorralError:
            return False  # e.g. while the server restarts

    return check


def test_actor_service_survives_kills_server_restarts_and_stops_crash_looping(
    server: ServerProcess, actor_binary: bytes
) -> None:
    key = server.tenant("svc")
    server.start()
    with Corral(server.url, key) as client:
        (server.state_dir / "actor.toml").write_text(_toml(ACTOR))
        pet = client.create_pet(server.state_dir / "actor.toml", name="counter", memory="128M")
        assert (pet.info.kind, pet.info.name, pet.info.expires_at) == (
            "persistent",
            "counter",
            None,
        )
        assert pet.info.pet is not None
        assert pet.info.pet["restart"] == "always"
        pet.files.write("/data/bin/actor", actor_binary, mode=0o755)
        wait_for(answers(pet, "count=0 boots=1"), "the first start")
        for _ in range(3):
            ask(pet, "inc")
        assert ask(pet, "get") == "count=3 boots=1 actor_restarts=0"

        # An actor panics: the service's own supervisor restarts it from its state.
        assert ask(pet, "panic") == "ok"
        wait_for(answers(pet, "count=3 boots=1 actor_restarts=1"), "the actor's restart")

        # Killed from inside: Corral restarts the service; the state is on the volume.
        pet.exec(["sh", "-c", "kill -9 $(cat /tmp/.corral-service.pid)"])
        wait_for(answers(pet, "count=3 boots=2"), "the restart after kill -9 inside")
        assert client.get("counter").info.restarts == 1

        # The server stops and starts: the pet is still there with its state.
        server.stop()
        server.start()
        again = client.get("counter")
        assert (again.id, again.info.state) == (pet.id, "running")
        wait_for(answers(again, "count=3 boots=3"), "the service after a server restart")
        ask(again, "inc")

        # The server is killed with -9: the same.
        server.kill9()
        server.start()
        again = client.get("counter")
        assert again.info.state == "running"
        wait_for(answers(again, "count=4 boots=4"), "the service after kill -9 of the server")

        # The health port closes: the health check fails and Corral restarts it.
        assert ask(again, "close-health") == "ok"
        wait_for(answers(again, "count=4 boots=5"), "the restart by the health check")

        # A crash loop: every start exits 3; Corral stops and says so.
        again.exec(["touch", "/data/state/crash"])
        ask(again, "exit 1")
        wait_for(lambda: client.get("counter").info.state == "failed", "the crash loop")
        failed = client.get("counter").info
        assert failed.error is not None
        assert failed.error.startswith("crash loop: stopped after 3 failures in a row")
        assert "service exited with code 3" in failed.error

        # A failed pet's sandbox can be looked into and fixed, then supervised again.
        again.exec(["rm", "/data/state/crash"])
        assert again.restart().state == "stopped"
        wait_for(answers(again, "count=4 boots=6"), "the service after the restart")
        assert client.get("counter").info.error is None

        log = b"".join(again.logs()).decode()
        assert "actor up: count=0 boots=1" in log
        assert "crash file present: exiting 3" in log
        assert "unhealthy: 3 health checks failed in a row" in log
        assert "marked failed: crash loop" in log
        assert b"".join(again.logs(tail=40)).decode() == log.encode()[-40:].decode(errors="replace")
        again.kill()
        client.remove_volume("counter")


def test_cli_deploys_promotes_and_follows_logs(server: ServerProcess, tmp_path: Path) -> None:
    key = server.tenant("cli")
    server.start()
    contexts = tmp_path / "contexts.json"
    env = {
        **os.environ,
        "CORRAL_CONTEXTS": str(contexts),
        "CORRAL_API_KEY": key,
        "CORRAL_CLI_SERVER": "0",
    }
    env.pop("CORRAL_CONTEXT", None)
    corral = str(Path(sys.executable).with_name("corral"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [corral, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    assert cli("context", "add", "srv", server.url, "--use").returncode == 0
    template = tmp_path / "ticker.toml"
    ticker = {
        "name": "ticker",
        "service": {
            "command": [
                "/bin/sh",
                "-c",
                "while :; do echo tick >> /data/ticks; echo tick; sleep 0.2; done",
            ]
        },
    }
    template.write_text(_toml(ticker))
    deployed = cli(
        "service", "deploy", str(template), "--name", "ticker", "--volume", "8M", "--json"
    )
    assert deployed.returncode == 0, deployed.stderr
    info = json.loads(deployed.stdout)
    assert (info["kind"], info["pet"]["volume"]["size"]) == ("persistent", 8 << 20)

    follower = subprocess.Popen(
        [corral, "logs", "ticker", "--follow"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(4)]
        assert "service starting" in "".join(seen)
        assert "tick\n" in seen
    finally:
        follower.terminate()
        follower.wait(10)
        if follower.stdout is not None:
            follower.stdout.close()

    created = cli("create", "--timeout", "600")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    promoted = cli("promote", sandbox_id, "--name", "kept", "--json")
    if promoted.returncode != 0:
        pytest.fail(promoted.stderr)
    record = json.loads(promoted.stdout)
    assert (record["id"], record["kind"], record["expires_at"]) == (sandbox_id, "persistent", None)
    refused = cli("promote", sandbox_id, "--name", "again")
    assert refused.returncode != 0
    assert "already persistent" in refused.stderr
    assert cli("logs", "kept").stdout.count("promoted from") == 1
    not_failed = cli("restart", "kept")
    assert not_failed.returncode != 0
    assert "only a failed pet is restarted" in not_failed.stderr
    assert cli("rm", "ticker", "kept").returncode == 0
    assert cli("volume", "rm", "ticker").returncode == 0
    gone = cli("volume", "rm", "ticker")
    assert gone.returncode != 0
    assert "no volume 'ticker'" in gone.stderr


def _toml(data: dict[str, object]) -> str:
    """A tiny TOML writer for these templates (tomllib only reads)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, object]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for name, table in tables:
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items() if k not in nested]
        for sub, values in nested.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"

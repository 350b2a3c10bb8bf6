"""The same CLI against a remote server (a context) and against this host (local):
same commands, same flags, same output; contexts themselves."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ApiServer

pytestmark = pytest.mark.runtime
CORRAL = [sys.executable, "-m", "corral.cli"]
Cli = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def contexts(tmp_path: Path) -> Path:
    return tmp_path / "contexts.json"


@pytest.fixture
def cli(contexts: Path, state_root: Path) -> Cli:
    def run(
        *args: str, stdin: bytes | None = None, key: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        env = {
            **os.environ,
            "CORRAL_CONTEXTS": str(contexts),
            "CORRAL_STATE_DIR": str(state_root),
            "CORRAL_CLI_SERVER": "0",
            "CORRAL_RUNTIME": "",
        }
        env.pop("CORRAL_CONTEXT", None)
        env.pop("CORRAL_API_KEY", None)
        if key is not None:
            env["CORRAL_API_KEY"] = key
        return subprocess.run(
            [*CORRAL, *args], input=stdin, capture_output=True, env=env, timeout=120, check=False
        )

    return run


def test_contexts_add_use_ls_rm(cli: Cli, contexts: Path, api_server: ApiServer) -> None:
    assert (
        cli("context", "add", "prod", api_server.url, "--token", api_server.key_a).returncode == 0
    )
    assert stat.S_IMODE(contexts.stat().st_mode) == 0o600  # it holds keys
    listed = {c["name"]: c for c in json.loads(cli("context", "ls", "--json").stdout)}
    assert listed["local"]["current"]
    assert not listed["prod"]["current"]
    assert listed["prod"]["token"] == "set"
    assert api_server.key_a not in cli("context", "ls").stdout.decode()
    again = cli("context", "add", "prod", api_server.url)
    assert again.returncode == 1
    assert b"already exists" in again.stderr
    assert cli("context", "use", "prod").returncode == 0
    assert json.loads(cli("context", "ls", "--json").stdout)[1]["current"]
    bad = cli("--context", "nope", "ls")
    assert bad.returncode == 1
    assert b"no context 'nope'" in bad.stderr
    assert b"not a server URL" in cli("context", "add", "x", "ftp://h").stderr
    assert cli("context", "rm", "prod").returncode == 0
    assert [c["name"] for c in json.loads(cli("context", "ls", "--json").stdout)] == ["local"]


def test_same_commands_and_output_locally_and_remotely(
    cli: Cli, api_server: ApiServer, tmp_path: Path
) -> None:
    cli("context", "add", "prod", api_server.url, "--token", api_server.key_a)
    local_file = tmp_path / "in.txt"
    local_file.write_bytes(b"payload\n")
    shapes = {}
    for context in ("local", "prod"):
        ctx = ("--context", context)
        created = cli(*ctx, "create", "--label", "suite=remote", "--memory", "256M", "--json")
        assert created.returncode == 0, created.stderr
        sandbox = json.loads(created.stdout)
        sid = sandbox["id"]
        shapes[context] = set(sandbox)
        assert sandbox["limits"]["memory"] == 256 << 20
        ran = cli(*ctx, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 5")
        assert (ran.returncode, ran.stdout, ran.stderr) == (5, b"out\n", b"err\n")
        piped = cli(*ctx, "exec", "-i", sid, "--", "cat", stdin=b"via stdin")
        assert piped.stdout == b"via stdin"
        assert cli(*ctx, "cp", str(local_file), f"{sid}:/work/in.txt").returncode == 0
        out = tmp_path / f"out-{context}.txt"
        assert cli(*ctx, "cp", f"{sid}:/work/in.txt", str(out)).returncode == 0
        assert out.read_bytes() == b"payload\n"
        listed = json.loads(cli(*ctx, "ls", "--json", "--label", "suite=remote").stdout)
        assert [s["id"] for s in listed] == [sid]
        assert sid in cli(*ctx, "ls").stdout.decode()
        info = json.loads(cli(*ctx, "inspect", sid, "--json").stdout)
        assert (info["state"], info["backend_status"]) == ("running", "running")
        assert info["stats"]["memory_limit"] == 256 << 20
        assert cli(*ctx, "rm", sid).stdout == sid.encode() + b"\n"
        gone = cli(*ctx, "rm", sid)
        assert gone.returncode == 1
        assert b"no sandbox" in gone.stderr
        run = cli(*ctx, "run", "--put", f"{local_file}:/work/p.txt", "--", "cat", "/work/p.txt")
        assert (run.returncode, run.stdout) == (0, b"payload\n")
        # Without files to copy in, a remote run is one request (POST /v1/run): the
        # same output and exit status, and nothing left either way.
        argv = ["sh", "-c", "echo o; echo e >&2; exit 3"]
        plain = cli(*ctx, "run", "--label", "suite=remote", "--memory", "64M", "--", *argv)
        assert (plain.returncode, plain.stdout, plain.stderr) == (3, b"o\n", b"e\n")
        assert json.loads(cli(*ctx, "ls", "--json").stdout) == []
    assert shapes["local"] == shapes["prod"]


def test_remote_specifics(cli: Cli, api_server: ApiServer, tmp_path: Path) -> None:
    # The key may come from the environment instead of the context file.
    cli("context", "add", "bare", api_server.url)
    no_key = cli("--context", "bare", "ls")
    assert no_key.returncode == 1
    assert b"API key" in no_key.stderr
    assert cli("--context", "bare", "ls", key=api_server.key_b).returncode == 0
    # Another tenant's sandbox does not exist for this one.
    cli("context", "add", "a", api_server.url, "--token", api_server.key_a)
    sid = cli("--context", "a", "create").stdout.decode().strip()
    try:
        denied = cli("--context", "bare", "exec", sid, "--", "true", key=api_server.key_b)
        assert denied.returncode == 125
        assert b"no sandbox" in denied.stderr
        # gc belongs to the server's host.
        gc = cli("--context", "a", "gc")
        assert gc.returncode == 1
        assert b"server reaps" in gc.stderr
        # A template file on the laptop travels with the request.
        template = tmp_path / "tiny.toml"
        template.write_text('name = "tiny"\n[resources]\nmemory = "128M"\n')
        run = cli("--context", "a", "run", "--template", str(template), "--", "echo", "hi")
        assert (run.returncode, run.stdout) == (0, b"hi\n")
    finally:
        cli("--context", "a", "rm", sid)
    down = cli("--context", "bare", "ls", key="crl_0000000000000000_" + "a" * 43)
    assert down.returncode == 1
    assert b"not valid" in down.stderr

"""The `corral` CLI end to end, as separate processes against the real crun runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.store import Store

pytestmark = pytest.mark.runtime
CORRAL = [sys.executable, "-m", "corral.cli"]
EXAMPLE = Path(__file__).parent.parent / "examples" / "hello_unsafe.rs"


def corral(
    state: Path,
    *args: str,
    stdin: bytes | None = None,
    timeout: float = 120,
    runtime: str | None = "crun",
):
    # Direct mode: each call imports everything itself (test_cmdserver covers the server).
    env = {**os.environ, "CORRAL_STATE_DIR": str(state), "CORRAL_CLI_SERVER": "0"}
    env.pop("CORRAL_RUNTIME", None)
    if runtime is not None:
        env["CORRAL_RUNTIME"] = runtime
    return subprocess.run(
        [*CORRAL, *args], input=stdin, capture_output=True, env=env, timeout=timeout, check=False
    )


def test_run_passes_output_and_status(state_root: Path) -> None:
    r = corral(state_root, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    assert corral(state_root, "ls", "--json").stdout.strip() == b"[]", "run destroys its sandbox"


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (["--timeout", "1", "--", "sleep", "30"], 124, "timed out after 1s"),
        (["--", "/no/such/cmd"], 127, "command not found: /no/such/cmd"),
        (
            ["--memory", "64M", "--", "sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a)"],
            137,
            "out of memory",
        ),
        (["--", "sh", "-c", "kill -9 $$"], 137, "killed by SIGKILL"),
    ],
)
def test_run_exit_codes_with_reasons(
    state_root: Path, args: list[str], code: int, reason: str
) -> None:
    r = corral(state_root, "run", *args)
    assert r.returncode == code, r.stderr
    last = r.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("corral: ")
    assert reason in last


def test_sandbox_outlives_the_cli_process(state_root: Path, tmp_path: Path) -> None:
    sandbox = corral(state_root, "create", "--label", "suite=cli").stdout.decode().strip()
    assert sandbox.startswith("sb-")
    try:
        assert (
            corral(state_root, "exec", sandbox, "--", "sh", "-c", "echo 41 > /work/n").returncode
            == 0
        )
        r = corral(
            state_root, "exec", "-i", sandbox, "--", "sh", "-c", "cat; cat /work/n", stdin=b"x\n"
        )
        assert r.stdout == b"x\n41\n"
        local = tmp_path / "in.txt"
        local.write_text("payload")
        assert corral(state_root, "cp", str(local), f"{sandbox}:/work/in.txt").returncode == 0
        assert (
            corral(
                state_root, "cp", f"{sandbox}:/work/in.txt", str(tmp_path / "out.txt")
            ).returncode
            == 0
        )
        assert (tmp_path / "out.txt").read_text() == "payload"
        listed = json.loads(corral(state_root, "ls", "--json", "--label", "suite=cli").stdout)
        assert [s["id"] for s in listed] == [sandbox]
        info = json.loads(corral(state_root, "inspect", sandbox, "--json").stdout)
        assert info["state"] == "running"
        assert info["backend_status"] == "running"
        assert info["stats"]["memory_limit"] == 512 << 20
    finally:
        assert corral(state_root, "rm", sandbox).returncode == 0
    again = corral(state_root, "rm", sandbox)
    assert again.returncode == 1
    assert f"no sandbox '{sandbox}'" in again.stderr.decode()


def test_bad_input_is_refused_clearly(state_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[resources]\nmemory = "lots"\n')
    r = corral(state_root, "run", "--template", str(bad), "--", "true")
    text = r.stderr.decode()
    assert r.returncode == 125
    assert str(bad) in text
    assert "resources.memory" in text
    assert "fix:" in text
    r = corral(state_root, "run", "--template", "nosuch", "--", "true")
    assert r.returncode == 125
    assert "unknown template 'nosuch'" in r.stderr.decode()
    r = corral(state_root, "run")
    assert r.returncode == 2
    assert "Missing argument" in r.stderr.decode()
    r = corral(state_root, "run", "--env", "NOEQUALS", "--", "true")
    assert r.returncode == 125
    assert "--env 'NOEQUALS' is not NAME=VALUE" in r.stderr.decode()
    r = corral(state_root, "run", "--put", f"{tmp_path}/missing:/work/x", "--", "true")
    assert r.returncode == 125
    assert "cannot read" in r.stderr.decode()
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (65 << 20))
    r = corral(state_root, "run", "--put", f"{big}:/work/big", "--", "true")
    assert r.returncode == 125
    assert "over the limit" in r.stderr.decode()
    assert json.loads(corral(state_root, "ls", "--json").stdout) == []


def test_gc_removes_what_a_crash_left(state_root: Path) -> None:
    sandbox = corral(state_root, "create").stdout.decode().strip()
    store = Store.for_state_dir(state_root)
    store.delete(sandbox)  # as if the CLI died between the runtime's create and the record
    store.close()
    report = json.loads(corral(state_root, "gc", "--json").stdout)
    assert report["orphans"] == [sandbox]
    assert not (state_root / "sandboxes" / sandbox).exists()


def test_images_build_ls_rm(state_root: Path) -> None:
    built = json.loads(corral(state_root, "images", "build", "default", "--json").stdout)
    assert built["digest"].startswith("sha256:")
    listed = json.loads(corral(state_root, "images", "ls", "--json").stdout)
    assert built["digest"] in [i["digest"] for i in listed]
    assert corral(state_root, "images", "rm", built["digest"][7:19]).returncode == 0
    listed = json.loads(corral(state_root, "images", "ls", "--json").stdout)
    assert built["digest"] not in [i["digest"] for i in listed]


def test_main_job_compiles_and_runs_unsafe_rust(state_root: Path) -> None:
    r = corral(
        state_root, "run", "--template", "rust", "--put", f"{EXAMPLE}:/work/main.rs", "--",
        "sh", "-c", "rustc -O main.rs -o hello && ./hello", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"uid=1000" in r.stdout
    assert b"= 500500" in r.stdout


def test_doctor_json(state_root: Path) -> None:
    r = corral(state_root, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["crun"]["status"] == "ok"
    assert "cgroups" in checks


def test_template_isolation_picks_and_limits_the_runtime(state_root: Path, tmp_path: Path) -> None:
    template = tmp_path / "hardened.toml"
    template.write_text('name = "hardened"\nisolation = ["gvisor"]\n')
    host_kernel = Path("/proc/version").read_text()
    r = corral(state_root, "run", "--template", str(template), "--", "cat", "/proc/version",
               runtime=None)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() != host_kernel, "a gvisor-only template must run under gVisor"
    r = corral(state_root, "run", "--template", str(template), "--", "true", runtime="crun")
    assert r.returncode == 125
    assert "does not allow isolation 'container'" in r.stderr.decode()


def test_create_publishes_ports_and_says_where(state_root: Path) -> None:
    created = corral(state_root, "create", "-p", "0:8000", "--publish", "8001", "--label", "t=1")
    assert created.returncode == 0, created.stderr
    sandbox = created.stdout.decode().strip()
    try:
        said = [s for s in created.stderr.decode().splitlines() if s.startswith("corral: ")]
        assert [line.rsplit(" ", 1)[-1] for line in said] == ["8000", "8001"], said
        assert all(line.startswith("corral: 127.0.0.1:") for line in said), said
        shown = json.loads(corral(state_root, "inspect", "--json", sandbox).stdout)
        ports = {p["container_port"]: p for p in shown["ports"]}
        assert said[0] == f"corral: 127.0.0.1:{ports[8000]['host_port']} -> port 8000"
    finally:
        assert corral(state_root, "rm", sandbox).returncode == 0
    refused = corral(state_root, "create", "-p", "0.0.0.0:0:8000")
    assert refused.returncode != 0
    assert b"may not be published on 0.0.0.0" in refused.stderr

"""The SDK end to end: `Corral` and `AsyncCorral` against the real `corral serve`
(oci backend, crun) on a loopback port. Every sandbox is labelled and destroyed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import errors
from corral.backends.base import ExitStatus, Output, SandboxStats
from corral.client import AsyncCorral, Corral, Sandbox
from tests.conftest import TEST_LABEL, ApiServer

pytestmark = pytest.mark.runtime


@pytest.fixture
def corral(api_server: ApiServer) -> Iterator[Corral]:
    with Corral(api_server.url, api_server.key_a, environ={}) as client:
        yield client


@pytest.fixture
def sandbox(corral: Corral) -> Iterator[Sandbox]:
    with corral.sandbox(memory="256M", labels=TEST_LABEL, timeout=300) as sb:
        yield sb


def test_server_views(corral: Corral) -> None:
    assert corral.health().status == "ok"
    assert corral.ready().checks["backend"] == "ok"
    assert {"default", "rust"} <= {t.name for t in corral.templates()}
    assert corral.tenant().name == "tenant-a"
    with pytest.raises(errors.PermissionDeniedError, match="admin"):
        corral.tenants()


def test_the_readme_flow(corral: Corral) -> None:
    with corral.sandbox(template="default", memory="256M", timeout=600, labels=TEST_LABEL) as sb:
        assert sb.info.state == "running"
        assert sb.info.limits["memory"] == 256 << 20
        sb.files.write(
            "/work/main.sh", "#!/bin/sh\necho built; echo oops >&2; exit 4\n", mode=0o755
        )
        result = sb.exec(["./main.sh"], cwd="/work")
        assert (result.exit_code, result.stdout, result.stderr) == (4, b"built\n", b"oops\n")
        events = list(sb.exec_stream("printf 'a\\000\\377'; echo b >&2", env={"X": "1"}))
        assert events[-1] == ExitStatus(0, duration=events[-1].duration)  # type: ignore[union-attr]
        assert b"".join(
            e.data for e in events if isinstance(e, Output) and e.stream == "stdout"
        ) == (b"a\x00\xff")
        sandbox_id = sb.id
    with pytest.raises(errors.NotFoundError):
        corral.get(sandbox_id)


def test_exec_stdin_env_timeout_and_missing_command(sandbox: Sandbox) -> None:
    result = sandbox.exec('cat; echo "$GREETING"; pwd', stdin=b"in\n", env={"GREETING": "hi"},
                          cwd="/tmp")  # fmt: skip
    assert result.stdout == b"in\nhi\n/tmp\n"
    timed = sandbox.exec(["sleep", "30"], timeout=0.5)
    assert (timed.exit_code, timed.timed_out) == (124, True)
    assert sandbox.exec(["no-such-command"]).exit_code == 127


def test_exec_stream_delivers_output_while_the_command_runs(sandbox: Sandbox) -> None:
    started = time.monotonic()
    arrivals = []
    for event in sandbox.exec_stream("echo first; sleep 2; echo second"):
        arrivals.append((time.monotonic() - started, event))
    first_at, first = arrivals[0]
    assert first == Output("stdout", b"first\n")
    assert first_at < 1.5
    assert isinstance(arrivals[-1][1], ExitStatus)
    assert arrivals[-1][0] >= 2


def test_stopping_exec_stream_early_kills_the_command(sandbox: Sandbox) -> None:
    loop = "echo started; while true; do date +%s%N > /tmp/alive; sleep 0.1; done"
    for event in sandbox.exec_stream(loop):
        assert event == Output("stdout", b"started\n")
        break
    time.sleep(1.0)
    before = sandbox.files.read("/tmp/alive")
    time.sleep(0.5)
    assert sandbox.files.read("/tmp/alive") == before, "the command kept running"


def test_files_and_directories(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.files.write("/work/a.bin", bytes(range(256)))
    assert sandbox.files.read("/work/a.bin") == bytes(range(256))
    with pytest.raises(errors.NotFoundError):
        sandbox.files.read("/work/missing")
    with pytest.raises(errors.FileTooLargeError) as caught:
        sandbox.files.write("/work/big", b"x" * (2 << 20))
    assert caught.value.sandbox_id == sandbox.id

    local = tmp_path / "project"
    (local / "src").mkdir(parents=True)
    (local / "src" / "main.rs").write_text("fn main() {}\n")
    (local / "Cargo.toml").write_text("[package]\n")
    sandbox.files.upload_dir(local, "/work/proj")
    assert sandbox.exec("cat /work/proj/src/main.rs").stdout == b"fn main() {}\n"

    # The sandbox adds an output and a link pointing out of any local target.
    sandbox.exec("cd /work/proj && echo built > out.txt && ln -s /etc/passwd leak && "
                 "ln -s src/main.rs ok-link")  # fmt: skip
    back = tmp_path / "back"
    refused = sandbox.files.download_dir("/work/proj", back)
    assert refused == ["leak"]
    assert (back / "out.txt").read_text() == "built\n"
    assert (back / "src" / "main.rs").read_text() == "fn main() {}\n"
    assert (back / "ok-link").read_text() == "fn main() {}\n"
    assert not (back / "leak").exists()


def test_exec_interactive(sandbox: Sandbox) -> None:
    with sandbox.exec_interactive("while read line; do echo got:$line; done") as proc:
        proc.send(b"one\n")
        events = iter(proc)
        assert next(events) == Output("stdout", b"got:one\n")  # answered before stdin closed
        proc.send("two\n")
        proc.close_stdin()
        result = proc.wait()
    assert (result.exit_code, result.stdout) == (0, b"got:two\n")


def test_exec_interactive_problems(api_server: ApiServer, sandbox: Sandbox) -> None:
    with Corral(api_server.url, api_server.key_b, environ={}) as other:
        stranger = Sandbox(other, sandbox.info)
        with stranger.exec_interactive("true") as proc, pytest.raises(errors.NotFoundError):
            proc.wait()
    with Corral(api_server.url, environ={}) as anonymous:
        nobody = Sandbox(anonymous, sandbox.info)
        with (
            nobody.exec_interactive("true") as proc,
            pytest.raises(errors.AuthenticationError) as caught,
        ):
            proc.wait()
    assert "CORRAL_API_KEY" in str(caught.value)


def test_labels_timeout_stats_pause_and_list(corral: Corral, sandbox: Sandbox) -> None:
    sandbox.update(labels={"job": "sdk-e2e"}, metadata={"pr": 7})
    assert sandbox.info.labels == {**TEST_LABEL, "job": "sdk-e2e"}
    assert sandbox.info.metadata == {"pr": 7}
    assert [sb.id for sb in corral.list(labels={"job": "sdk-e2e"}, state="running")] == [sandbox.id]
    sandbox.set_labels({"job": None})
    assert sandbox.info.labels == TEST_LABEL
    sandbox.set_timeout(3600)
    assert sandbox.info.expires_at is not None
    assert sandbox.info.expires_at > time.time() + 3500
    stats = sandbox.stats()
    assert isinstance(stats, SandboxStats)
    assert stats.memory_limit == 256 << 20
    assert sandbox.pause().state == "paused"
    with pytest.raises(errors.InvalidStateError):
        sandbox.exec("true")
    assert sandbox.resume().state == "running"
    assert sandbox.exec("true").ok
    assert sandbox.refresh().state == "running"


def test_errors_from_the_server(api_server: ApiServer, corral: Corral, sandbox: Sandbox) -> None:
    with pytest.raises(errors.NotFoundError, match="nope"):
        corral.create("nope")
    with pytest.raises(errors.UserError, match="memory"):
        corral.create(memory="lots")
    with Corral(api_server.url, api_server.key_b, environ={}) as other:
        with pytest.raises(errors.NotFoundError):
            other.get(sandbox.id)
        assert sandbox.id not in [sb.id for sb in other.list()]
        with pytest.raises(errors.PermissionDeniedError):
            other.list(tenant="tenant-a")
    forged = Corral(api_server.url, "crl_nope", environ={})
    with forged, pytest.raises(errors.AuthenticationError):
        forged.list()
    anonymous = Corral(api_server.url, environ={})
    with anonymous, pytest.raises(errors.AuthenticationError, match="CORRAL_API_KEY"):
        anonymous.list()


def test_a_local_template_file(corral: Corral, tmp_path: Path) -> None:
    template = tmp_path / "sdk-local.toml"
    template.write_text(
        'name = "sdk-local"\nbase = "host"\nworkdir = "/work"\n'
        '[env]\nPATH = "/usr/bin:/bin"\nFROM_TEMPLATE = "yes"\n'
    )
    with corral.sandbox(template, memory="128M", labels=TEST_LABEL) as sb:
        assert sb.info.template == "sdk-local"
        assert sb.exec('echo "$FROM_TEMPLATE"').stdout == b"yes\n"
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "t"\nkind = "x"\n')
    with pytest.raises(errors.TemplateError) as caught:
        corral.create(broken, labels=TEST_LABEL)
    assert caught.value.field == "kind"


def test_destroyed_on_exit_even_when_the_body_raises(corral: Corral) -> None:
    sb = corral.sandbox(labels=TEST_LABEL, memory="64M")
    sandbox_id = sb.id

    def agent() -> None:
        with sb:
            sb.exec("true")
            raise RuntimeError("the agent failed")

    with pytest.raises(RuntimeError, match="agent failed"):
        agent()
    with pytest.raises(errors.NotFoundError):
        corral.get(sandbox_id)
    assert sb.kill() is False


async def test_async_flow(api_server: ApiServer) -> None:
    async with (
        AsyncCorral(api_server.url, api_server.key_a, environ={}) as client,
        client.sandbox(memory="256M", labels=TEST_LABEL, timeout=300) as sb,
    ):
        await sb.files.write("/work/in.txt", "hello\n")
        result = await sb.exec(["cat", "/work/in.txt"])
        assert result.stdout == b"hello\n"
        events = []
        async with contextlib.aclosing(sb.exec_stream("echo a; echo b >&2; exit 2")) as stream:
            async for event in stream:
                events.append(event)
        assert Output("stdout", b"a\n") in events
        assert Output("stderr", b"b\n") in events
        assert isinstance(events[-1], ExitStatus)
        assert events[-1].exit_code == 2
        async with sb.exec_interactive("tr a-z A-Z") as proc:
            await proc.send(b"shout")
            await proc.close_stdin()
            assert (await proc.wait()).stdout == b"SHOUT"
        assert (await sb.stats()).pids_limit > 0
        sandbox_id = sb.id
    async with AsyncCorral(api_server.url, api_server.key_a, environ={}) as client:
        with pytest.raises(errors.NotFoundError):
            await client.get(sandbox_id)

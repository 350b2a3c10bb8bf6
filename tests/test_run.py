"""One-shot runs (POST /v1/run: create or claim, run, destroy in one request) against
the real `corral serve` (oci backend, crun), through the SDK and raw HTTP. Each test
labels its sandboxes uniquely and checks that none is left once the run is over."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from corral import errors
from corral.api.models import SANDBOX_ID_HEADER
from corral.backends.base import ExitStatus, Output
from corral.client import AsyncCorral, Corral
from corral.store import Quota
from tests.conftest import TEST_LABEL, ApiServer
from tests.test_pools_server import wait_ready

pytestmark = pytest.mark.runtime


@pytest.fixture
def corral(api_server: ApiServer) -> Iterator[Corral]:
    with Corral(api_server.url, api_server.key_a, environ={}) as client:
        yield client


@pytest.fixture
def label() -> dict[str, str]:
    """A label only this test's sandboxes carry."""
    return {**TEST_LABEL, "corral.test.run": uuid.uuid4().hex[:12]}


def wait_none_left(corral: Corral, label: dict[str, str], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while left := corral.list(labels=label):
        assert time.monotonic() < end, f"still there: {left}"
        time.sleep(0.05)


def test_run_returns_the_result_and_leaves_nothing(corral: Corral, label: dict[str, str]) -> None:
    result = corral.run("echo out; echo err >&2; exit 3", memory="64M", labels=label)
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    # run() returns once the server has destroyed the sandbox: nothing to wait for.
    assert corral.list(labels=label) == []


def test_run_stream_delivers_output_while_the_sandbox_runs(
    corral: Corral, label: dict[str, str]
) -> None:
    stream = corral.run_stream("echo started; sleep 1; echo done", memory="64M", labels=label)
    assert next(stream) == Output("stdout", b"started\n")
    started = time.monotonic()
    running = corral.list(labels=label)
    assert [s.info.state for s in running] == ["running"]
    rest = list(stream)
    assert time.monotonic() - started >= 0.5, "the output came only at the end"
    assert rest[0] == Output("stdout", b"done\n")
    assert isinstance(rest[-1], ExitStatus)
    assert rest[-1].exit_code == 0
    with pytest.raises(errors.NotFoundError):
        corral.get(running[0].id)


def test_run_stdin_env_cwd_and_timeout(corral: Corral, label: dict[str, str]) -> None:
    result = corral.run('cat; echo "$GREETING"; pwd', stdin=b"in\n", env={"GREETING": "hi"},
                        cwd="/tmp", memory="64M", labels=label)  # fmt: skip
    assert result.stdout == b"in\nhi\n/tmp\n"
    timed = corral.run(["sleep", "30"], timeout=0.5, memory="64M", labels=label)
    assert (timed.exit_code, timed.timed_out) == (124, True)
    assert corral.run(["no-such-command"], memory="64M", labels=label).exit_code == 127
    assert corral.list(labels=label) == []


def test_a_client_leaving_early_kills_the_command_and_destroys_the_sandbox(
    corral: Corral, label: dict[str, str]
) -> None:
    stream = corral.run_stream("echo started; sleep 60", memory="64M", labels=label)
    assert next(stream) == Output("stdout", b"started\n")
    assert len(corral.list(labels=label)) == 1
    stream.close()  # the connection goes: the server sees the client leave
    wait_none_left(corral, label)


def test_failed_runs_leave_nothing(
    api_server: ApiServer, corral: Corral, label: dict[str, str]
) -> None:
    with pytest.raises(errors.NotFoundError, match="no-such-template"):
        corral.run("true", "no-such-template", labels=label)
    with pytest.raises(errors.UserError, match="memory"):
        corral.run("true", memory="a lot", labels=label)
    key = api_server.process.tenant("run-quota", Quota(max_sandboxes=0))
    with Corral(api_server.url, key, environ={}) as limited:
        with pytest.raises(errors.QuotaExceededError):
            limited.run("true", labels=label)
        assert limited.list() == []
    assert corral.list(labels=label) == []


def test_the_sandbox_id_header_and_raw_ndjson(api_server: ApiServer, label: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {api_server.key_a}"}
    body = {"argv": ["echo", "hi"], "sandbox": {"memory": "64M", "labels": label}}
    with httpx.stream(
        "POST", api_server.url + "/v1/run", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        sandbox_id = response.headers[SANDBOX_ID_HEADER]
        lines = [line for line in response.iter_lines() if line]
    assert sandbox_id.startswith("sb-")
    assert '"type":"stdout"' in lines[0]
    assert '"type":"exit"' in lines[-1]
    gone = httpx.get(f"{api_server.url}/v1/sandboxes/{sandbox_id}", headers=headers, timeout=20)
    assert gone.status_code == 404
    other = {"Authorization": f"Bearer {api_server.key_b}"}
    empty = httpx.post(api_server.url + "/v1/run", json={"argv": []}, headers=other)
    assert empty.status_code == 422


def test_run_from_a_warm_pool(api_server: ApiServer, corral: Corral, label: dict[str, str]) -> None:
    api = httpx.Client(
        base_url=api_server.url + "/v1",
        headers={"Authorization": f"Bearer {api_server.key_a}"},
        timeout=60,
    )
    corral.create_pool("runs", size=1, memory="64M", labels=TEST_LABEL)
    try:
        wait_ready(api, "runs", 1)
        result = corral.run("echo from the pool", from_pool="runs", labels=label)
        assert result.stdout == b"from the pool\n"
        assert corral.list(labels=label) == []
        # A pool fixes the template and limits: refused in the SDK and by the server.
        with pytest.raises(errors.UserError, match="memory"):
            corral.run("true", from_pool="runs", memory="64M")
        refused = api.post(
            "/run", json={"argv": ["true"], "pool": "runs", "sandbox": {"memory": "64M"}}
        )
        assert refused.status_code == 400
        assert "sandbox.memory cannot be set with a pool" in refused.json()["detail"]
        with pytest.raises(errors.NotFoundError):
            corral.run("true", from_pool="no-such-pool")
    finally:
        corral.delete_pool("runs")
        api.close()


async def test_async_run(api_server: ApiServer, label: dict[str, str]) -> None:
    async with AsyncCorral(api_server.url, api_server.key_a, environ={}) as client:
        result = await client.run(["sh", "-c", "echo a; echo b >&2; exit 2"], memory="64M",
                                  labels=label)  # fmt: skip
        assert (result.exit_code, result.stdout, result.stderr) == (2, b"a\n", b"b\n")
        events = [e async for e in client.run_stream("echo x", memory="64M", labels=label)]
        assert events[0] == Output("stdout", b"x\n")
        assert isinstance(events[-1], ExitStatus)
        assert await client.list(labels=label) == []

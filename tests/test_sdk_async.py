"""The asyncio SDK mirrors the blocking one: same requests, results and errors."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.server import ServerConnection

from corral import errors
from corral.api.problems import to_problem
from corral.backends.base import ExecResult, ExitStatus, Output, SandboxStats
from corral.client import AsyncCorral, AsyncSandbox
from tests.test_sdk import (
    URL,
    Chunks,
    FakeApi,
    WsServer,
    _info,
    echo_upper,
    exit_event,
    ndjson,
    out,
    problem_response,
    sandbox_json,
)


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
async def corral(api: FakeApi) -> AsyncIterator[AsyncCorral]:
    async with AsyncCorral(URL, "key-1", transport=httpx.MockTransport(api), environ={}) as c:
        yield c


@pytest.fixture
async def sandbox(api: FakeApi, corral: AsyncCorral) -> AsyncSandbox:
    api.on_json("GET", "/v1/sandboxes/sb-1", sandbox_json())
    return await corral.get("sb-1")


async def test_environment_and_headers(api: FakeApi) -> None:
    api.on_json("GET", "/v1/health", {"status": "ok", "version": "0.1.0"})
    environ = {"CORRAL_URL": "http://from-env:8080", "CORRAL_API_KEY": "env-key"}
    async with AsyncCorral(transport=httpx.MockTransport(api), environ=environ) as client:
        assert (await client.health()).version == "0.1.0"
    assert str(api.last.url) == "http://from-env:8080/v1/health"
    assert api.last.headers["Authorization"] == "Bearer env-key"
    with pytest.raises(errors.UserError, match="CORRAL_URL"):
        AsyncCorral(environ={})


async def test_create_list_and_verbs(api: FakeApi, corral: AsyncCorral) -> None:
    api.on_json("POST", "/v1/sandboxes", sandbox_json(template="rust"), status=201)
    api.on_json("GET", "/v1/sandboxes", [sandbox_json("a")])
    api.on_json("PATCH", "/v1/sandboxes/sb-1", sandbox_json(labels={"a": "1"}))
    api.on_json("PUT", "/v1/sandboxes/sb-1/timeout", sandbox_json(expires_at=5.0))
    api.on_json("POST", "/v1/sandboxes/sb-1/pause", sandbox_json(state="paused"))
    api.on_json("POST", "/v1/sandboxes/sb-1/resume", sandbox_json())
    stats = {"memory_bytes": 1, "memory_limit": 2, "cpu_seconds": 0.0, "pids": 1,
             "pids_limit": 8, "oom_kills": 1}  # fmt: skip
    api.on_json("GET", "/v1/sandboxes/sb-1/stats", stats)

    sandbox = await corral.create("rust", pids=64, name="web-1")
    assert api.body() == {"template": "rust", "pids": 64, "name": "web-1"}
    assert sandbox.info.template == "rust"
    listed = await corral.list(state="running", labels={"k": "v"})
    assert [s.id for s in listed] == ["a"]
    assert api.last.url.params.multi_items() == [("state", "running"), ("label", "k=v")]
    assert (await sandbox.set_labels({"a": "1", "gone": None})).labels == {"a": "1"}
    assert api.body() == {"labels": {"a": "1", "gone": None}}
    await sandbox.set_timeout(5)
    assert sandbox.info.expires_at == 5.0
    await sandbox.pause()
    assert sandbox.info.state == "paused"
    await sandbox.resume()
    assert sandbox.info.state == "running"
    assert await sandbox.stats() == SandboxStats(1, 2, 0.0, 1, 8, 1)


async def test_sandbox_context_destroys_on_exit_and_on_error(
    api: FakeApi, corral: AsyncCorral
) -> None:
    api.on_json("POST", "/v1/sandboxes", sandbox_json(), status=201)
    api.on("DELETE", "/v1/sandboxes/sb-1", httpx.Response(204))
    async with corral.sandbox(template="default", memory="256M") as sb:
        assert sb.id == "sb-1"
    assert (api.last.method, api.last.url.path) == ("DELETE", "/v1/sandboxes/sb-1")
    api.requests.clear()
    with pytest.raises(RuntimeError, match="body"):
        async with corral.sandbox() as sb:
            raise RuntimeError("body")
    assert [r.method for r in api.requests] == ["POST", "DELETE"]
    # Awaited instead, it is a plain create; the handle is its own context manager.
    sandbox = await corral.sandbox()
    async with sandbox:
        pass
    assert api.last.method == "DELETE"


async def test_a_failed_destroy_is_noted_on_the_bodys_exception(
    api: FakeApi, sandbox: AsyncSandbox
) -> None:
    api.on("DELETE", "/v1/sandboxes/sb-1", problem_response(errors.StoreError("db down")))
    with pytest.raises(ValueError, match="body") as caught:
        async with sandbox:
            raise ValueError("body")
    assert any("destroying sandbox sb-1 failed" in n for n in caught.value.__notes__)
    api.on("DELETE", "/v1/sandboxes/sb-1", problem_response(errors.NotFoundError("gone")))
    assert await sandbox.kill() is False


async def test_exec_decodes_ndjson_split_anywhere(api: FakeApi, sandbox: AsyncSandbox) -> None:
    payload = ndjson(out("stdout", b"\x00\x01"), out("stderr", b"e"), out("stdout", b"\xfe"),
                     exit_event(137, oom_killed=True, reason="out of memory"))  # fmt: skip
    chunks = [payload[i : i + 5] for i in range(0, len(payload), 5)]
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=Chunks(chunks)))
    result = await sandbox.exec("cat /dev/urandom", stdin=b"in", timeout=2)
    assert result == ExecResult(
        137, b"\x00\x01\xfe", b"e", oom_killed=True, duration=0.5, reason="out of memory"
    )
    assert api.body() == {"argv": ["/bin/sh", "-c", "cat /dev/urandom"], "stdin": "aW4=",
                          "timeout": 2}  # fmt: skip
    assert api.last.extensions["timeout"]["read"] == 62


async def test_exec_stream_yields_events_in_order(api: FakeApi, sandbox: AsyncSandbox) -> None:
    body = ndjson(out("stdout", b"a"), exit_event(0))
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=body))
    events = [event async for event in sandbox.exec_stream(["echo", "a"])]
    assert events == [Output("stdout", b"a"), ExitStatus(0, duration=0.5)]


async def test_stopping_exec_stream_early_closes_the_response(
    api: FakeApi, sandbox: AsyncSandbox
) -> None:
    stream = Chunks([ndjson(out("stdout", b"x")) for _ in range(100)] + [ndjson(exit_event())])
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=stream))
    async with contextlib.aclosing(sandbox.exec_stream(["yes"])) as events:
        async for event in events:
            assert event == Output("stdout", b"x")
            break
    assert stream.closed
    assert stream.sent < 100


async def test_exec_stream_errors(api: FakeApi, sandbox: AsyncSandbox) -> None:
    api.on(
        "POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=ndjson(out("stdout", b"x")))
    )
    with pytest.raises(errors.ServerUnavailableError, match="exit status"):
        await sandbox.exec(["yes"])
    api.on("POST", "/v1/sandboxes/sb-1/exec", problem_response(errors.NotFoundError("no sandbox")))
    with pytest.raises(errors.NotFoundError) as caught:
        await sandbox.exec(["yes"])
    assert caught.value.sandbox_id == "sb-1"
    _, problem = to_problem(errors.ExecError("runtime died"))
    body = ndjson({"type": "exit", "exit_code": -1, "problem": problem})
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=body))
    with pytest.raises(errors.ExecError, match="runtime died"):
        await sandbox.exec(["yes"])


async def test_problems_and_transport_errors_map_to_corral_errors(
    api: FakeApi, corral: AsyncCorral
) -> None:
    error = errors.QuotaExceededError("3 sandboxes at most", hint="destroy one")
    api.on("POST", "/v1/sandboxes", problem_response(error))
    with pytest.raises(errors.QuotaExceededError, match="3 sandboxes") as caught:
        await corral.create()
    assert caught.value.hint == "destroy one"

    failure = httpx.ConnectError("refused")

    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    async with AsyncCorral(URL, transport=httpx.MockTransport(fail), environ={}) as client:
        with pytest.raises(errors.ServerUnavailableError, match="cannot reach") as unreachable:
            await client.templates()
    assert unreachable.value.__cause__ is failure


async def test_files(api: FakeApi, sandbox: AsyncSandbox, tmp_path: Path) -> None:
    api.on("PUT", "/v1/sandboxes/sb-1/files", httpx.Response(204))
    api.on("GET", "/v1/sandboxes/sb-1/files", httpx.Response(200, content=b"bytes"))
    api.on("PUT", "/v1/sandboxes/sb-1/archive", httpx.Response(204))
    await sandbox.files.write("/x", "☃", mode=0o600)
    assert (api.last.content, api.last.url.params["mode"]) == ("☃".encode(), "600")
    assert await sandbox.files.read("/x") == b"bytes"

    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.txt").write_text("a")
    await sandbox.files.upload_dir(tmp_path / "up", "/dst")
    with tarfile.open(fileobj=io.BytesIO(api.last.content)) as tar:
        assert tar.getnames() == ["a.txt"]

    api.on("GET", "/v1/sandboxes/sb-1/archive", httpx.Response(200, content=api.last.content))
    assert await sandbox.files.download_dir("/dst", tmp_path / "down") == []
    assert (tmp_path / "down" / "a.txt").read_text() == "a"


async def test_exec_interactive_over_websocket(api: FakeApi) -> None:
    server = WsServer(lambda c: None)
    server._play = echo_upper(server)
    with server:
        client = AsyncCorral(f"http://127.0.0.1:{server.port}", "key-ws", environ={},
                             transport=httpx.MockTransport(api))  # fmt: skip
        sandbox = AsyncSandbox(client, _info("sb-1"))
        async with sandbox.exec_interactive(["tr", "a-z", "A-Z"], cwd="/w") as proc:
            await proc.send(b"abc")
            async for event in proc:
                assert event == Output("stdout", b"ABC")
                break
            await proc.close_stdin()
            result = await proc.wait()
        with pytest.raises(errors.InvalidStateError, match="stdin is closed"):
            await proc.send(b"late")
        await client.aclose()
    assert result == ExecResult(0, b"", b"done\n", duration=0.5)
    assert server.seen_headers[0]["Authorization"] == "Bearer key-ws"
    assert json.loads(server.received[0]) == {"argv": ["tr", "a-z", "A-Z"], "cwd": "/w"}
    assert server.received[1:] == [b"abc", '{"type": "eof"}']


async def test_exec_interactive_problem_frame_and_unstarted_session(api: FakeApi) -> None:
    def play(connection: ServerConnection) -> None:
        connection.recv()
        _, body = to_problem(errors.AuthenticationError("unknown key"))
        connection.send(json.dumps(body))
        connection.close()

    with WsServer(play) as server:
        client = AsyncCorral(f"http://127.0.0.1:{server.port}", environ={})
        sandbox = AsyncSandbox(client, _info("sb-1"))
        unstarted = sandbox.exec_interactive("cat")
        with pytest.raises(errors.InvalidStateError, match="not started"):
            await unstarted.send(b"x")
        proc = await sandbox.exec_interactive("cat")
        with pytest.raises(errors.AuthenticationError, match="CORRAL_API_KEY"):
            await proc.wait()
        await proc.aclose()
        await client.aclose()


async def test_exec_interactive_without_a_server_is_server_unavailable() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AsyncCorral(f"http://127.0.0.1:{port}", environ={}) as client:
        with pytest.raises(errors.ServerUnavailableError, match="WebSocket"):
            await AsyncSandbox(client, _info("sb-1")).exec_interactive("cat")

"""The blocking SDK against httpx.MockTransport: request shapes, typed results,
NDJSON exec streams, problem mapping, destroy-on-exit, transport failures, tar
safety, and the interactive exec against a loopback WebSocket server."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from websockets.sync.server import Server, ServerConnection, serve

from corral import errors
from corral.api import models
from corral.api.problems import PROBLEMS, to_problem
from corral.backends.base import ExecResult, ExitStatus, Output, SandboxStats
from corral.client import Corral, Sandbox
from corral.client._base import environment_proxy
from corral.client._events import NdjsonDecoder

URL = "http://corral.test"
Handler = Callable[[httpx.Request], httpx.Response]


def sandbox_json(sandbox_id: str = "sb-1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": sandbox_id,
        "name": None,
        "tenant": "acme",
        "template": "default",
        "backend": "fake",
        "runtime": None,
        "state": "running",
        "kind": "ephemeral",
        "image_digest": None,
        "created_at": 1.0,
        "expires_at": None,
        "labels": {},
    }
    body.update(fields)
    return body


def problem_response(error: errors.CorralError) -> httpx.Response:
    status, body = to_problem(error)
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


def ndjson(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(event).encode() + b"\n" for event in events)


def out(stream: str, data: bytes) -> dict[str, Any]:
    return {"type": stream, "data": base64.b64encode(data).decode()}


def exit_event(code: int = 0, **fields: Any) -> dict[str, Any]:
    return {"type": "exit", "exit_code": code, "duration": 0.5, **fields}


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body delivered in the given chunks; remembers being closed."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += 1
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.sent += 1
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class FakeApi:
    """Routes (method, path) to canned answers and records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Handler] = {}

    def on(self, method: str, path: str, answer: httpx.Response | Handler) -> None:
        self.routes[(method, path)] = answer if callable(answer) else (lambda _: answer)

    def on_json(self, method: str, path: str, body: Any, status: int = 200) -> None:
        self.on(method, path, lambda _: httpx.Response(status, json=body))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return problem_response(errors.NotFoundError(f"no route {request.url.path}"))
        return handler(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)

    def client(self, **options: Any) -> Corral:
        options.setdefault("api_key", "key-1")
        return Corral(URL, transport=httpx.MockTransport(self), environ={}, **options)


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def corral(api: FakeApi) -> Iterator[Corral]:
    with api.client() as client:
        yield client


@pytest.fixture
def sandbox(api: FakeApi, corral: Corral) -> Sandbox:
    api.on_json("GET", "/v1/sandboxes/sb-1", sandbox_json())
    return corral.get("sb-1")


# --- connection settings ----------------------------------------------------------------


def test_url_and_key_come_from_the_given_environment(api: FakeApi) -> None:
    api.on_json("GET", "/v1/health", {"status": "ok", "version": "0.1.0"})
    environ = {"CORRAL_URL": "http://from-env:8080/v1/", "CORRAL_API_KEY": "env-key"}
    with Corral(transport=httpx.MockTransport(api), environ=environ) as client:
        assert client.url == "http://from-env:8080"
        assert client.health().status == "ok"
    assert str(api.last.url) == "http://from-env:8080/v1/health"
    assert api.last.headers["Authorization"] == "Bearer env-key"
    assert api.last.headers["User-Agent"].startswith("corral-python/")


def test_arguments_win_over_the_environment(api: FakeApi) -> None:
    api.on_json("GET", "/v1/health", {"status": "ok", "version": "0.1.0"})
    environ = {"CORRAL_URL": "http://from-env", "CORRAL_API_KEY": "env-key"}
    with Corral(
        "https://arg.example", "arg-key", transport=httpx.MockTransport(api), environ=environ
    ) as c:
        c.health()
    assert str(api.last.url) == "https://arg.example/v1/health"
    assert api.last.headers["Authorization"] == "Bearer arg-key"


def test_missing_url_names_what_to_set() -> None:
    with pytest.raises(errors.UserError) as caught:
        Corral(environ={})
    assert "CORRAL_URL" in str(caught.value)
    assert "url=" in str(caught.value)


@pytest.mark.parametrize("url", ["ftp://host", "host-without-scheme", "http://"])
def test_a_url_that_is_not_http_is_refused(url: str) -> None:
    with pytest.raises(errors.UserError, match="not"):
        Corral(url, environ={})


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.answer_health(version=self.path)

    def answer_health(self, version: str) -> None:
        body = json.dumps({"status": "ok", "version": version}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        return request, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port)


def test_unix_socket_urls_go_through_httpx_uds(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    with _UnixHttpServer(str(socket_path), _HealthHandler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with Corral(f"unix:{socket_path}", environ={}) as client:
                assert client.url == f"unix:{socket_path}"
                assert client.health().version == "/v1/health"
        finally:
            server.shutdown()
            thread.join(timeout=10)


def test_without_a_key_no_authorization_is_sent_and_401_says_what_to_set(api: FakeApi) -> None:
    api.on("GET", "/v1/tenants/me", problem_response(errors.AuthenticationError("no key")))
    client = Corral(URL, transport=httpx.MockTransport(api), environ={})
    with client, pytest.raises(errors.AuthenticationError) as caught:
        client.tenant()
    assert "Authorization" not in api.last.headers
    assert "CORRAL_API_KEY" in str(caught.value)


# --- sandboxes --------------------------------------------------------------------------


def test_create_sends_only_the_given_fields_and_returns_a_handle(
    api: FakeApi, corral: Corral
) -> None:
    api.on_json("POST", "/v1/sandboxes", sandbox_json(template="rust"), status=201)
    sandbox = corral.create(
        "rust", memory="512M", cpus=1.5, timeout=600, env={"A": "1"}, labels={"team": "x"}
    )
    assert api.body() == {
        "template": "rust",
        "memory": "512M",
        "cpus": 1.5,
        "timeout": 600,
        "env": {"A": "1"},
        "labels": {"team": "x"},
    }
    assert sandbox.id == "sb-1"
    assert sandbox.info.template == "rust"
    # Creating may build an image: the read waits longer than ordinary calls.
    assert api.last.extensions["timeout"]["read"] >= 900


def test_a_local_toml_template_is_sent_whole(api: FakeApi, corral: Corral, tmp_path: Path) -> None:
    api.on_json("POST", "/v1/sandboxes", sandbox_json(template="mine"), status=201)
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nbase = "debian"\npackages = ["gcc"]\n')
    corral.create(path, memory="1G")
    assert api.body() == {
        "template": "mine",
        "template_spec": {"name": "mine", "base": "debian", "packages": ["gcc"]},
        "memory": "1G",
    }


def test_a_missing_or_broken_toml_template_fails_before_any_request(
    api: FakeApi, corral: Corral, tmp_path: Path
) -> None:
    with pytest.raises(errors.NotFoundError, match="does not exist"):
        corral.create(str(tmp_path / "nope.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(errors.TemplateError) as caught:
        corral.create(broken)
    assert caught.value.file == str(broken)
    assert api.requests == []


def test_invalid_settings_are_refused_locally(api: FakeApi, corral: Corral) -> None:
    with pytest.raises(errors.UserError, match="cpus"):
        corral.create("default", cpus=-1)
    with pytest.raises(errors.UserError, match="name"):
        corral.create("default", name="Not A Name")
    assert api.requests == []


def test_list_filters_by_state_labels_and_tenant(api: FakeApi, corral: Corral) -> None:
    api.on_json("GET", "/v1/sandboxes", [sandbox_json("a"), sandbox_json("b")])
    found = corral.list(state="running", labels={"team": "x", "env": "ci"}, tenant="acme")
    assert [sb.id for sb in found] == ["a", "b"]
    assert api.last.url.params.multi_items() == [
        ("state", "running"),
        ("label", "team=x"),
        ("label", "env=ci"),
        ("tenant", "acme"),
    ]


def test_ids_are_quoted_into_the_path(api: FakeApi, corral: Corral) -> None:
    with pytest.raises(errors.NotFoundError):
        corral.get("a/b")
    assert api.last.url.raw_path == b"/v1/sandboxes/a%2Fb"


def test_sandbox_verbs_send_their_requests_and_keep_info_current(
    api: FakeApi, sandbox: Sandbox
) -> None:
    api.on_json("PATCH", "/v1/sandboxes/sb-1", sandbox_json(labels={"a": "1"}))
    api.on_json("PUT", "/v1/sandboxes/sb-1/timeout", sandbox_json(expires_at=99.0))
    api.on_json("POST", "/v1/sandboxes/sb-1/pause", sandbox_json(state="paused"))
    api.on_json("POST", "/v1/sandboxes/sb-1/resume", sandbox_json(state="running"))

    assert sandbox.update(labels={"a": "1", "b": None}, metadata={"k": [1]}).labels == {"a": "1"}
    assert api.body() == {"labels": {"a": "1", "b": None}, "metadata": {"k": [1]}}
    sandbox.set_labels({"c": "3"})
    assert api.body() == {"labels": {"c": "3"}}

    assert sandbox.set_timeout(30).expires_at == 99.0
    assert api.body() == {"seconds": 30}
    assert sandbox.info.expires_at == 99.0

    sandbox.pause()
    assert sandbox.info.state == "paused"
    sandbox.resume()
    assert sandbox.info.state == "running"
    api.on_json("GET", "/v1/sandboxes/sb-1", sandbox_json(state="stopped"))
    assert sandbox.refresh().state == "stopped"
    assert sandbox.info.state == "stopped"


def test_stats_templates_and_tenants_are_typed(api: FakeApi, sandbox: Sandbox) -> None:
    stats = {"memory_bytes": 10, "memory_limit": 20, "cpu_seconds": 0.5, "pids": 2,
             "pids_limit": 64}  # fmt: skip
    api.on_json("GET", "/v1/sandboxes/sb-1/stats", stats)
    assert sandbox.stats() == SandboxStats(10, 20, 0.5, 2, 64, 0)

    template = {"name": "rust", "description": "d", "base": "debian", "isolation": ["oci"],
                "kind": "ephemeral", "resources": {}, "timeout": 600}  # fmt: skip
    api.on_json("GET", "/v1/templates", [template])
    tenant = {"name": "acme", "quota": {"max_sandboxes": 3},
              "usage": {"sandboxes": 1, "vcpus": 1.0, "memory": 512}}  # fmt: skip
    api.on_json("GET", "/v1/tenants/me", tenant)
    api.on_json("GET", "/v1/tenants", [tenant])
    client = sandbox._client
    assert client.templates()[0].name == "rust"
    assert client.tenant().quota.max_sandboxes == 3
    assert client.tenants()[0].usage.memory == 512


def test_an_answer_outside_the_api_is_a_server_error(api: FakeApi, corral: Corral) -> None:
    api.on_json("GET", "/v1/sandboxes/sb-1", {"id": "sb-1"})
    with pytest.raises(errors.ServerUnavailableError, match="does not fit the API"):
        corral.get("sb-1")


def test_ready_raises_the_problem_the_server_reports(api: FakeApi, corral: Corral) -> None:
    api.on("GET", "/v1/ready", problem_response(errors.StoreError("database is locked")))
    with pytest.raises(errors.StoreError, match="database is locked"):
        corral.ready()


# --- destroy on exit --------------------------------------------------------------------


def test_the_context_manager_destroys_on_exit(api: FakeApi, corral: Corral) -> None:
    api.on_json("POST", "/v1/sandboxes", sandbox_json(), status=201)
    api.on("DELETE", "/v1/sandboxes/sb-1", httpx.Response(204))
    with corral.sandbox(template="default") as sb:
        assert sb.id == "sb-1"
        assert not any(r.method == "DELETE" for r in api.requests)
    assert (api.last.method, api.last.url.path) == ("DELETE", "/v1/sandboxes/sb-1")


def test_the_context_manager_destroys_when_the_body_raises(api: FakeApi, corral: Corral) -> None:
    api.on_json("POST", "/v1/sandboxes", sandbox_json(), status=201)
    api.on("DELETE", "/v1/sandboxes/sb-1", httpx.Response(204))
    with pytest.raises(KeyError), corral.sandbox() as _:
        raise KeyError("boom")
    assert (api.last.method, api.last.url.path) == ("DELETE", "/v1/sandboxes/sb-1")


def test_a_sandbox_already_gone_on_exit_is_fine(api: FakeApi, sandbox: Sandbox) -> None:
    api.on("DELETE", "/v1/sandboxes/sb-1", problem_response(errors.NotFoundError("gone")))
    with sandbox:
        pass
    assert sandbox.kill() is False


def test_a_failed_destroy_is_noted_on_the_bodys_exception(api: FakeApi, sandbox: Sandbox) -> None:
    api.on("DELETE", "/v1/sandboxes/sb-1", problem_response(errors.StoreError("db down")))
    with pytest.raises(ValueError, match="body") as caught, sandbox:
        raise ValueError("body")
    assert any("destroying sandbox sb-1 failed" in note for note in caught.value.__notes__)
    # Without an exception in the body, the failed destroy is the error.
    with pytest.raises(errors.StoreError, match="db down"), sandbox:
        pass


# --- problems ---------------------------------------------------------------------------


def _instance(cls: type[errors.CorralError]) -> errors.CorralError:
    if cls is errors.TemplateError:
        return errors.TemplateError("bad size", file="t.toml", field="memory", hint="use 512M")
    return cls(
        f"{cls.__name__} happened", sandbox_id="sb-9", backend="oci", hint="do X",
        stderr_tail="runtime: no",
    )  # fmt: skip


@pytest.mark.parametrize("cls", [entry[0] for entry in PROBLEMS], ids=lambda c: c.__name__)
def test_every_problem_maps_to_its_exception_with_its_facts(
    api: FakeApi, corral: Corral, cls: type[errors.CorralError]
) -> None:
    original = _instance(cls)
    api.on("GET", "/v1/sandboxes/sb-1/stats", problem_response(original))
    with pytest.raises(errors.CorralError) as caught:
        Sandbox(corral, _info("sb-1")).stats()
    error = caught.value
    assert type(error) is cls
    assert error.message == original.message
    assert error.hint == original.hint
    if cls is errors.TemplateError:
        assert isinstance(error, errors.TemplateError)
        assert (error.file, error.field) == ("t.toml", "memory")
        assert error.sandbox_id == "sb-1"  # the SDK adds the sandbox it asked about
    else:
        assert (error.sandbox_id, error.backend, error.stderr_tail) == (
            "sb-9",
            "oci",
            "runtime: no",
        )


def _info(sandbox_id: str) -> Any:
    from corral.api.models import Sandbox as SandboxInfo

    return SandboxInfo.model_validate(sandbox_json(sandbox_id))


def test_a_validation_problem_is_a_user_error_naming_the_field(
    api: FakeApi, corral: Corral
) -> None:
    body = {
        "type": "urn:corral:problem:validation",
        "title": "Invalid request",
        "status": 422,
        "detail": "invalid",
        "errors": [{"loc": ["body", "cpus"], "msg": "too big"}],
    }
    api.on("POST", "/v1/sandboxes", httpx.Response(422, json=body))
    with pytest.raises(errors.UserError, match=r"body\.cpus: too big"):
        corral.create()


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (401, errors.AuthenticationError),
        (403, errors.PermissionDeniedError),
        (404, errors.NotFoundError),
        (413, errors.FileTooLargeError),
        (429, errors.QuotaExceededError),
        (418, errors.UserError),
        (502, errors.ServerUnavailableError),
        (500, errors.ServerUnavailableError),
    ],
)
def test_answers_without_a_problem_body_map_by_status(
    api: FakeApi, corral: Corral, status: int, cls: type[errors.CorralError]
) -> None:
    api.on("GET", "/v1/sandboxes/sb-1", httpx.Response(status, text="<html>proxy says no</html>"))
    with pytest.raises(cls) as caught:
        corral.get("sb-1")
    assert type(caught.value) is cls
    assert f"HTTP {status}" in str(caught.value)
    assert "proxy says no" in str(caught.value)
    assert caught.value.sandbox_id == "sb-1"


# --- transport failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("peer closed"),
    ],
    ids=type,
)
def test_transport_errors_become_server_unavailable(failure: httpx.HTTPError) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    client = Corral(URL, "k", transport=httpx.MockTransport(fail), environ={})
    with client, pytest.raises(errors.ServerUnavailableError) as caught:
        client.get("sb-1")
    assert "http://corral.test/v1/sandboxes/sb-1" in str(caught.value)
    assert "CORRAL_URL" in str(caught.value)  # the hint
    assert caught.value.__cause__ is failure


def test_a_closed_client_says_so(api: FakeApi) -> None:
    client = api.client()
    sandbox = Sandbox(client, _info("sb-1"))
    client.close()
    with pytest.raises(errors.InvalidStateError, match="closed"):
        client.list()
    with pytest.raises(errors.InvalidStateError, match="closed"):
        sandbox.exec("true")
    assert api.requests == []


def test_a_refused_connection_on_a_real_port_is_server_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Corral(f"http://127.0.0.1:{port}", environ={})
    with client, pytest.raises(errors.ServerUnavailableError, match="cannot reach"):
        client.health()


class _RecordingProxy(_HealthHandler):
    """A forward proxy that answers every request itself (nothing goes further)."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _RecordingProxy.seen.append(self.path)
        self.answer_health(version="via the proxy")


def test_the_environment_s_proxy_is_used_unless_no_proxy_exempts_the_host() -> None:
    _RecordingProxy.seen.clear()
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _RecordingProxy) as proxy:
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        try:
            environ = {"http_proxy": f"http://127.0.0.1:{proxy.server_address[1]}"}
            with Corral("http://corral.example:8080", environ=environ) as client:
                assert client.health().version == "via the proxy"
            assert _RecordingProxy.seen == ["http://corral.example:8080/v1/health"]
            # Exempt: straight to the server (a closed loopback port here), not the proxy.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                closed = probe.getsockname()[1]
            exempt = environ | {"NO_PROXY": "localhost,127.0.0.1"}
            with (
                Corral(f"http://127.0.0.1:{closed}", environ=exempt) as client,
                pytest.raises(errors.ServerUnavailableError, match="cannot reach"),
            ):
                client.health()
            assert len(_RecordingProxy.seen) == 1
        finally:
            proxy.shutdown()
            thread.join(timeout=10)


@pytest.mark.parametrize(
    ("scheme", "host", "environ", "expected"),
    [
        ("http", "a.example", {}, None),
        ("http", "a.example", {"HTTP_PROXY": "http://p:1"}, "http://p:1"),
        ("https", "a.example", {"HTTP_PROXY": "http://p:1"}, None),
        (
            "https",
            "a.example",
            {"https_proxy": "http://s:2", "ALL_PROXY": "http://x:3"},
            "http://s:2",
        ),
        ("https", "a.example", {"all_proxy": "http://x:3"}, "http://x:3"),
        (
            "http",
            "api.corp.example",
            {"HTTP_PROXY": "http://p:1", "NO_PROXY": ".corp.example"},
            None,
        ),
        ("http", "corp.example", {"HTTP_PROXY": "http://p:1", "no_proxy": "corp.example"}, None),
        (
            "http",
            "notcorp.example",
            {"HTTP_PROXY": "http://p:1", "NO_PROXY": "corp.example"},
            "http://p:1",
        ),
        ("http", "a.example", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, None),
    ],
)
def test_environment_proxy_reads_like_curl(
    scheme: str, host: str, environ: dict[str, str], expected: str | None
) -> None:
    assert environment_proxy(scheme, host, environ) == expected


# --- exec -------------------------------------------------------------------------------


def test_exec_sends_the_command_and_collects_a_typed_result(api: FakeApi, sandbox: Sandbox) -> None:
    body = ndjson(out("stdout", b"hel"), out("stderr", b"warn\n"), out("stdout", b"lo\n"),
                  exit_event(3, reason="exited with 3"))  # fmt: skip
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=body))
    result = sandbox.exec(
        ["python3", "-c", "x"], env={"A": "1"}, cwd="/code", stdin=b"\x00in", timeout=5
    )
    assert result == ExecResult(3, b"hello\n", b"warn\n", duration=0.5, reason="exited with 3")
    assert not result.ok
    assert api.body() == {
        "argv": ["python3", "-c", "x"],
        "env": {"A": "1"},
        "cwd": "/code",
        "stdin": base64.b64encode(b"\x00in").decode(),
        "timeout": 5,
    }
    # The read waits for the command's own timeout plus a margin.
    assert api.last.extensions["timeout"]["read"] == 65


def test_run_sends_the_sandbox_and_the_command_in_one_request(api: FakeApi, corral: Corral) -> None:
    body = ndjson(out("stdout", b"hi\n"), exit_event(0))
    api.on("POST", "/v1/run", httpx.Response(200, content=body))
    result = corral.run(["echo", "hi"], "rust", env={"A": "1"}, timeout=5, memory="64M",
                        labels={"k": "v"})  # fmt: skip
    assert (result.exit_code, result.stdout) == (0, b"hi\n")
    assert api.body() == {
        "argv": ["echo", "hi"],
        "env": {"A": "1"},
        "timeout": 5,
        # The sandbox outlives the command's timeout by the margin only.
        "sandbox": {"template": "rust", "memory": "64M", "labels": {"k": "v"}, "timeout": 65},
    }
    # The first line may wait for a create (an image build), then for the command.
    assert api.last.extensions["timeout"]["read"] == 900 + 5 + 60
    assert corral.run("true").ok
    assert api.body() == {"argv": ["/bin/sh", "-c", "true"], "sandbox": {"template": "default"}}
    assert api.last.extensions["timeout"]["read"] is None


def test_run_from_a_pool_sends_only_what_a_claim_sets(api: FakeApi, corral: Corral) -> None:
    api.on("POST", "/v1/run", httpx.Response(200, content=ndjson(exit_event(0))))
    assert corral.run("true", from_pool="warm", labels={"k": "v"}, name="job-1").ok
    assert api.body() == {
        "argv": ["/bin/sh", "-c", "true"],
        "pool": "warm",
        "sandbox": {"labels": {"k": "v"}, "name": "job-1"},
    }
    with pytest.raises(errors.UserError, match="cpus: the pool fixes"):
        corral.run("true", from_pool="warm", cpus=2)
    assert len(api.requests) == 1
    # What the server lets a claim set is what a claim takes.
    assert set(models.ClaimBody.model_fields) == models.CLAIM_FIELDS


def test_a_string_command_runs_under_sh_and_has_no_read_limit(
    api: FakeApi, sandbox: Sandbox
) -> None:
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=ndjson(exit_event())))
    assert sandbox.exec("echo hi | wc -c", stdin="text").ok
    assert api.body() == {"argv": ["/bin/sh", "-c", "echo hi | wc -c"], "stdin": "dGV4dA=="}
    assert api.last.extensions["timeout"]["read"] is None


def test_exec_stream_decodes_lines_split_across_chunks_and_binary_split_across_lines(
    api: FakeApi, sandbox: Sandbox
) -> None:
    snowman = "☃".encode()  # three bytes, split over two events
    payload = ndjson(out("stdout", b"\xff\x00" + snowman[:1]), out("stdout", snowman[1:]),
                     exit_event(0, timed_out=False))  # fmt: skip
    chunks = [payload[i : i + 7] for i in range(0, len(payload), 7)]
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=Chunks(chunks)))
    events = list(sandbox.exec_stream(["cat"]))
    assert events == [
        Output("stdout", b"\xff\x00" + snowman[:1]),
        Output("stdout", snowman[1:]),
        ExitStatus(0, duration=0.5),
    ]
    data = b"".join(e.data for e in events if isinstance(e, Output))
    assert data.decode("utf-8", "replace").endswith("☃")


def test_the_exit_line_may_lack_its_newline(api: FakeApi, sandbox: Sandbox) -> None:
    body = ndjson(out("stdout", b"x")) + json.dumps(exit_event(124, timed_out=True)).encode()
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=body))
    result = sandbox.exec(["sleep", "9"])
    assert (result.exit_code, result.timed_out, result.stdout) == (124, True, b"x")


def test_a_stream_cut_before_the_exit_line_is_server_unavailable(
    api: FakeApi, sandbox: Sandbox
) -> None:
    api.on(
        "POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=ndjson(out("stdout", b"x")))
    )
    events = sandbox.exec_stream(["yes"])
    assert next(events) == Output("stdout", b"x")
    with pytest.raises(errors.ServerUnavailableError, match="exit status") as caught:
        next(events)
    assert caught.value.sandbox_id == "sb-1"
    with pytest.raises(errors.ServerUnavailableError):
        sandbox.exec(["yes"])


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b'{"type": "bogus"}\n', b'{"type": "stdout", "data": "***"}\n', b"[1]\n"],
)
def test_a_malformed_line_is_server_unavailable(
    api: FakeApi, sandbox: Sandbox, line: bytes
) -> None:
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=line))
    with pytest.raises(errors.ServerUnavailableError, match=r"exec event|base64"):
        sandbox.exec(["x"])


def test_an_endless_line_is_refused(
    api: FakeApi, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(NdjsonDecoder, "max_line", 100)
    stream = Chunks([b'{"type": "stdout", "data": "' + b"A" * 60] * 10)
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=stream))
    with pytest.raises(errors.ServerUnavailableError, match="over 100 bytes"):
        sandbox.exec(["x"])
    assert stream.closed


def test_a_problem_before_the_stream_is_raised(api: FakeApi, sandbox: Sandbox) -> None:
    error = errors.InvalidStateError("sandbox is paused", hint="resume it")
    api.on("POST", "/v1/sandboxes/sb-1/exec", problem_response(error))
    with pytest.raises(errors.InvalidStateError, match="paused") as caught:
        list(sandbox.exec_stream(["true"]))
    assert caught.value.sandbox_id == "sb-1"


def test_a_problem_line_inside_the_stream_is_raised(api: FakeApi, sandbox: Sandbox) -> None:
    _, problem = to_problem(errors.ExecError("runtime died", stderr_tail="crun: oops"))
    body = ndjson(out("stdout", b"partial"), problem)
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=body))
    with pytest.raises(errors.ExecError) as caught:
        sandbox.exec(["x"])
    assert caught.value.stderr_tail == "crun: oops"


def test_an_exit_line_carrying_a_problem_is_raised(api: FakeApi, sandbox: Sandbox) -> None:
    _, problem = to_problem(errors.ExecError("runtime died", backend="oci"))
    body = ndjson(out("stdout", b"partial"), {"type": "exit", "exit_code": -1, "problem": problem})
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, content=body))
    events = sandbox.exec_stream(["x"])
    assert next(events) == Output("stdout", b"partial")
    with pytest.raises(errors.ExecError, match="runtime died") as caught:
        next(events)
    assert (caught.value.backend, caught.value.sandbox_id) == ("oci", "sb-1")


def test_stopping_exec_stream_early_closes_the_response(api: FakeApi, sandbox: Sandbox) -> None:
    stream = Chunks([ndjson(out("stdout", b"%d" % i)) for i in range(100)] + [ndjson(exit_event())])
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=stream))
    for event in sandbox.exec_stream(["yes"]):
        assert event == Output("stdout", b"0")
        break
    assert stream.closed
    assert stream.sent < 100


def test_exec_closes_the_response_after_the_exit_line(api: FakeApi, sandbox: Sandbox) -> None:
    # What follows the exit line is read to the end of the body (so the connection
    # can serve the next request) but never decoded ...
    stream = Chunks([ndjson(exit_event(0)), b"trailing garbage that is never decoded\n"])
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=stream))
    assert sandbox.exec(["true"]).ok
    assert stream.closed
    assert stream.sent == 2
    # ... and only a little of it: past 64 KiB the response is closed unread.
    endless = Chunks([ndjson(exit_event(0))] + [b"x" * 4096] * 1000)
    api.on("POST", "/v1/sandboxes/sb-1/exec", httpx.Response(200, stream=endless))
    assert sandbox.exec(["true"]).ok
    assert endless.closed
    assert endless.sent < 30


def test_a_bad_argv_is_refused_before_sending(api: FakeApi, sandbox: Sandbox) -> None:
    count = len(api.requests)
    with pytest.raises(errors.UserError, match="argv"):
        sandbox.exec([])
    with pytest.raises(errors.UserError, match="argv"):
        sandbox.exec(["ls", 3])  # type: ignore[list-item]
    assert len(api.requests) == count


# --- files ------------------------------------------------------------------------------


def test_files_write_and_read_raw_bytes(api: FakeApi, sandbox: Sandbox) -> None:
    api.on("PUT", "/v1/sandboxes/sb-1/files", httpx.Response(204))
    api.on("GET", "/v1/sandboxes/sb-1/files", httpx.Response(200, content=b"\x00\xffdata"))
    sandbox.files.write("/code/run.sh", b"#!/bin/sh\n", mode=0o755)
    assert api.last.url.params.multi_items() == [("path", "/code/run.sh"), ("mode", "755")]
    assert api.last.headers["Content-Type"] == "application/octet-stream"
    assert api.last.content == b"#!/bin/sh\n"
    sandbox.files.write("/code/main.rs", "fn main() {} // ☃")
    assert api.last.content == "fn main() {} // ☃".encode()
    assert api.last.url.params["mode"] == "644"
    assert sandbox.files.read("/code/out.bin") == b"\x00\xffdata"
    assert api.last.url.params["path"] == "/code/out.bin"


def test_files_refuse_relative_paths_and_bad_modes(api: FakeApi, sandbox: Sandbox) -> None:
    count = len(api.requests)
    with pytest.raises(errors.UserError, match="absolute"):
        sandbox.files.write("main.rs", b"")
    with pytest.raises(errors.UserError, match="mode"):
        sandbox.files.write("/main.rs", b"", mode=0o17777)
    assert len(api.requests) == count


def test_a_file_over_the_limit_is_file_too_large(api: FakeApi, sandbox: Sandbox) -> None:
    api.on(
        "PUT", "/v1/sandboxes/sb-1/files", problem_response(errors.FileTooLargeError("over 1 MiB"))
    )
    with pytest.raises(errors.FileTooLargeError) as caught:
        sandbox.files.write("/big", b"x" * 10)
    assert caught.value.sandbox_id == "sb-1"


def test_upload_dir_sends_a_tar_of_the_directory_contents(
    api: FakeApi, sandbox: Sandbox, tmp_path: Path
) -> None:
    api.on("PUT", "/v1/sandboxes/sb-1/archive", httpx.Response(204))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.rs").write_text("fn main() {}")
    (tmp_path / "Cargo.toml").write_text("[package]")
    (tmp_path / "link").symlink_to("src/main.rs")
    sandbox.files.upload_dir(tmp_path, "/code")
    assert api.last.url.params["path"] == "/code"
    assert api.last.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(api.last.content)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"Cargo.toml", "link", "src", "src/main.rs"}
        assert members["link"].issym()
        assert members["link"].linkname == "src/main.rs"
        main = tar.extractfile("src/main.rs")
        assert main is not None
        assert main.read() == b"fn main() {}"


def test_upload_dir_needs_a_local_directory(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(errors.NotFoundError, match="not a local directory"):
        sandbox.files.upload_dir(tmp_path / "missing", "/code")


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


def test_download_dir_extracts_safe_members_and_refuses_escapes(
    api: FakeApi, sandbox: Sandbox, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    outside = tmp_path / "outside.txt"
    archive = _tar(
        (_member("ok.txt"), b"fine"),
        (_member("sub", tarfile.DIRTYPE), None),
        (_member("sub/inner.txt"), b"inner"),
        (_member("rel-link", tarfile.SYMTYPE, "sub/inner.txt"), None),
        (_member("../outside.txt"), b"escaped"),
        (_member("/tmp/absolute.txt"), b"absolute"),
        (_member("etc-link", tarfile.SYMTYPE, "/etc/passwd"), None),
        (_member("up-link", tarfile.SYMTYPE, "../../.."), None),
        (_member("hard", tarfile.LNKTYPE, "../outside.txt"), None),
    )
    api.on("GET", "/v1/sandboxes/sb-1/archive", httpx.Response(200, content=archive))
    refused = sandbox.files.download_dir("/code", target)
    assert api.last.url.params["path"] == "/code"
    assert sorted(refused) == ["../outside.txt", "/tmp/absolute.txt", "etc-link", "hard", "up-link"]
    assert (target / "ok.txt").read_bytes() == b"fine"
    assert (target / "sub" / "inner.txt").read_bytes() == b"inner"
    assert (target / "rel-link").resolve() == (target / "sub" / "inner.txt").resolve()
    assert not outside.exists()
    assert not Path("/tmp/absolute.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["ok.txt", "rel-link", "sub"]


def test_download_dir_of_a_non_tar_is_server_unavailable(
    api: FakeApi, sandbox: Sandbox, tmp_path: Path
) -> None:
    api.on("GET", "/v1/sandboxes/sb-1/archive", httpx.Response(200, content=b"no tar" * 200))
    with pytest.raises(errors.ServerUnavailableError, match="not a valid tar"):
        sandbox.files.download_dir("/code", tmp_path)


# --- import weight ----------------------------------------------------------------------


def test_the_sdk_imports_without_server_dependencies() -> None:
    code = (
        "import sys, corral.client; from corral import Corral, AsyncCorral; "
        "heavy = {'fastapi', 'starlette', 'sqlalchemy', 'alembic', 'uvicorn', 'typer', "
        "'websockets'} & set(sys.modules); print(sorted(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- interactive exec over WebSocket ----------------------------------------------------


class WsServer:
    """A loopback WebSocket server playing the exec/ws protocol from a script."""

    def __init__(self, play: Callable[[ServerConnection], None]) -> None:
        self.seen_paths: list[str] = []
        self.seen_headers: list[dict[str, str]] = []
        self.received: list[str | bytes] = []
        self._play = play
        self.refuse: httpx.Response | None = None
        self.server: Server = serve(self._handle, "127.0.0.1", 0, process_request=self._check)
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _check(self, connection: ServerConnection, request: Any) -> Any:
        self.seen_paths.append(request.path)
        self.seen_headers.append(dict(request.headers.raw_items()))
        if self.refuse is not None:
            response = connection.respond(self.refuse.status_code, self.refuse.text)
            response.headers["Content-Type"] = self.refuse.headers["Content-Type"]
            return response
        return None

    def _handle(self, connection: ServerConnection) -> None:
        self._play(connection)

    def recv(self, connection: ServerConnection) -> str | bytes:
        message = connection.recv()
        self.received.append(message)
        return message

    def __enter__(self) -> WsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self._thread.join(timeout=10)


def send_event(connection: ServerConnection, event: dict[str, Any]) -> None:
    connection.send(json.dumps(event))


def echo_upper(server: WsServer) -> Callable[[ServerConnection], None]:
    """Reads the start frame, echoes stdin chunks upper-cased until eof, then exits 0."""

    def play(connection: ServerConnection) -> None:
        server.recv(connection)
        while True:
            message = server.recv(connection)
            if isinstance(message, str):
                assert json.loads(message) == {"type": "eof"}
                break
            send_event(connection, out("stdout", message.upper()))
        send_event(connection, out("stderr", b"done\n"))
        send_event(connection, exit_event(0))
        connection.close()

    return play


@pytest.fixture
def ws_sandbox(api: FakeApi) -> Callable[[WsServer], Sandbox]:
    def make(server: WsServer) -> Sandbox:
        client = Corral(f"http://127.0.0.1:{server.port}", "key-ws", environ={},
                        transport=httpx.MockTransport(api))  # fmt: skip
        return Sandbox(client, _info("sb-1"))

    return make


def test_exec_interactive_streams_stdin_and_output(
    ws_sandbox: Callable[[WsServer], Sandbox],
) -> None:
    server = WsServer(lambda c: None)
    server._play = echo_upper(server)
    with server:
        sandbox = ws_sandbox(server)
        with sandbox.exec_interactive(["tr", "a-z", "A-Z"], env={"A": "1"}, timeout=30) as proc:
            proc.send(b"hello ")
            events = iter(proc)
            assert next(events) == Output("stdout", b"HELLO ")
            proc.send("world")
            proc.send(b"")  # nothing to send: no frame
            proc.close_stdin()
            proc.close_stdin()
            result = proc.wait()
        with pytest.raises(errors.InvalidStateError, match="stdin is closed"):
            proc.send(b"late")
    assert result == ExecResult(0, b"WORLD", b"done\n", duration=0.5)
    assert proc.exit_status == ExitStatus(0, duration=0.5)
    assert server.seen_paths == ["/v1/sandboxes/sb-1/exec/ws"]
    assert server.seen_headers[0]["Authorization"] == "Bearer key-ws"
    start, *rest = server.received
    assert json.loads(start) == {"argv": ["tr", "a-z", "A-Z"], "env": {"A": "1"}, "timeout": 30}
    assert rest == [b"hello ", b"world", '{"type": "eof"}']


def test_exec_interactive_raises_a_problem_frame(ws_sandbox: Callable[[WsServer], Sandbox]) -> None:
    def play(connection: ServerConnection) -> None:
        connection.recv()
        _, body = to_problem(errors.InvalidStateError("sandbox is paused", sandbox_id="sb-1"))
        connection.send(json.dumps(body))
        connection.close()

    with (
        WsServer(play) as server,
        ws_sandbox(server).exec_interactive("cat") as proc,
        pytest.raises(errors.InvalidStateError, match="paused"),
    ):
        proc.wait()


def test_exec_interactive_refused_at_once_raises_the_problem_on_read(
    ws_sandbox: Callable[[WsServer], Sandbox],
) -> None:
    def play(connection: ServerConnection) -> None:
        # As the server does for a bad key: the problem before reading anything, then close.
        _, body = to_problem(errors.AuthenticationError("no API key given"))
        connection.send(json.dumps(body))
        connection.close()

    with (
        WsServer(play) as server,
        ws_sandbox(server).exec_interactive("cat") as proc,
        pytest.raises(errors.AuthenticationError, match="no API key"),
    ):
        proc.wait()


def test_closing_stdin_after_the_command_ended_is_harmless(
    ws_sandbox: Callable[[WsServer], Sandbox],
) -> None:
    def play(connection: ServerConnection) -> None:
        connection.recv()
        send_event(connection, exit_event(0))
        connection.close()

    with WsServer(play) as server, ws_sandbox(server).exec_interactive("true") as proc:
        assert proc.wait().exit_code == 0
        time.sleep(0.1)  # the server's close arrives
        proc.close_stdin()
        with pytest.raises(errors.InvalidStateError, match="stdin is closed"):
            proc.send(b"late")


def test_exec_interactive_cut_before_exit_is_server_unavailable(
    ws_sandbox: Callable[[WsServer], Sandbox],
) -> None:
    def play(connection: ServerConnection) -> None:
        connection.recv()
        send_event(connection, out("stdout", b"partial"))
        connection.close()

    with WsServer(play) as server, ws_sandbox(server).exec_interactive("cat") as proc:
        events = iter(proc)
        assert next(events) == Output("stdout", b"partial")
        with pytest.raises(errors.ServerUnavailableError, match="exit status"):
            next(events)


def test_exec_interactive_refused_upgrade_maps_the_problem(
    ws_sandbox: Callable[[WsServer], Sandbox],
) -> None:
    with WsServer(lambda c: None) as server:
        server.refuse = problem_response(errors.AuthenticationError("unknown key"))
        with pytest.raises(errors.AuthenticationError, match="unknown key") as caught:
            ws_sandbox(server).exec_interactive("cat")
    assert caught.value.sandbox_id == "sb-1"


def test_exec_interactive_without_a_server_is_server_unavailable() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Corral(f"http://127.0.0.1:{port}", environ={})
    with pytest.raises(errors.ServerUnavailableError, match="WebSocket"):
        Sandbox(client, _info("sb-1")).exec_interactive("cat")
    client.close()

"""The HTTP API against a real `corral serve` (oci backend, crun) on a loopback port."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from corral.store import Quota
from tests.conftest import ApiServer

pytestmark = pytest.mark.runtime


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:corral:problem:{slug}", body
    assert body["status"] == status
    assert body["detail"]
    return body


@pytest.fixture
def api(api_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_server.url + "/v1",
        headers={"Authorization": f"Bearer {api_server.key_a}"},
        timeout=60,
    ) as client:
        yield client


@pytest.fixture
def other(api_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_server.url + "/v1",
        headers={"Authorization": f"Bearer {api_server.key_b}"},
        timeout=60,
    ) as client:
        yield client


@pytest.fixture
def sandbox(api: httpx.Client) -> Iterator[dict[str, Any]]:
    created = api.post("/sandboxes", json={"labels": {"corral.test": "1"}, "timeout": 300})
    assert created.status_code == 201, created.text
    yield created.json()
    api.delete(f"/sandboxes/{created.json()['id']}")


def run(api: httpx.Client, sandbox_id: str, argv: list[str], **body: Any) -> list[dict[str, Any]]:
    response = api.post(f"/sandboxes/{sandbox_id}/exec", json={"argv": argv, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def output(events: list[dict[str, Any]], stream: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == stream)


def test_health_ready_and_openapi(api_server: ApiServer) -> None:
    assert httpx.get(api_server.url + "/v1/health").json()["status"] == "ok"
    ready = httpx.get(api_server.url + "/v1/ready").json()
    assert ready["checks"] == {"reconcile": "ok", "store": "ok", "backend": "ok"}
    schema = httpx.get(api_server.url + "/openapi.json").json()
    for path in (
        "/v1/sandboxes",
        "/v1/sandboxes/{sandbox_id}",
        "/v1/sandboxes/{sandbox_id}/exec",
        "/v1/sandboxes/{sandbox_id}/files",
        "/v1/sandboxes/{sandbox_id}/archive",
        "/v1/sandboxes/{sandbox_id}/timeout",
        "/v1/templates",
    ):
        assert path in schema["paths"], path


def test_keys_are_required_and_checked(api_server: ApiServer) -> None:
    url = api_server.url + "/v1/sandboxes"
    missing = problem(httpx.get(url), 401, "unauthenticated")
    assert "corral keys create" in missing["hint"]
    problem(httpx.get(url, headers={"Authorization": "Bearer crl_nope"}), 401, "unauthenticated")
    forged = api_server.key_a[:-4] + "AAAA"
    problem(httpx.get(url, headers={"Authorization": f"Bearer {forged}"}), 401, "unauthenticated")
    spare = api_server.process.tenant("tenant-a")
    spare_headers = {"Authorization": f"Bearer {spare}"}
    assert httpx.get(url, headers=spare_headers).status_code == 200
    api_server.process.store.tenants.revoke_key(spare.split("_")[1])
    problem(httpx.get(url, headers=spare_headers), 401, "unauthenticated")


def test_create_get_list_delete(api: httpx.Client, api_server: ApiServer) -> None:
    body = {
        "labels": {"corral.test": "1", "job": "build"},
        "metadata": {"pr": 42},
        "memory": "256M",
    }
    created = api.post("/sandboxes", json=body)
    assert created.status_code == 201, created.text
    sandbox = created.json()
    assert (sandbox["state"], sandbox["tenant"], sandbox["runtime"]) == (
        "running",
        "tenant-a",
        "crun",
    )
    assert sandbox["limits"]["memory"] == 256 << 20
    assert sandbox["metadata"] == {"pr": 42}
    assert api.get(f"/sandboxes/{sandbox['id']}").json()["id"] == sandbox["id"]
    listed = api.get("/sandboxes", params={"label": "job=build", "state": "running"}).json()
    assert [s["id"] for s in listed] == [sandbox["id"]]
    assert api.get("/sandboxes", params={"label": "job=deploy"}).json() == []
    assert api.delete(f"/sandboxes/{sandbox['id']}").status_code == 204
    problem(api.get(f"/sandboxes/{sandbox['id']}"), 404, "not-found")
    problem(api.delete(f"/sandboxes/{sandbox['id']}"), 404, "not-found")


def test_exec_streams_output_as_it_is_produced(api: httpx.Client, sandbox: dict[str, Any]) -> None:
    script = "echo first; sleep 2; echo second >&2; printf '\\000\\377'; exit 3"
    started = time.monotonic()
    arrivals = []
    with api.stream(
        "POST", f"/sandboxes/{sandbox['id']}/exec", json={"argv": ["/bin/sh", "-c", script]}
    ) as response:
        events = []
        for line in response.iter_lines():
            events.append(json.loads(line))
            arrivals.append(time.monotonic() - started)
    assert arrivals[0] < 1.5, "the first line must arrive before the command ends"
    assert output(events) == b"first\n\x00\xff"
    assert output(events, "stderr") == b"second\n"
    assert events[-1]["type"] == "exit"
    assert events[-1]["exit_code"] == 3


def test_exec_stdin_env_cwd_and_timeout(api: httpx.Client, sandbox: dict[str, Any]) -> None:
    events = run(
        api,
        sandbox["id"],
        ["/bin/sh", "-c", 'cat; echo "$GREETING"; pwd'],
        stdin=base64.b64encode(b"from stdin\n").decode(),
        env={"GREETING": "hi"},
        cwd="/tmp",
    )
    assert output(events) == b"from stdin\nhi\n/tmp\n"
    timed = run(api, sandbox["id"], ["sleep", "30"], timeout=0.5)[-1]
    assert (timed["exit_code"], timed["timed_out"]) == (124, True)
    assert run(api, sandbox["id"], ["no-such-command"])[-1]["exit_code"] == 127
    problem(
        api.post(f"/sandboxes/{sandbox['id']}/exec", json={"argv": ["true"], "stdin": "@@"}),
        400,
        "bad-request",
    )


def test_client_going_away_kills_the_command(api: httpx.Client, sandbox: dict[str, Any]) -> None:
    loop = "echo started; while true; do date +%s%N > /tmp/alive; sleep 0.1; done"
    with api.stream(
        "POST", f"/sandboxes/{sandbox['id']}/exec", json={"argv": ["/bin/sh", "-c", loop]}
    ) as response:
        first = json.loads(next(response.iter_lines()))
        assert base64.b64decode(first["data"]) == b"started\n"
    time.sleep(1.0)
    read = ["cat", "/tmp/alive"]
    before = output(run(api, sandbox["id"], read))
    time.sleep(0.5)
    assert output(run(api, sandbox["id"], read)) == before, "the command kept running"


def test_websocket_exec_with_stdin(api_server: ApiServer, sandbox: dict[str, Any]) -> None:
    url = api_server.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox['id']}/exec/ws"
    headers = {"Authorization": f"Bearer {api_server.key_a}"}
    with connect(url, additional_headers=headers) as ws:
        ws.send(json.dumps({"argv": ["/bin/sh", "-c", "while read line; do echo got:$line; done"]}))
        ws.send(b"one\n")
        first = json.loads(ws.recv(timeout=10))
        assert base64.b64decode(first["data"]) == b"got:one\n"  # answered before stdin closed
        ws.send(b"two\n")
        ws.send(json.dumps({"type": "eof"}))
        events = [first]
        while events[-1]["type"] != "exit":
            events.append(json.loads(ws.recv(timeout=10)))
    assert output(events) == b"got:one\ngot:two\n"
    assert events[-1]["exit_code"] == 0
    with connect(url.replace(sandbox["id"], "sb-missing"), additional_headers=headers) as ws:
        ws.send(json.dumps({"argv": ["true"]}))
        assert json.loads(ws.recv(timeout=10))["type"] == "urn:corral:problem:not-found"
    with connect(url) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "urn:corral:problem:unauthenticated"


def test_files_and_archives(api: httpx.Client, sandbox: dict[str, Any]) -> None:
    files = f"/sandboxes/{sandbox['id']}/files"
    assert (
        api.put(files, params={"path": "/work/a.bin"}, content=b"\x00\x01data").status_code == 204
    )
    assert api.get(files, params={"path": "/work/a.bin"}).content == b"\x00\x01data"
    problem(api.get(files, params={"path": "/work/missing"}), 404, "not-found")
    problem(api.get(files, params={"path": "relative"}), 422, "validation")
    too_big = api.put(files, params={"path": "/work/big"}, content=b"x" * (2 << 20))
    problem(too_big, 413, "file-too-large")
    problem(api.get(files, params={"path": "/work/big"}), 404, "not-found")

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("src/main.rs", b"fn main() {}\n"), ("README", b"hello\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = f"/sandboxes/{sandbox['id']}/archive"
    assert (
        api.put(archive, params={"path": "/work/proj"}, content=buffer.getvalue()).status_code
        == 204
    )
    assert api.get(files, params={"path": "/work/proj/src/main.rs"}).content == b"fn main() {}\n"
    got = api.get(archive, params={"path": "/work/proj"})
    assert got.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
    assert names == {"src/main.rs", "README"}
    problem(api.get(archive, params={"path": "/work/nope"}), 404, "not-found")
    problem(api.put(archive, params={"path": "/work/x"}, content=b"not a tar"), 400, "bad-request")
    problem(
        api.put(archive, params={"path": "/proc/x"}, content=buffer.getvalue()), 400, "bad-request"
    )


def test_labels_metadata_and_timeout(api: httpx.Client, sandbox: dict[str, Any]) -> None:
    path = f"/sandboxes/{sandbox['id']}"
    patched = api.patch(
        path, json={"labels": {"team": "ml", "corral.test": None}, "metadata": {"x": [1]}}
    )
    assert patched.json()["labels"] == {"team": "ml"}
    assert patched.json()["metadata"] == {"x": [1]}
    extended = api.put(path + "/timeout", json={"seconds": 3600}).json()
    assert extended["expires_at"] > time.time() + 3500


def test_reaper_destroys_expired_sandboxes(api: httpx.Client) -> None:
    created = api.post("/sandboxes", json={"labels": {"corral.test": "1"}, "timeout": 300}).json()
    api.put(f"/sandboxes/{created['id']}/timeout", json={"seconds": 0.5})
    deadline = time.monotonic() + 15
    while api.get(f"/sandboxes/{created['id']}").status_code != 404:
        assert time.monotonic() < deadline, "the reaper did not destroy the expired sandbox"
        time.sleep(0.2)


def test_tenants_cannot_reach_each_others_sandboxes(
    api: httpx.Client, other: httpx.Client, sandbox: dict[str, Any], api_server: ApiServer
) -> None:
    sid = sandbox["id"]
    assert sid not in [s["id"] for s in other.get("/sandboxes").json()]
    attempts = [
        other.get(f"/sandboxes/{sid}"),
        other.post(f"/sandboxes/{sid}/exec", json={"argv": ["true"]}),
        other.put(f"/sandboxes/{sid}/files", params={"path": "/work/x"}, content=b"x"),
        other.get(f"/sandboxes/{sid}/files", params={"path": "/etc/hostname"}),
        other.get(f"/sandboxes/{sid}/archive", params={"path": "/work"}),
        other.patch(f"/sandboxes/{sid}", json={"labels": {"x": "y"}}),
        other.put(f"/sandboxes/{sid}/timeout", json={"seconds": 1}),
        other.get(f"/sandboxes/{sid}/stats"),
        other.post(f"/sandboxes/{sid}/pause"),
        other.delete(f"/sandboxes/{sid}"),
    ]
    for response in attempts:
        problem(response, 404, "not-found")  # 404, not 403: ids do not leak
    problem(other.get("/sandboxes", params={"tenant": "tenant-a"}), 403, "forbidden")
    problem(other.get("/tenants"), 403, "forbidden")
    # B's name space is its own: the same name is free for B.
    assert api.get(f"/sandboxes/{sid}").json()["labels"] == {"corral.test": "1"}
    admin = {"Authorization": f"Bearer {api_server.admin_key}"}
    everyone = httpx.get(api_server.url + "/v1/sandboxes", headers=admin).json()
    assert sid in [s["id"] for s in everyone]
    only_b = httpx.get(
        api_server.url + "/v1/sandboxes", params={"tenant": "tenant-b"}, headers=admin
    )
    assert sid not in [s["id"] for s in only_b.json()]


def test_quotas_and_names(api_server: ApiServer) -> None:
    key = api_server.process.tenant("small", Quota(max_sandboxes=1, max_memory=300 << 20))
    with httpx.Client(
        base_url=api_server.url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as small:
        over_memory = small.post("/sandboxes", json={"memory": "512M"})
        assert "MiB of memory" in problem(over_memory, 429, "quota-exceeded")["detail"]
        first = small.post("/sandboxes", json={"memory": "256M", "name": "svc"})
        assert first.status_code == 201, first.text
        problem(small.post("/sandboxes", json={"memory": "64M"}), 429, "quota-exceeded")
        me = small.get("/tenants/me").json()
        assert me["usage"] == {"sandboxes": 1, "vcpus": 1.0, "memory": 256 << 20}
        assert small.get("/sandboxes/svc").json()["id"] == first.json()["id"]  # by name
        small.delete(f"/sandboxes/{first.json()['id']}")
        again = small.post("/sandboxes", json={"memory": "64M", "name": "svc"})
        assert again.status_code == 201
        api_server.process.store.tenants.set_quota("small", Quota())
        problem(small.post("/sandboxes", json={"name": "svc"}), 409, "conflict")
        small.delete(f"/sandboxes/{again.json()['id']}")


def test_bad_requests_get_clear_problems(api: httpx.Client) -> None:
    problem(api.post("/sandboxes", json={"template": "nope"}), 404, "not-found")
    problem(api.post("/sandboxes", json={"memory": "lots"}), 400, "bad-request")
    problem(api.post("/sandboxes", json={"cpus": -1}), 422, "validation")
    problem(api.post("/sandboxes", json={"unknown": 1}), 422, "validation")
    spec = {"name": "t", "mounts": [{"source": "/etc", "target": "/host-etc"}]}
    problem(api.post("/sandboxes", json={"template_spec": spec}), 403, "forbidden")
    bad = problem(
        api.post("/sandboxes", json={"template_spec": {"name": "t", "kind": "x"}}),
        422,
        "template-invalid",
    )
    assert bad["field"] == "kind"
    problem(api.get("/no/such/route"), 404, "not-found")
    names = {t["name"] for t in api.get("/templates").json()}
    assert {"default", "rust"} <= names


def test_quota_holds_under_concurrent_creates(api_server: ApiServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    key = api_server.process.tenant("burst", Quota(max_sandboxes=3))
    headers = {"Authorization": f"Bearer {key}"}

    def create(_: int) -> httpx.Response:
        return httpx.post(api_server.url + "/v1/sandboxes", json={}, headers=headers, timeout=60)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(create, range(10)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * 3 + [429] * 7, [r.text for r in responses]
    for response in responses:
        if response.status_code == 201:
            sandbox_id = response.json()["id"]
            httpx.delete(f"{api_server.url}/v1/sandboxes/{sandbox_id}", headers=headers)

"""Warm pools against a real `corral serve` (oci backend, crun): the API, the SDK, the
CLI through a context; tenants kept apart; deleting a pool releases its members."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.client import Corral
from corral.errors import NotFoundError
from tests.conftest import ApiServer

pytestmark = pytest.mark.runtime


@pytest.fixture
def api(api_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_server.url + "/v1",
        headers={"Authorization": f"Bearer {api_server.key_a}"},
        timeout=60,
    ) as client:
        yield client


def wait_ready(api: httpx.Client, name: str, idle: int, deadline: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + deadline
    while True:
        info: dict[str, Any] = api.get(f"/pools/{name}").json()
        if info["idle"] == idle and info["starting"] == 0:
            return info
        assert time.monotonic() < end, info
        time.sleep(0.05)


@pytest.fixture
def pool(api: httpx.Client) -> Iterator[str]:
    created = api.post(
        "/pools", json={"name": "warm", "size": 2, "memory": "128M", "labels": {"corral.test": "1"}}
    )
    assert created.status_code == 201, created.text
    assert created.json()["size"] == 2
    wait_ready(api, "warm", 2)
    yield "warm"
    api.delete("/pools/warm")
    for sandbox in api.get("/sandboxes", params={"label": "corral.test=1"}).json():
        api.delete(f"/sandboxes/{sandbox['id']}")


def test_claim_over_the_api_and_refill(api: httpx.Client, pool: str) -> None:
    members = {s["id"] for s in api.get("/sandboxes").json() if s["pool"] == pool}
    assert len(members) == 2
    idle_id = next(iter(members))
    refused = api.post(f"/sandboxes/{idle_id}/exec", json={"argv": ["true"]})
    assert refused.status_code == 409, "an idle member is not usable before its claim"
    claimed = api.post(f"/pools/{pool}/claim", json={"timeout": 120, "labels": {"job": "a"}})
    assert claimed.status_code == 201, claimed.text
    body = claimed.json()
    assert body["from_pool"] is True
    assert body["sandbox"]["id"] in members
    assert body["sandbox"]["pool"] is None
    assert body["sandbox"]["labels"] == {"corral.test": "1", "job": "a"}
    assert body["sandbox"]["limits"]["memory"] == 128 << 20
    assert body["sandbox"]["expires_at"] - time.time() <= 120
    ran = api.post(f"/sandboxes/{body['sandbox']['id']}/exec", json={"argv": ["echo", "hi"]})
    lines = [json.loads(line) for line in ran.text.splitlines()]
    assert lines[-1]["exit_code"] == 0
    assert lines[0]["type"] == "stdout"
    # The pool replaces the member it handed out.
    wait_ready(api, pool, 2)
    now = {s["id"] for s in api.get("/sandboxes").json() if s["pool"] == pool}
    assert body["sandbox"]["id"] not in now


def test_empty_pool_falls_back_to_cold_create(api: httpx.Client, pool: str) -> None:
    assert api.patch(f"/pools/{pool}", json={"size": 0}).json()["size"] == 0
    wait_ready(api, pool, 0)
    claimed = api.post(f"/pools/{pool}/claim", json={"name": "cold-one"})
    assert claimed.status_code == 201, claimed.text
    assert claimed.json()["from_pool"] is False
    assert claimed.json()["sandbox"]["name"] == "cold-one"
    assert claimed.json()["sandbox"]["labels"] == {"corral.test": "1"}


def test_pools_are_the_tenants_own(api_server: ApiServer, api: httpx.Client, pool: str) -> None:
    with httpx.Client(
        base_url=api_server.url + "/v1",
        headers={"Authorization": f"Bearer {api_server.key_b}"},
        timeout=60,
    ) as other:
        assert other.get("/pools").json() == []
        assert other.get(f"/pools/{pool}").status_code == 404
        assert other.post(f"/pools/{pool}/claim", json={}).status_code == 404
        assert other.delete(f"/pools/{pool}").status_code == 404
    assert api.get(f"/pools/{pool}").status_code == 200
    assert api.post("/pools", json={"name": pool, "size": 1}).status_code == 409


def test_delete_releases_idle_members(api: httpx.Client, pool: str) -> None:
    claimed = api.post(f"/pools/{pool}/claim", json={}).json()["sandbox"]["id"]
    wait_ready(api, pool, 2)
    idle = {s["id"] for s in api.get("/sandboxes").json() if s["pool"] == pool}
    removed = api.delete(f"/pools/{pool}")
    assert removed.status_code == 200
    assert set(removed.json()["destroyed"]) == idle
    left = {s["id"] for s in api.get("/sandboxes").json()}
    assert claimed in left
    assert not idle & left
    assert api.get(f"/pools/{pool}").status_code == 404


def test_metrics_count_claims_and_sizes(
    api_server: ApiServer, api: httpx.Client, pool: str
) -> None:
    api.post(f"/pools/{pool}/claim", json={})
    text = httpx.get(
        api_server.url + "/metrics", headers={"Authorization": f"Bearer {api_server.admin_key}"}
    ).text
    assert 'corral_pool_target_size{pool="warm",template="default",tenant="tenant-a"} 2.0' in text
    assert 'corral_pool_claims_total{pool="warm",result="hit",tenant="tenant-a"}' in text
    assert "corral_pool_claim_seconds_bucket" in text
    denied = httpx.get(
        api_server.url + "/metrics", headers={"Authorization": f"Bearer {api_server.key_a}"}
    )
    assert denied.status_code == 403


def test_sdk_claim(api_server: ApiServer, pool: str) -> None:
    with Corral(api_server.url, api_server.key_a) as c:
        assert [p.name for p in c.pools()] == [pool]
        with c.sandbox(from_pool=pool, labels={"job": "sdk"}) as sb:
            assert sb.from_pool is True
            assert sb.exec(["echo", "pooled"]).stdout == b"pooled\n"
            assert sb.info.labels["job"] == "sdk"
        with pytest.raises(NotFoundError):
            c.claim("no-such-pool")
        with pytest.raises(Exception, match="pool fixes"):
            c.sandbox(from_pool=pool, memory="1G")


CORRAL = [sys.executable, "-m", "corral.cli"]


@pytest.fixture
def cli(tmp_path: Path, state_root: Path) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = {
            **os.environ,
            "CORRAL_CONTEXTS": str(tmp_path / "contexts.json"),
            "CORRAL_STATE_DIR": str(state_root),
            "CORRAL_CLI_SERVER": "0",
            "CORRAL_RUNTIME": "",
        }
        env.pop("CORRAL_CONTEXT", None)
        env.pop("CORRAL_API_KEY", None)
        return subprocess.run(
            [*CORRAL, *args], capture_output=True, env=env, timeout=120, check=False
        )

    return run


@pytest.mark.parametrize("where", ["local", "remote"])
def test_cli_pool_add_ls_create_run_rm(
    cli: Callable[..., subprocess.CompletedProcess[bytes]], api_server: ApiServer, where: str
) -> None:
    context: list[str] = []
    if where == "remote":
        cli("context", "add", "prod", api_server.url, "--token", api_server.key_a)
        context = ["--context", "prod"]
    added = cli(*context, "pool", "add", "clip", "--size", "1", "--label", "corral.test=1")
    assert added.returncode == 0, added.stderr
    try:
        deadline = time.monotonic() + 30
        while True:
            (info,) = json.loads(cli(*context, "pool", "ls", "--json").stdout)
            if info["idle"] == 1:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["name"] == "clip"
        assert info["size"] == 1
        run = cli(*context, "run", "--from-pool", "clip", "--", "echo", "from-pool")
        assert run.returncode == 0, run.stderr
        assert run.stdout == b"from-pool\n"
        assert b"created one cold" not in run.stderr
        made = cli(*context, "create", "--from-pool", "clip", "--json", "--timeout", "60")
        assert made.returncode == 0, made.stderr
        sandbox = json.loads(made.stdout)
        assert sandbox["pool"] is None
        assert cli(*context, "rm", sandbox["id"]).returncode == 0
        bad = cli(*context, "create", "--from-pool", "clip", "--memory", "1G")
        assert bad.returncode == 1
        assert b"a pool fixes these" in bad.stderr
    finally:
        assert cli(*context, "pool", "rm", "clip").returncode == 0
    assert json.loads(cli(*context, "pool", "ls", "--json").stdout) == []
    assert json.loads(cli(*context, "ls", "--json").stdout) == []

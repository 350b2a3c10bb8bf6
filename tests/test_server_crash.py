"""Kill -9 of the server in the middle of 50 concurrent operations (or of one-request
runs) loses no record and leaks nothing: after a restart (reconcile) every sandbox
is accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from corral.backends.oci import OciBackend
from tests.conftest import _sandbox_inits, assert_no_leaks, require_root, traversable_dir
from tests.server_harness import ServerProcess

pytestmark = pytest.mark.runtime


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    require_root()
    root = traversable_dir("crash")
    inits_before = _sandbox_inits()
    process = ServerProcess(root)
    try:
        yield process
    finally:
        process.stop()
        process.close()
        try:
            assert_no_leaks(root, inits_before)
        finally:
            # A failed test may leave sandboxes: reported above, released here so
            # the host stays clean for what runs next.
            backend = OciBackend(root)
            for sandbox_id in asyncio.run(backend.list_sandboxes()):
                asyncio.run(backend.destroy(sandbox_id))
            shutil.rmtree(root, ignore_errors=True)


def test_kill9_during_50_operations_loses_nothing(server: ServerProcess) -> None:
    key = server.tenant("crash")
    headers = {"Authorization": f"Bearer {key}"}
    server.start()
    api = httpx.Client(base_url=server.url + "/v1", headers=headers, timeout=30)
    existing = [api.post("/sandboxes", json={"timeout": 600}).json()["id"] for _ in range(20)]
    to_delete, to_exec = existing[:10], existing[10:]

    outcome: dict[str, list[str]] = {"created": [], "deleted": [], "unknown_create": []}
    lock = threading.Lock()
    go = threading.Event()

    def create() -> None:
        go.wait()
        try:
            response = httpx.post(
                server.url + "/v1/sandboxes", json={}, headers=headers, timeout=30
            )
        except httpx.TransportError:
            with lock:
                outcome["unknown_create"].append("?")
            return
        assert response.status_code == 201, response.text
        with lock:
            outcome["created"].append(response.json()["id"])

    def delete(sandbox_id: str) -> None:
        go.wait()
        try:
            response = httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", headers=headers)
        except httpx.TransportError:
            return
        assert response.status_code == 204, response.text
        with lock:
            outcome["deleted"].append(sandbox_id)

    def run(sandbox_id: str) -> None:
        go.wait()
        body = {"argv": ["/bin/sh", "-c", "sleep 0.3; echo done"]}
        with contextlib.suppress(httpx.TransportError):
            httpx.post(f"{server.url}/v1/sandboxes/{sandbox_id}/exec", json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(create) for _ in range(25)]
        futures += [pool.submit(delete, s) for s in to_delete]
        futures += [pool.submit(run, s) for s in to_exec for _ in range(3)][:15]
        assert len(futures) == 50
        go.set()
        deadline = time.monotonic() + 30
        while len(outcome["created"]) + len(outcome["deleted"]) < 6:  # some done, many in flight
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.005)
        server.kill9()
        for future in futures:
            future.result()  # a failed assertion in a worker fails the test

    server.start()  # reconcile runs before /v1/ready answers
    store = server.store
    records = {r.id: r for r in store.list()}
    backend_ids = set(asyncio.run(OciBackend(server.state_dir).list_sandboxes()))
    # Nothing half-done survives reconcile, and store and backend agree exactly.
    assert {r.state for r in records.values()} <= {"running"}, records
    assert set(records) == backend_ids
    # Every confirmed create is there; every confirmed delete is gone.
    assert set(outcome["created"]) <= set(records)
    assert not set(outcome["deleted"]) & set(records)
    # The rest are accounted for: each untouched or unconfirmed sandbox either still
    # runs or was removed whole; nothing appeared from nowhere.
    # The kill really landed mid-way: some operations finished, some did not.
    print("outcome:", {k: len(v) for k, v in outcome.items()}, "survivors:", len(records))
    assert outcome["unknown_create"] or len(outcome["deleted"]) < len(to_delete)
    assert outcome["created"] or outcome["deleted"]
    allowed = set(existing) | set(outcome["created"])
    unconfirmed_creates = len(outcome["unknown_create"])
    strays = set(records) - allowed
    assert len(strays) <= unconfirmed_creates, strays
    for sandbox_id in to_exec:
        assert sandbox_id in records  # execs never lose a sandbox
    # Every survivor still works, then everything is released.
    for sandbox_id in records:
        events = api.post(f"/sandboxes/{sandbox_id}/exec", json={"argv": ["echo", "ok"]})
        assert events.status_code == 200
        assert events.text.splitlines()[-1].startswith('{"type":"exit"')
        assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204
    api.close()
    server.stop()


def test_restart_adopts_running_and_reaps_what_expired_meanwhile(server: ServerProcess) -> None:
    key = server.tenant("restart")
    server.start()
    api = httpx.Client(
        base_url=server.url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    keep = api.post("/sandboxes", json={"timeout": 600}).json()["id"]
    short = api.post("/sandboxes", json={"timeout": 600}).json()["id"]
    api.put(f"/sandboxes/{short}/timeout", json={"seconds": 2})
    api.put(f"/sandboxes/{keep}/files", params={"path": "/work/state"}, content=b"kept")
    server.stop()
    time.sleep(2.5)  # `short` expires while no server runs
    server.start()
    api2 = httpx.Client(
        base_url=server.url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert api2.get(f"/sandboxes/{keep}/files", params={"path": "/work/state"}).content == b"kept"
    deadline = time.monotonic() + 10
    while api2.get(f"/sandboxes/{short}").status_code != 404:
        assert time.monotonic() < deadline, "expired sandbox not reaped after restart"
        time.sleep(0.2)
    assert api2.delete(f"/sandboxes/{keep}").status_code == 204
    api.close()
    api2.close()


def test_kill9_during_runs_leaves_nothing_once_their_timeouts_pass(server: ServerProcess) -> None:
    """A one-request run whose server dies mid-way: its sandbox is adopted at restart
    and reaped when its own timeout passes (a run gives it the command's timeout plus
    a margin; here the request sets a short one)."""
    key = server.tenant("runs")
    headers = {"Authorization": f"Bearer {key}"}
    server.start()
    body = {"argv": ["sh", "-c", "echo started; sleep 60"], "sandbox": {"timeout": 8}}

    def run() -> None:
        with contextlib.suppress(httpx.TransportError):
            httpx.post(server.url + "/v1/run", json=body, headers=headers, timeout=60)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len([r for r in server.store.list() if r.state == "running"]) < 4:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    server.kill9()
    for thread in threads:
        thread.join(10)
    server.start()
    backend = OciBackend(server.state_dir)
    records = server.store.list()
    assert [r.state for r in records] == ["running"] * 4  # adopted, still within 8 s
    assert {r.id for r in records} == set(asyncio.run(backend.list_sandboxes()))
    deadline = time.monotonic() + 20
    while server.store.list() or len(asyncio.run(backend.list_sandboxes())) > 0:
        assert time.monotonic() < deadline, "interrupted runs' sandboxes not reaped"
        time.sleep(0.2)

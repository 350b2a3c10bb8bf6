"""`corral serve --db postgresql://...`: the same API over a real PostgreSQL store."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import pytest

from tests.conftest import _sandbox_inits, assert_no_leaks, require_root, traversable_dir
from tests.postgres_harness import PostgresServer
from tests.server_harness import ServerProcess

pytestmark = pytest.mark.runtime


def test_server_on_postgresql(postgres: PostgresServer) -> None:
    require_root()
    root = traversable_dir("pgserver")
    inits_before = _sandbox_inits()
    server = ServerProcess(root, database_url=postgres.create_database("serve"))
    try:
        key = server.tenant("pg")
        server.start()
        with httpx.Client(
            base_url=server.url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as api:
            created = api.post("/sandboxes", json={"labels": {"db": "pg"}})
            assert created.status_code == 201, created.text
            sandbox_id = created.json()["id"]
            assert not (root / "corral.db").exists()  # the records live in PostgreSQL
            assert [r.id for r in server.store.list(tenant="pg")] == [sandbox_id]
            ran = api.post(f"/sandboxes/{sandbox_id}/exec", json={"argv": ["echo", "pg"]})
            events = [json.loads(line) for line in ran.text.splitlines()]
            assert base64.b64decode(events[0]["data"]) == b"pg\n"
            assert (events[-1]["type"], events[-1]["exit_code"]) == ("exit", 0)
            assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204
            assert server.store.list() == []
    finally:
        server.close()
        assert_no_leaks(root, inits_before)
        shutil.rmtree(root, ignore_errors=True)

"""Property-based testing of the whole API from its OpenAPI schema (schemathesis):
whatever a client sends, the server answers with no 5xx, within a deadline, with
responses that match the schema it publishes.

The server runs the control plane over the fake backend: what is under test here
is the API's handling of input, not a runtime (the real backends have their own
suites and the end-to-end API tests in test_server.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from corral.store import Quota
from tests.conftest import traversable_dir
from tests.server_harness import ServerProcess

CONFIG = """
[server]
max_exec_seconds = 2
max_upload_bytes = 65536
allowed_bases = ["host", "busybox"]
"""


@schemathesis.serializer("application/x-tar")
def tar_bytes(_ctx: Any, value: Any) -> bytes:
    """Generated tar bodies go out as the raw bytes they are (mostly not valid tar)."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    root = traversable_dir("fuzz")
    process = ServerProcess(root, backend="fake", config=CONFIG)
    process.start()
    try:
        yield process
    finally:
        process.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fuzz_headers(fuzz_server: ServerProcess) -> dict[str, str]:
    key = fuzz_server.tenant("fuzz", Quota(max_sandboxes=8))
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def clean(url: str, headers: dict[str, str]) -> None:
    for pool in httpx.get(f"{url}/v1/pools", headers=headers, timeout=20).json():
        httpx.delete(f"{url}/v1/pools/{pool['name']}", headers=headers, timeout=20)
    for sandbox in httpx.get(f"{url}/v1/sandboxes", headers=headers, timeout=20).json():
        httpx.delete(f"{url}/v1/sandboxes/{sandbox['id']}", headers=headers, timeout=20)


def test_no_5xx_no_hangs_and_answers_match_the_schema(
    api_schema: Any, fuzz_server: ServerProcess, fuzz_headers: dict[str, str]
) -> None:
    # Driven by hand (not schemathesis's pytest plugin, which does not support this
    # pytest): one Hypothesis run per operation, failures collected across all.
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        # Half the cases aim at a real sandbox, so handlers past the lookup run too.
        created = httpx.post(
            fuzz_server.url + "/v1/sandboxes", json={}, headers=fuzz_headers, timeout=20
        )
        assert created.status_code == 201, (operation.label, created.text)
        real = created.json()["id"]

        @given(case=operation.as_strategy(), aim_at_real=st.booleans())
        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any, aim_at_real: bool) -> None:
            if aim_at_real and "sandbox_id" in (case.path_parameters or {}):
                case.path_parameters["sandbox_id"] = real  # noqa: B023 - check() runs in this loop pass
            response = case.call(headers=fuzz_headers, timeout=20)  # a hang fails here
            statuses.setdefault(operation.label, set()).add(response.status_code)  # noqa: B023
            case.validate_response(
                response,
                checks=(
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ),
            )

        try:
            check()
        except Exception as error:
            failures.append(f"{operation.label}: {error}"[:3000])
        # Whatever this operation's run made (sandboxes, pets, pools and their
        # members) goes now, so the next one starts under its quota.
        clean(fuzz_server.url, fuzz_headers)
    assert not failures, "\n\n".join(failures)
    # The runs reached the handlers' success paths, not only their refusals.
    succeeded = {label for label, codes in statuses.items() if any(c < 300 for c in codes)}
    for label in (
        "POST /v1/sandboxes",
        "POST /v1/sandboxes/{sandbox_id}/exec",
        "PUT /v1/sandboxes/{sandbox_id}/files",
        "PATCH /v1/sandboxes/{sandbox_id}",
        "DELETE /v1/sandboxes/{sandbox_id}",
        "POST /v1/run",
    ):
        assert label in succeeded, (label, statuses.get(label))

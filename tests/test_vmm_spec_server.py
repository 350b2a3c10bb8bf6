"""The stand-in VMMs themselves: spec checking, the modelled state rules, the real process.

The driver tests lean on the stand-ins, so these tests pin what the stand-ins
accept and refuse: paths and methods outside the spec, bodies against the
spec's schemas, and each VMM's state rules (tests/vmm/models.py cites where
each rule comes from). Most tests call the server's `answer()` in-process;
the last ones run it as the VMM process, over its unix socket.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.vmm.harness import PROJECT_ROOT, read_record, standin_pids
from tests.vmm.models import LOAD_NOT_ALLOWED, NOT_AFTER_BOOT, NOT_BEFORE_BOOT
from tests.vmm.openapi import cloud_hypervisor_spec, firecracker_spec
from tests.vmm.spec_server import SpecServer, build


@pytest.fixture(autouse=True, scope="module")
def no_vmm_left_behind() -> Iterator[None]:
    """After the module, no stand-in VMM process is left running."""
    before = standin_pids()
    yield
    assert standin_pids() - before == set()


@pytest.fixture
def files() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="spec-", dir="/tmp"))
    for name in ("vmlinux", "rootfs", "overlay"):
        (root / name).write_bytes(b"\0")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def call(
    server: SpecServer, method: str, path: str, body: Any = None
) -> tuple[int, Any, dict[str, Any]]:
    raw = b"" if body is None else json.dumps(body).encode()
    reply, entry = server.answer(method, path, raw)
    return reply.status, (reply.body if reply.text is None else reply.text), entry


def ok(server: SpecServer, method: str, path: str, body: Any = None) -> Any:
    status, reply, entry = call(server, method, path, body)
    assert status < 300, (method, path, status, reply)
    assert entry["documented"]
    assert entry["response_errors"] == []
    return reply


# -- the specs ------------------------------------------------------------------------


def test_the_pinned_spec_versions_are_loaded() -> None:
    assert firecracker_spec().version == "1.17.0-dev"
    assert cloud_hypervisor_spec().version == "0.3.0"


def test_every_call_the_drivers_make_is_in_the_specs() -> None:
    fc = firecracker_spec()
    for method, path in [
        ("GET", "/"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/machine-config"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/vsock"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
    ]:
        fc.match(method, path)
    ch = cloud_hypervisor_spec()
    for action in [
        "vm.create",
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.snapshot",
        "vm.restore",
        "vm.resize",
        "vm.add-disk",
        "vm.shutdown",
        "vm.delete",
        "vmm.shutdown",
    ]:
        ch.match("PUT", f"/api/v1/{action}")
    ch.match("GET", "/api/v1/vm.info")
    ch.match("GET", "/api/v1/vmm.ping")


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("GET", "/nope", None, "/nope is not a path in firecracker.yaml"),
        ("DELETE", "/vm", None, "DELETE is not an operation on /vm"),
        ("PUT", "/drives/x", None, "a request body is required"),
        ("PUT", "/drives/x", {"drive_id": "x"}, "'is_root_device' is a required property"),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 1}, "33 is greater than"),
        ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 1}, "'2' is not of type"),
        ("PATCH", "/vm", {"state": "Stopped"}, "'Stopped' is not one of ['Paused', 'Resumed']"),
        ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "v"}, "2 is less than the minimum of 3"),
        # Unknown fields are refused (Firecracker parses with deny_unknown_fields).
        (
            "PUT",
            "/boot-source",
            {"kernel_image_path": "k", "kernel": "k"},
            "'kernel' was unexpected",
        ),
        # $refs are followed: TokenBucket inside RateLimiter inside Drive.
        (
            "PUT",
            "/drives/x",
            {"drive_id": "x", "is_root_device": False, "rate_limiter": {"ops": {"size": 1}}},
            "rate_limiter/ops: 'refill_time' is a required property",
        ),
    ],
)
def test_firecracker_requests_outside_the_spec_are_refused(
    files: Path, method: str, path: str, body: Any, error: str
) -> None:
    server = build("firecracker", record=None)
    status, reply, entry = call(server, method, path, body)
    assert status == 400
    assert "fault_message" in reply
    assert any(error in e for e in entry["spec_errors"]), entry["spec_errors"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("PUT", "/api/v1/vm.nope", None, 404, "is not a path"),
        ("GET", "/vm.boot", None, 404, "is not a path"),  # outside the server's base path
        ("GET", "/api/v1/vm.boot", None, 400, "GET is not an operation"),
        ("PUT", "/api/v1/vm.create", {}, 400, "'payload' is a required property"),
        ("PUT", "/api/v1/vm.boot", {"now": True}, 400, "takes no request body"),
        (
            "PUT",
            "/api/v1/vm.create",
            {"payload": {}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}},
            400,
            "0 is less than the minimum of 1",
        ),
        (
            "PUT",
            "/api/v1/vm.add-disk",
            {"path": "d", "pci_device_id": 256},
            400,
            "256 is not a 'uint8'",
        ),
        ("PUT", "/api/v1/vm.restore", {"source": "file:///x"}, 400, "'source' was unexpected"),
    ],
)
def test_cloud_hypervisor_requests_outside_the_spec_are_refused(
    method: str, path: str, body: Any, status: int, error: str
) -> None:
    server = build("cloud-hypervisor", record=None)
    got, _, entry = call(server, method, path, body)
    assert got == status
    assert any(error in e for e in entry["spec_errors"]), entry["spec_errors"]


# -- Firecracker's states ---------------------------------------------------------------


def _configured_fc(files: Path) -> SpecServer:
    server = build("firecracker", record=None)
    ok(server, "PUT", "/boot-source", {"kernel_image_path": str(files / "vmlinux")})
    drive = {"drive_id": "rootfs", "path_on_host": str(files / "rootfs")}
    ok(server, "PUT", "/drives/rootfs", {**drive, "is_root_device": True, "is_read_only": True})
    return server


def _state(server: SpecServer) -> str:
    return str(ok(server, "GET", "/")["state"])


def test_firecracker_preboot_config_is_refused_after_instance_start(files: Path) -> None:
    server = _configured_fc(files)
    assert _state(server) == "Not started"
    ok(server, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert _state(server) == "Running"
    for path, body in [
        ("/boot-source", {"kernel_image_path": str(files / "vmlinux")}),
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("/drives/x", {"drive_id": "x", "is_root_device": False, "path_on_host": "rootfs"}),
        ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(files / "v.sock")}),
        ("/actions", {"action_type": "InstanceStart"}),
        ("/snapshot/load", {"snapshot_path": "s", "mem_file_path": "m"}),
    ]:
        status, reply, entry = call(server, "PUT", path, body)
        assert (status, entry["documented"]) == (400, True), path
        assert reply["fault_message"] in (NOT_AFTER_BOOT, LOAD_NOT_ALLOWED), path


def test_firecracker_postboot_calls_are_refused_before_instance_start(files: Path) -> None:
    server = _configured_fc(files)
    for method, path, body in [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}),
        ("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "x"}),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ]:
        status, reply, _ = call(server, method, path, body)
        assert (status, reply["fault_message"]) == (400, NOT_BEFORE_BOOT), path


def test_firecracker_instance_start_needs_a_kernel() -> None:
    server = build("firecracker", record=None)
    status, reply, _ = call(server, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert (status, reply["fault_message"]) == (
        400,
        "Cannot start microvm without kernel configuration.",
    )


def test_firecracker_snapshots_only_while_paused_and_loads_only_when_fresh(files: Path) -> None:
    server = _configured_fc(files)
    ok(server, "PUT", "/actions", {"action_type": "InstanceStart"})
    create = {"snapshot_path": str(files / "vmstate"), "mem_file_path": str(files / "mem")}
    status, reply, _ = call(server, "PUT", "/snapshot/create", create)
    assert (status, reply["fault_message"]) == (
        400,
        "Cannot create a snapshot: the microVM is not paused.",
    )
    ok(server, "PATCH", "/vm", {"state": "Paused"})
    assert _state(server) == "Paused"
    ok(server, "PUT", "/snapshot/create", {**create, "snapshot_type": "Full"})
    ok(server, "PATCH", "/vm", {"state": "Resumed"})

    load = {"snapshot_path": str(files / "vmstate"), "mem_file_path": str(files / "mem")}
    # A VMM with anything but the logger and metrics configured refuses to load.
    busy = _configured_fc(files)
    status, reply, _ = call(busy, "PUT", "/snapshot/load", load)
    assert (status, reply["fault_message"]) == (400, LOAD_NOT_ALLOWED)
    # Exactly one of mem_file_path and mem_backend.
    fresh = build("firecracker", record=None)
    both = {**load, "mem_backend": {"backend_type": "File", "backend_path": str(files / "mem")}}
    assert call(fresh, "PUT", "/snapshot/load", both)[0] == 400
    assert call(fresh, "PUT", "/snapshot/load", {"snapshot_path": load["snapshot_path"]})[0] == 400
    ok(fresh, "PUT", "/logger", {"level": "Info"})
    ok(fresh, "PUT", "/snapshot/load", load)
    assert _state(fresh) == "Paused"  # loaded paused unless resume_vm
    assert ok(fresh, "GET", "/vm/config")["drives"][0]["drive_id"] == "rootfs"


def test_firecracker_load_fails_when_a_snapshotted_drive_is_gone(files: Path) -> None:
    server = _configured_fc(files)
    ok(server, "PUT", "/actions", {"action_type": "InstanceStart"})
    ok(server, "PATCH", "/vm", {"state": "Paused"})
    files_of = {"snapshot_path": str(files / "vmstate"), "mem_file_path": str(files / "mem")}
    ok(server, "PUT", "/snapshot/create", files_of)
    (files / "rootfs").unlink()
    status, reply, _ = call(build("firecracker", record=None), "PUT", "/snapshot/load", files_of)
    assert status == 400
    assert "block device" in reply["fault_message"]


def test_firecracker_drive_ids_must_match_the_path(files: Path) -> None:
    server = build("firecracker", record=None)
    body = {"drive_id": "b", "path_on_host": str(files / "rootfs"), "is_root_device": False}
    status, reply, _ = call(server, "PUT", "/drives/a", body)
    assert status == 400
    assert "does not match" in reply["fault_message"]


# -- Cloud Hypervisor's states -----------------------------------------------------------


def _ch_config(files: Path) -> dict[str, Any]:
    return {
        "payload": {"kernel": str(files / "vmlinux")},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
        "disks": [{"id": "rootfs", "path": str(files / "rootfs"), "readonly": True}],
    }


def test_cloud_hypervisor_state_machine_answers_with_the_spec_codes(files: Path) -> None:
    server = build("cloud-hypervisor", record=None)
    api = "/api/v1/"

    def status_of(action: str, body: Any = None, method: str = "PUT") -> tuple[int, bool]:
        got, _, entry = call(server, method, api + action, body)
        return got, entry["documented"]

    # No VM yet: 404 for everything that needs one (spec).
    for action in ("vm.boot", "vm.pause", "vm.resume", "vm.shutdown", "vm.snapshot"):
        body = {"destination_url": f"file://{files}"} if action == "vm.snapshot" else None
        assert status_of(action, body) == (404, True), action
    assert status_of("vm.info", method="GET") == (404, True)
    assert status_of("vm.resize", {"desired_vcpus": 2}) == (404, True)

    assert status_of("vm.create", _ch_config(files)) == (204, True)
    assert status_of("vm.create", _ch_config(files)) == (500, False)  # VmAlreadyCreated
    assert status_of("vm.pause") == (405, True)  # not booted
    assert status_of("vm.resume") == (404, True)  # "not booted yet"
    # Cold add before boot: 204; a duplicate id: 409.
    disk = {"id": "data", "path": str(files / "overlay")}
    assert status_of("vm.add-disk", disk) == (204, True)
    assert status_of("vm.add-disk", disk) == (409, True)

    assert status_of("vm.boot") == (204, True)
    assert ok(server, "GET", api + "vm.info")["state"] == "Running"
    assert status_of("vm.resume") == (405, True)  # not paused
    assert status_of("vm.snapshot", {"destination_url": f"file://{files}"}) == (500, False)
    assert status_of("vm.resize", {"desired_vcpus": 3}) == (500, False)  # above max_vcpus
    assert status_of("vm.resize", {"desired_vcpus": 2}) == (204, True)
    assert status_of("vm.pause") == (204, True)
    assert status_of("vm.snapshot", {"destination_url": f"file://{files}"}) == (204, True)
    assert status_of("vm.restore", {"source_url": f"file://{files}"}) == (404, True)
    assert status_of("vm.shutdown") == (204, True)
    assert ok(server, "GET", api + "vm.info")["state"] == "Shutdown"
    assert status_of("vm.delete") == (204, True)
    assert status_of("vm.info", method="GET") == (404, True)


def test_cloud_hypervisor_restores_paused_into_a_fresh_vmm(files: Path) -> None:
    source = build("cloud-hypervisor", record=None)
    ok(source, "PUT", "/api/v1/vm.create", _ch_config(files))
    ok(source, "PUT", "/api/v1/vm.boot")
    ok(source, "PUT", "/api/v1/vm.pause")
    snap = files / "snap"
    snap.mkdir()
    ok(source, "PUT", "/api/v1/vm.snapshot", {"destination_url": snap.as_uri()})

    fresh = build("cloud-hypervisor", record=None)
    status, _, _ = call(
        fresh, "PUT", "/api/v1/vm.restore", {"source_url": (files / "none").as_uri()}
    )
    assert status == 400
    ok(fresh, "PUT", "/api/v1/vm.restore", {"source_url": snap.as_uri()})
    info = ok(fresh, "GET", "/api/v1/vm.info")
    assert info["state"] == "Paused"
    assert info["config"]["disks"][0]["path"] == str(files / "rootfs")
    resumed = build("cloud-hypervisor", record=None)
    ok(resumed, "PUT", "/api/v1/vm.restore", {"source_url": snap.as_uri(), "resume": True})
    assert ok(resumed, "GET", "/api/v1/vm.info")["state"] == "Running"


# -- the stand-in as a process -------------------------------------------------------------


@pytest.fixture
async def standin(
    request: pytest.FixtureRequest, files: Path
) -> AsyncIterator[tuple[Path, Path, Any]]:
    flavor: str = request.param
    sock, record = files / "api.sock", files / "record.jsonl"
    flag = (
        ["--api-sock", str(sock)] if flavor == "firecracker" else ["--api-socket", f"path={sock}"]
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.vmm.spec_server", flavor, *flag, "--record", str(record),
        cwd=PROJECT_ROOT,
    )  # fmt: skip
    for _ in range(200):
        if sock.exists():
            break
        await asyncio.sleep(0.025)
    yield sock, record, proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def _client(sock: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://localhost"
    )


@pytest.mark.parametrize("standin", ["cloud-hypervisor"], indirect=True)
async def test_the_cloud_hypervisor_stand_in_serves_records_and_exits_on_vmm_shutdown(
    standin: tuple[Path, Path, Any],
) -> None:
    sock, record, proc = standin
    async with _client(sock) as client:
        ping = await client.get("/api/v1/vmm.ping")
        assert ping.status_code == 200
        assert ping.json()["version"] == "spec-stand-in"
        refused = await client.put("/api/v1/vm.create", content=b"{not json")
        assert refused.status_code == 400
        assert (await client.put("/api/v1/vmm.shutdown")).status_code == 204
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    entries = read_record(record)
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("GET", "/api/v1/vmm.ping", 200),
        ("PUT", "/api/v1/vm.create", 400),
        ("PUT", "/api/v1/vmm.shutdown", 204),
    ]
    assert entries[1]["spec_errors"][0].startswith("body is not JSON")


@pytest.mark.parametrize("standin", ["firecracker"], indirect=True)
async def test_the_firecracker_stand_in_answers_faults_as_json(
    standin: tuple[Path, Path, Any],
) -> None:
    sock, record, proc = standin
    async with _client(sock) as client:
        response = await client.patch("/vm", json={"state": "Paused"})
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"fault_message": NOT_BEFORE_BOOT}
        unknown = await client.get("/metrics/now")
        assert unknown.status_code == 400
        assert (
            unknown.json()["fault_message"]
            == "Invalid request method and/or path: GET /metrics/now."
        )
    assert proc.returncode is None
    assert [e["status"] for e in read_record(record)] == [400, 400]


def _minimal(spec_doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    """The smallest instance of `schema`: required properties only, first enum values."""
    if "$ref" in schema:
        node: Any = spec_doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return _minimal(spec_doc, node)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: _minimal(spec_doc, props[name]) for name in schema.get("required", [])}
    return {"string": "x", "integer": schema.get("minimum", 1), "boolean": False, "array": []}[kind]


def test_every_preboot_and_postboot_operation_in_the_firecracker_spec_is_enforced(
    files: Path,
) -> None:
    spec = firecracker_spec()
    ruled = [
        op
        for op in spec.operations
        if "-boot only" in op.summary or "fail after machine startup" in op.description
    ]
    assert len(ruled) == 16  # as the pinned spec marks them
    for op in ruled:
        schema, _ = spec.body_schema(op)
        body = _minimal(spec.document, schema) if schema is not None else None
        path = (
            op.template.replace("{drive_id}", "x").replace("{iface_id}", "x").replace("{id}", "x")
        )
        for key in ("drive_id", "iface_id", "id"):
            if isinstance(body, dict) and key in body:
                body[key] = "x"
        server = _configured_fc(files)
        if "Post-boot only" not in op.summary:
            ok(server, "PUT", "/actions", {"action_type": "InstanceStart"})
            expected = LOAD_NOT_ALLOWED if op.template == "/snapshot/load" else NOT_AFTER_BOOT
        else:
            expected = NOT_BEFORE_BOOT
        status, reply, entry = call(server, op.method, path, body)
        assert entry["spec_errors"] == [], (op.template, entry["spec_errors"])
        assert (status, reply["fault_message"]) == (400, expected), f"{op.method} {op.template}"

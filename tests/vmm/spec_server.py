"""A stand-in VMM: serves a VMM's published API on a unix socket, checking every request.

Run as the VMM binary would be run:

    python -m tests.vmm.spec_server firecracker --api-sock PATH [--id ID] [--record FILE]
    python -m tests.vmm.spec_server cloud-hypervisor --api-socket path=PATH [--record FILE]

Requests whose path or method is not in the spec, or whose body breaks the
spec's schema, are refused the way the VMM refuses bad requests; the rest go
to the VMM's state model (tests/vmm/models.py). Every request is appended to
the record file as one JSON line: what was sent, the spec errors, the reply,
whether the spec documents the reply's status and whether the reply itself
fits the spec's response schema. Absolute paths resolve under
$STANDIN_CHROOT when set (the stand-in jailer sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

from tests.vmm.guest import SimulatedGuest
from tests.vmm.models import CloudHypervisorModel, FirecrackerModel, Reply, _Files, fault
from tests.vmm.openapi import (
    ApiSpec,
    MethodNotInSpec,
    NoSuchPath,
    cloud_hypervisor_spec,
    firecracker_spec,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class SpecServer:
    """An ASGI app answering one VMM's API from its spec and state model."""

    def __init__(
        self,
        flavor: str,
        spec: ApiSpec,
        model: FirecrackerModel | CloudHypervisorModel,
        record: Path | None = None,
    ) -> None:
        self.flavor = flavor
        self.spec = spec
        self.model = model
        self.record = record
        self.on_exit: Callable[[], None] = lambda: None

    def _refuse(self, status: int, message: str) -> Reply:
        if self.flavor == "firecracker":
            return fault(message, status)
        return Reply(status, text=message)

    def answer(self, method: str, path: str, raw: bytes) -> tuple[Reply, dict[str, Any]]:
        entry: dict[str, Any] = {"method": method, "path": path, "spec_errors": []}
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                entry["body"] = raw.decode(errors="replace")
                entry["spec_errors"] = [f"body is not JSON: {exc}"]
                return self._refuse(400, f"Syntax error in the request body: {exc}"), entry
        entry["body"] = body
        try:
            match = self.spec.match(method, path)
        except NoSuchPath as exc:
            entry["spec_errors"] = [str(exc)]
            status = 400 if self.flavor == "firecracker" else 404
            return self._refuse(
                status, f"Invalid request method and/or path: {method} {path}."
            ), entry
        except MethodNotInSpec as exc:
            entry["spec_errors"] = [str(exc)]
            return self._refuse(400, f"Invalid request method and/or path: {method} {path}."), entry
        entry["operation"] = f"{match.operation.method} {match.operation.template}"
        errors = self.spec.validate_body(match.operation, body, present=bool(raw))
        if errors:
            entry["spec_errors"] = errors
            reply = self._refuse(400, "Invalid request body: " + "; ".join(errors))
        else:
            reply = self.model.handle(match, body)
        entry["documented"] = self.spec.documents_status(match.operation, reply.status)
        schema = self.spec.response_schema(match.operation, reply.status)
        entry["response_errors"] = (
            self.spec.validate(schema, reply.body)
            if schema is not None and reply.body is not None
            else []
        )
        return reply, entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        reply, entry = self.answer(scope["method"], scope["path"], raw)
        entry["status"] = reply.status
        entry["reply"] = reply.body if reply.text is None else reply.text
        if self.record is not None:
            with self.record.open("a") as record:
                record.write(json.dumps(entry) + "\n")
        if reply.text is not None:
            payload, kind = reply.text.encode(), b"text/plain"
        elif reply.body is not None:
            payload, kind = json.dumps(reply.body).encode(), b"application/json"
        else:
            payload, kind = b"", b"application/json"
        headers = [(b"content-type", kind), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        if reply.exit_after:
            self.on_exit()


def build(flavor: str, *, record: Path | None, instance_id: str | None = None) -> SpecServer:
    root = os.environ.get("STANDIN_CHROOT")
    files = _Files(Path(root) if root else None)
    if flavor == "firecracker":
        model: FirecrackerModel | CloudHypervisorModel = FirecrackerModel(
            files, instance_id=instance_id or "anonymous-instance"
        )
        return SpecServer(flavor, firecracker_spec(), model, record)
    return SpecServer(flavor, cloud_hypervisor_spec(), CloudHypervisorModel(files), record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spec_server")
    parser.add_argument("flavor", choices=["firecracker", "cloud-hypervisor"])
    parser.add_argument("--api-sock")  # firecracker
    parser.add_argument("--id")  # firecracker
    parser.add_argument("--api-socket")  # cloud-hypervisor: path=PATH or PATH
    parser.add_argument("--record", type=Path)
    parser.add_argument("--fail-start", help="print this to stderr and exit 1 (a broken VMM)")
    parser.add_argument(
        "--guest", action="store_true", help="boot a simulated guest (tests/vmm/guest.py)"
    )
    args = parser.parse_args(argv)
    if args.fail_start:
        print(args.fail_start, file=sys.stderr)
        return 1
    socket_arg = args.api_sock if args.flavor == "firecracker" else args.api_socket
    if not socket_arg:
        parser.error("the API socket option is required")
    socket_path = socket_arg.removeprefix("path=")
    root = os.environ.get("STANDIN_CHROOT")
    if root and socket_path.startswith("/"):
        socket_path = str(Path(root) / socket_path.lstrip("/"))
    app = build(args.flavor, record=args.record, instance_id=args.id)
    config = uvicorn.Config(
        app,
        uds=socket_path,
        # asyncio's own loop: the simulated guest starts its agent with user=/group=,
        # which uvloop's subprocesses do not take (uvicorn picks uvloop if installed).
        loop="asyncio",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    app.on_exit = stop
    if args.guest:
        app.model.guest_factory = SimulatedGuest
    try:
        server.run()
    finally:
        if app.model.guest is not None:
            app.model.guest.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pets: create one (`corral service deploy`, `create --kind persistent`), promote a
running sandbox, read a pet's log (streamed with `follow`), remove a kept volume."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from corral.api.models import PetCreate, Promotion, Sandbox
from corral.server.app import runtime_of
from corral.server.auth import CallerDep
from corral.server.routes.sandboxes import _template, publish_ports

router = APIRouter(tags=["pets"])


@router.post("/pets", status_code=201, response_model=Sandbox)
async def create_pet(request: Request, body: PetCreate, caller: CallerDep) -> Sandbox:
    """Create a pet named `name` owned by the caller's tenant; the server's
    supervisor starts its service and keeps it running."""
    runtime = runtime_of(request.app)
    template = _template(request, body, caller)
    record = await runtime.manager.pets.create(
        template,
        name=body.name,
        tenant=caller.tenant,
        volume=body.volume,
        restart=body.restart,
        memory=body.memory,
        cpus=body.cpus,
        cpuset=body.cpuset,
        runtime=body.runtime,
        pids=body.pids,
        disk=body.disk,
        env=body.env,
        labels=body.labels,
        metadata=body.metadata,
        ports=publish_ports(runtime.manager, body.ports),
    )
    return Sandbox.from_record(record)


@router.post("/sandboxes/{sandbox_id}/promote", response_model=Sandbox)
async def promote(request: Request, sandbox_id: str, body: Promotion, caller: CallerDep) -> Sandbox:
    """Turn a running ephemeral sandbox into a pet (see docs/pets.md)."""
    record = await runtime_of(request.app).manager.pets.promote(
        sandbox_id,
        name=body.name,
        tenant=caller.scope,
        volume=body.volume,
        restart=body.restart,
    )
    return Sandbox.from_record(record)


@router.post("/sandboxes/{sandbox_id}/restart", response_model=Sandbox)
async def restart(request: Request, sandbox_id: str, caller: CallerDep) -> Sandbox:
    """Supervise a failed pet again (its crash loop looked into and fixed)."""
    record = runtime_of(request.app).manager.pets.restart(sandbox_id, tenant=caller.scope)
    return Sandbox.from_record(record)


@router.get(
    "/sandboxes/{sandbox_id}/logs",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}}},
)
async def logs(
    request: Request,
    sandbox_id: str,
    caller: CallerDep,
    follow: Annotated[bool, Query()] = False,
    tail: Annotated[int | None, Query(ge=0, le=1 << 30)] = None,
) -> StreamingResponse:
    """A pet's log: its service's output and the supervisor's lines (`--- corral`);
    with `follow`, kept open for what comes until the pet is destroyed."""
    pets = runtime_of(request.app).manager.pets
    record = pets.logs_of(sandbox_id, tenant=caller.scope)
    chunks = pets.read_logs(record, follow=follow, tail=tail)
    return StreamingResponse(chunks, media_type="text/plain")


@router.delete("/volumes/{name}", status_code=204)
async def remove_volume(request: Request, name: str, caller: CallerDep) -> Response:
    """Delete a kept volume and its data (refused while a pet of that name exists)."""
    runtime_of(request.app).manager.pets.remove_volume(name, tenant=caller.tenant)
    return Response(status_code=204)

"""Warm pools: create, list, get, resize, delete, and claim a ready sandbox; /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from corral.api.models import (
    ClaimBody,
    ClaimResult,
    PoolCreate,
    PoolInfo,
    PoolPatch,
    PoolRemoved,
    Sandbox,
    SandboxCreate,
)
from corral.runtime.pools import PoolManager
from corral.server.app import runtime_of
from corral.server.auth import CallerDep
from corral.server.routes.sandboxes import _template

router = APIRouter(tags=["pools"])
metrics_router = APIRouter(tags=["system"])


def _pools(request: Request) -> PoolManager:
    return runtime_of(request.app).pools


@router.post("/pools", status_code=201, response_model=PoolInfo)
async def create_pool(request: Request, body: PoolCreate, caller: CallerDep) -> PoolInfo:
    """Define a pool owned by the caller's tenant; members are made in the background
    and count against the tenant's quota."""
    template = _template(
        request, SandboxCreate(template=body.template, template_spec=body.template_spec), caller
    )
    pools = _pools(request)
    await pools.add(
        body.name,
        template,
        size=body.size,
        tenant=caller.tenant,
        runtime=body.runtime,
        memory=body.memory,
        cpus=body.cpus,
        pids=body.pids,
        disk=body.disk,
        cpuset=body.cpuset,
        env=body.env,
        labels=body.labels,
        max_idle=body.max_idle,
        snapshot=body.snapshot,
    )
    return PoolInfo.from_status(pools.get(body.name, tenant=caller.tenant))


@router.get("/pools", response_model=list[PoolInfo])
async def list_pools(request: Request, caller: CallerDep) -> list[PoolInfo]:
    """The caller's pools (an admin key sees every tenant's)."""
    return [PoolInfo.from_status(s) for s in _pools(request).list(tenant=caller.scope)]


@router.get("/pools/{name}", response_model=PoolInfo)
async def get_pool(request: Request, name: str, caller: CallerDep) -> PoolInfo:
    return PoolInfo.from_status(_pools(request).get(name, tenant=caller.tenant))


@router.patch("/pools/{name}", response_model=PoolInfo)
async def resize_pool(request: Request, name: str, body: PoolPatch, caller: CallerDep) -> PoolInfo:
    return PoolInfo.from_status(_pools(request).resize(name, body.size, tenant=caller.tenant))


@router.delete("/pools/{name}", response_model=PoolRemoved)
async def delete_pool(request: Request, name: str, caller: CallerDep) -> PoolRemoved:
    """Delete the pool and destroy its idle members (sandboxes claimed from it stay)."""
    return PoolRemoved(destroyed=await _pools(request).remove(name, tenant=caller.tenant))


@router.post("/pools/{name}/claim", status_code=201, response_model=ClaimResult)
async def claim(request: Request, name: str, body: ClaimBody, caller: CallerDep) -> ClaimResult:
    """A running sandbox from the pool (`from_pool: true`), or created cold when the
    pool is empty (`from_pool: false`); it is the caller's from now on."""
    result = await _pools(request).claim(
        name,
        tenant=caller.tenant,
        timeout=body.timeout,
        labels=body.labels,
        metadata=body.metadata,
        name=body.name,
    )
    return ClaimResult(
        sandbox=Sandbox.from_record(result.record),
        pool=result.pool,
        from_pool=result.from_pool,
        seconds=result.seconds,
    )


@metrics_router.get("/metrics", response_class=Response)
async def metrics(request: Request, caller: CallerDep) -> Response:
    """Prometheus text format (an admin key: it names every tenant's pools)."""
    caller.require_admin()
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

"""Health, readiness, templates and tenant views."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from corral import __version__
from corral.api.models import Health, Quota, TemplateInfo, TenantInfo, Usage
from corral.api.problems import PROBLEM_MEDIA_TYPE, problem_type
from corral.errors import CorralError, NotFoundError, PermissionDeniedError
from corral.server.app import runtime_of
from corral.server.auth import CallerDep
from corral.spec.template import BUILTIN_TEMPLATES, Template, load_template

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    """Liveness: the process answers. No key needed."""
    return Health(
        status="ok", version=__version__, backend=runtime_of(request.app).manager.backend.name
    )


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(request: Request) -> Health | JSONResponse:
    """Readiness: reconcile done, the store answers, the backend lists its sandboxes."""
    runtime = runtime_of(request.app)
    checks = {"reconcile": "ok" if runtime.ready else "pending"}
    try:
        runtime.store.ping()
        checks["store"] = "ok"
    except CorralError as error:
        checks["store"] = error.message
    try:
        await runtime.manager.backend.list_sandboxes()
        checks["backend"] = "ok"
    except CorralError as error:
        checks["backend"] = error.message
    body = Health(
        status="ok" if all(v == "ok" for v in checks.values()) else "unavailable",
        version=__version__,
        backend=runtime.manager.backend.name,
        checks=checks,
    )
    if body.status == "ok":
        return body
    problem = {
        "type": problem_type("not-ready"),
        "title": "Not ready",
        "status": 503,
        "detail": "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
        **body.model_dump(),
    }
    problem["status"] = 503
    return JSONResponse(problem, status_code=503, media_type=PROBLEM_MEDIA_TYPE)


def server_templates(templates_dir: Path | None) -> dict[str, Template]:
    """Templates a tenant may name: the built-ins, then `templates_dir/*.toml`
    (parsed again only when a file there changes)."""
    files: tuple[tuple[str, float], ...] = ()
    if templates_dir is not None and templates_dir.is_dir():
        files = tuple((str(p), p.stat().st_mtime) for p in sorted(templates_dir.glob("*.toml")))
    return _templates(files)


@functools.lru_cache(maxsize=8)
def _templates(files: tuple[tuple[str, float], ...]) -> dict[str, Template]:
    found = {name: load_template(name) for name in BUILTIN_TEMPLATES}
    for path, _mtime in files:
        template = load_template(Path(path))
        found.setdefault(template.name, template)
    return found


def resolve_template(request: Request, name: str) -> Template:
    templates = server_templates(runtime_of(request.app).settings.server.templates_dir)
    template = templates.get(name)
    if template is None:
        raise NotFoundError(
            f"unknown template '{name}'",
            hint="list templates with GET /v1/templates, or send the template as template_spec",
        )
    return template


@router.get("/templates", response_model=list[TemplateInfo])
async def templates(request: Request, caller: CallerDep) -> list[TemplateInfo]:
    found = server_templates(runtime_of(request.app).settings.server.templates_dir)
    return [
        TemplateInfo(
            name=t.name,
            description=t.description,
            base=t.base,
            isolation=[str(level) for level in t.isolation],
            kind=t.kind,
            resources=t.resources.model_dump(mode="json"),
            timeout=t.timeout,
        )
        for t in found.values()
    ]


def tenant_info(request: Request, name: str) -> TenantInfo:
    store = runtime_of(request.app).store
    tenant = store.tenants.get(name)
    usage = store.usage(name)
    return TenantInfo(
        name=tenant.name,
        quota=Quota(
            max_sandboxes=tenant.quota.max_sandboxes,
            max_vcpus=tenant.quota.max_vcpus,
            max_memory=tenant.quota.max_memory,
        ),
        usage=Usage(sandboxes=usage.sandboxes, vcpus=usage.vcpus, memory=usage.memory),
    )


@router.get("/tenants/me", response_model=TenantInfo)
async def me(request: Request, caller: CallerDep) -> TenantInfo:
    """The caller's tenant: its quota and what its live sandboxes hold now."""
    return tenant_info(request, caller.tenant)


@router.get("/tenants", response_model=list[TenantInfo])
async def all_tenants(request: Request, caller: CallerDep) -> list[TenantInfo]:
    """Every tenant (admin keys only)."""
    if not caller.admin:
        raise PermissionDeniedError(
            "listing tenants needs an admin key", hint="use GET /v1/tenants/me"
        )
    store = runtime_of(request.app).store
    return [tenant_info(request, t.name) for t in store.tenants.list()]

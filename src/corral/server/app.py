"""The FastAPI application: lifespan (reconcile, reaper), problem+json errors, routers."""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.api.models import API_PREFIX
from corral.api.models import Problem as ProblemModel
from corral.api.problems import PROBLEM_MEDIA_TYPE, VALIDATION_TYPE, problem_type, to_problem
from corral.config import Settings
from corral.errors import CorralError
from corral.runtime.manager import SandboxManager
from corral.runtime.pools import PoolManager
from corral.runtime.reaper import Reaper
from corral.runtime.supervisor import PetSupervisor
from corral.store import Store

log = logging.getLogger("corral.server")


@dataclass
class ServerRuntime:
    """What the API serves from: one manager (its backend and store) and the settings."""

    manager: SandboxManager
    settings: Settings
    reaper: Reaper | None = None
    reconciled: dict[str, list[str]] = field(default_factory=dict)
    ready: bool = False

    @property
    def store(self) -> Store:
        return self.manager.store

    @functools.cached_property
    def pools(self) -> PoolManager:
        """Warm pools over this runtime's manager (refilled while the server runs)."""
        return PoolManager(self.manager, interval=self.settings.server.reap_interval)

    @functools.cached_property
    def supervisor(self) -> PetSupervisor:
        """Keeps pets running (their services, restarts, health checks, logs)."""
        return PetSupervisor(self.manager)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerRuntime:
        return cls(SandboxManager.from_settings(settings), settings)

    async def start(self) -> None:
        """Settle the store with the backend, then start reaping."""
        from corral._sys.procs import use_pidfd_child_watcher

        use_pidfd_child_watcher()  # no thread per runtime subprocess
        self.reconciled = await self.manager.reconcile()
        log.info("reconciled: %s", {k: len(v) for k, v in self.reconciled.items()})
        self.reaper = Reaper(self.manager, self.settings.server.reap_interval)
        self.reaper.start()
        self.pools.start()
        self.supervisor.start()
        # What start-up made (imported modules, the app, its schemas: ~110k objects)
        # lives as long as the server: kept out of the collector's full passes, each
        # of which otherwise walks them all (~60 ms, a stall for whichever request
        # meets it).
        gc.freeze()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.reaper is not None:
            await self.reaper.stop()
        await self.pools.stop()
        await self.supervisor.stop()
        await self.manager.backend.aclose()


def runtime_of(app: Any) -> ServerRuntime:
    runtime: ServerRuntime = app.state.runtime
    return runtime


def problem_response(error: CorralError) -> JSONResponse:
    status, body = to_problem(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def create_app(runtime: ServerRuntime, *, manage_lifecycle: bool = True) -> FastAPI:
    """The API app serving `runtime`. With `manage_lifecycle` the app's lifespan runs
    reconcile and the reaper (tests that drive the runtime themselves pass False)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await runtime.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await runtime.stop()

    from corral.server.metrics import Metrics
    from corral.server.routes import commands, files, pools, sandboxes, system
    from corral.server.routes import pets as pet_routes

    app = FastAPI(
        title="Corral",
        version=__version__,
        summary="Sandboxes for untrusted code: containers, gVisor and microVMs.",
        lifespan=lifespan,
        responses={
            "4XX": {"model": ProblemModel, "description": "A problem (RFC 9457)"},
            "5XX": {"model": ProblemModel, "description": "A problem (RFC 9457)"},
        },
    )
    app.state.runtime = runtime
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    for router in (system.router, sandboxes.router, commands.router, files.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(pools.router, prefix=API_PREFIX)
    app.include_router(pools.metrics_router)
    app.include_router(pet_routes.router, prefix=API_PREFIX)
    app.state.metrics = Metrics(runtime.pools)

    @app.exception_handler(CorralError)
    async def corral_error(_request: Request, error: CorralError) -> JSONResponse:
        return problem_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        issues = [
            {"loc": [str(p) for p in issue.get("loc", ())], "msg": str(issue.get("msg", ""))}
            for issue in error.errors()
        ]
        first = issues[0] if issues else {"loc": [], "msg": "invalid"}
        body = {
            "type": VALIDATION_TYPE,
            "title": "The request is not valid",
            "status": 422,
            "detail": f"{'.'.join(first['loc'])}: {first['msg']}",
            "errors": issues,
        }
        return JSONResponse(body, status_code=422, media_type=PROBLEM_MEDIA_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(error.status_code, "http")
        body = {
            "type": problem_type(slug),
            "title": str(error.detail),
            "status": error.status_code,
            "detail": str(error.detail),
        }
        return JSONResponse(
            body,
            status_code=error.status_code,
            media_type=PROBLEM_MEDIA_TYPE,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        body = {
            "type": problem_type("internal"),
            "title": "Internal error",
            "status": 500,
            "detail": f"{type(error).__name__}: the server failed; see its log",
        }
        return JSONResponse(body, status_code=500, media_type=PROBLEM_MEDIA_TYPE)

    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with every error response documented as what it is: an RFC
    9457 problem (application/problem+json), the 422 of validation included."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                if status[0] in "45":
                    response["content"] = {PROBLEM_MEDIA_TYPE: problem}
                    response.setdefault("description", "A problem (RFC 9457)")
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema

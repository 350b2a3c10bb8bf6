"""`corral serve`: the HTTP API (FastAPI) over the runtime, with tenants and a reaper."""

from corral.server.app import ServerRuntime, create_app

__all__ = ["ServerRuntime", "create_app"]

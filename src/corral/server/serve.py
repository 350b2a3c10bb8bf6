"""Run the API server in this process (uvicorn), until SIGINT/SIGTERM."""

from __future__ import annotations

import logging

from corral.config import Settings


def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Serve the API on settings.server.host:port; reconcile first, reap while up."""
    import uvicorn

    from corral.server.app import ServerRuntime, create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    runtime = ServerRuntime.from_settings(settings)
    app = create_app(runtime)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        ws="websockets-sansio",
        http="auto",  # httptools when installed (the server extra has it), else h11
        # asyncio's loop, not uvloop: every exec is a runtime subprocess, and uvloop's
        # subprocess path costs ~10 ms more per call here (ServerRuntime.start has
        # asyncio wait for children through pidfds instead).
        loop="asyncio",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()

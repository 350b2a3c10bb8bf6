"""The Python SDK: `Corral` (blocking) and `AsyncCorral` (asyncio) over the /v1 HTTP API.

Light on purpose: httpx and pydantic only (websockets for `exec_interactive`),
so it runs on a laptop without the server's dependencies.
"""

from corral.client.aio import AsyncCorral, AsyncFiles, AsyncInteractiveExec, AsyncSandbox
from corral.client.sync import Corral, Files, InteractiveExec, Sandbox

__all__ = [
    "AsyncCorral",
    "AsyncFiles",
    "AsyncInteractiveExec",
    "AsyncSandbox",
    "Corral",
    "Files",
    "InteractiveExec",
    "Sandbox",
]

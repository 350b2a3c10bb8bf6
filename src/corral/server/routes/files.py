"""Files in and out of a sandbox: one file, or a directory as a tar stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from corral.api.models import TAR_MEDIA_TYPE
from corral.errors import FileTooLargeError, UserError
from corral.server.app import runtime_of
from corral.server.auth import CallerDep

router = APIRouter(tags=["files"])

PathQuery = Annotated[
    str, Query(min_length=1, max_length=4096, pattern=r"^/", description="absolute path")
]
_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_TAR_BODY = {
    "requestBody": {
        "required": True,
        "content": {TAR_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}


async def read_body(request: Request, sandbox_id: str) -> bytes:
    """The request body, refused (413) as soon as it passes the upload limit."""
    limit = runtime_of(request.app).settings.server.max_upload_bytes
    declared = request.headers.get("content-length")
    too_large = FileTooLargeError(
        f"the upload is over the limit of {limit} bytes",
        sandbox_id=sandbox_id,
        hint="send less at once, or raise server.max_upload_bytes",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _mode(mode: str) -> int:
    try:
        value = int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise UserError(f"mode '{mode}' is not an octal file mode", hint="e.g. mode=644")
    return value


@router.put(
    "/sandboxes/{sandbox_id}/files",
    status_code=204,
    response_class=Response,
    openapi_extra=_RAW_BODY,
)
async def put_file(
    request: Request,
    sandbox_id: str,
    path: PathQuery,
    caller: CallerDep,
    mode: Annotated[str, Query(max_length=6)] = "644",
) -> Response:
    """Write the request body to `path` inside the sandbox (as the sandbox user)."""
    file_mode = _mode(mode)
    manager = runtime_of(request.app).manager
    manager.get(sandbox_id, tenant=caller.scope)  # 404 before reading a body for nobody
    data = await read_body(request, sandbox_id)
    await manager.put_file(sandbox_id, path, data, file_mode, tenant=caller.scope)
    return Response(status_code=204)


@router.get(
    "/sandboxes/{sandbox_id}/files",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_file(
    request: Request, sandbox_id: str, path: PathQuery, caller: CallerDep
) -> Response:
    data = await runtime_of(request.app).manager.get_file(sandbox_id, path, tenant=caller.scope)
    return Response(data, media_type="application/octet-stream")


@router.put(
    "/sandboxes/{sandbox_id}/archive",
    status_code=204,
    response_class=Response,
    openapi_extra=_TAR_BODY,
)
async def put_archive(
    request: Request, sandbox_id: str, path: PathQuery, caller: CallerDep
) -> Response:
    """Unpack a tar stream into directory `path` (created if missing)."""
    manager = runtime_of(request.app).manager
    manager.get(sandbox_id, tenant=caller.scope)
    data = await read_body(request, sandbox_id)
    await manager.put_archive(sandbox_id, path, data, tenant=caller.scope)
    return Response(status_code=204)


@router.get(
    "/sandboxes/{sandbox_id}/archive",
    response_class=Response,
    responses={200: {"content": {TAR_MEDIA_TYPE: {}}}},
)
async def get_archive(
    request: Request, sandbox_id: str, path: PathQuery, caller: CallerDep
) -> Response:
    """A tar of directory `path`'s contents."""
    data = await runtime_of(request.app).manager.get_archive(sandbox_id, path, tenant=caller.scope)
    return Response(data, media_type=TAR_MEDIA_TYPE)

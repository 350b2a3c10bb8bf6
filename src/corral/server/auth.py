"""Who is calling: an API key (Bearer) resolved to its tenant, and whether it is admin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from corral.errors import AuthenticationError, PermissionDeniedError

bearer = HTTPBearer(auto_error=False, description="An API key from `corral keys create`.")


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    admin: bool = False
    key_id: str | None = None

    @property
    def scope(self) -> str | None:
        """The tenant filter for this caller's reads: None (everything) for admins."""
        return None if self.admin else self.tenant

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDeniedError(
                "this needs an admin key", hint="create one with `corral keys create --admin`"
            )


def authenticate(request: Request, authorization: str | None) -> Caller:
    from corral.server.app import runtime_of

    if not authorization:
        raise AuthenticationError(
            "no API key given",
            hint="send 'Authorization: Bearer <key>' (keys come from `corral keys create`)",
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError(
            "the Authorization header is not 'Bearer <key>'", hint="send 'Bearer <key>'"
        )
    api_key = runtime_of(request.app).store.tenants.authenticate(key)
    return Caller(api_key.tenant, api_key.admin, api_key.id)


async def current_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    if credentials is None:
        return authenticate(request, request.headers.get("authorization"))
    return authenticate(request, f"{credentials.scheme} {credentials.credentials}")


CallerDep = Annotated[Caller, Depends(current_caller)]

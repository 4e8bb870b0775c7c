"""Bearer-token authentication and role checks for the API routes.

`require("admin", "reader")` is a FastAPI dependency: 401 when the token is missing or
unknown, 403 when its role may not make this call; otherwise it returns the `Token`.
Tokens are looked up in the token store's in-memory hash map, so no SQLite work happens on
the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mesh.api.errors import ApiError
from mesh.api.state import state_of
from mesh.store.tokens import ROLES, Token

_bearer = HTTPBearer(auto_error=False, description="a token from `sluice token create`")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sluice"'}


def require(*roles: str) -> Callable[..., Awaitable[Token]]:
    assert all(r in ROLES for r in roles), roles

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Token:
        if credentials is None:
            raise ApiError(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers=_CHALLENGE,
            )
        token = state_of(request).stores.tokens.verify(credentials.credentials)
        if token is None:
            raise ApiError(401, "unknown token", headers=_CHALLENGE)
        if token.role not in roles:
            raise ApiError(
                403,
                f"a {token.role} token may not do this; needs one of: {', '.join(roles)}",
            )
        return token

    return dependency


ANY = require(*ROLES)
ADMIN = require("admin")
READ = require("admin", "reader")
SIDECAR = require("sidecar", "admin")

# Route parameter types: `_t: Reader` is the caller's token, checked for the role.
Anyone = Annotated[Token, Depends(ANY)]
Admin = Annotated[Token, Depends(ADMIN)]
Reader = Annotated[Token, Depends(READ)]
Sidecar = Annotated[Token, Depends(SIDECAR)]

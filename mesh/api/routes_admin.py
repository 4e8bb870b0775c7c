"""Status, tokens and the sidecar registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from mesh.api.auth import Admin, Anyone, Reader, Sidecar
from mesh.api.errors import ApiError
from mesh.api.routes_policies import Text
from mesh.api.state import in_thread, state_of
from mesh.store.tokens import MAX_NAME, LastAdmin

router = APIRouter()
MAX_INT = 2**53
Instance = Annotated[str, Path(min_length=1, max_length=256)]


@router.get("/v1/status", tags=["status"])
async def status(request: Request, _t: Anyone) -> Any:
    state = state_of(request)
    live = await in_thread(state.stores.sidecars.live)
    return {
        "version": state.settings.version,
        "policy_version": state.watch.version,
        "started": state.started,
        "data_dir": state.settings.data_dir,
        "sidecars": live,
        "stream_subscribers": state.broker.subscribers,
    }


class TokenBody(BaseModel):
    role: Literal["admin", "sidecar", "reader"]
    name: Text = Field(min_length=1, max_length=MAX_NAME)


@router.post("/v1/tokens", status_code=201, tags=["tokens"])
async def create_token(request: Request, body: TokenBody, _t: Admin) -> Any:
    try:
        token, secret = await in_thread(
            state_of(request).stores.tokens.create, body.role, body.name
        )
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid request") from None
    return {**token.to_json(), "token": secret}


@router.get("/v1/tokens", tags=["tokens"])
async def list_tokens(request: Request, _t: Admin) -> Any:
    return {"tokens": [t.to_json() for t in state_of(request).stores.tokens.tokens()]}


@router.delete("/v1/tokens/{token_id}", tags=["tokens"])
async def delete_token(
    request: Request,
    token_id: Annotated[str, Path(max_length=64)],
    _t: Admin,
) -> Any:
    try:
        found = await in_thread(state_of(request).stores.tokens.delete, token_id)
    except LastAdmin as exc:
        raise ApiError(409, str(exc)) from None
    if not found:
        raise ApiError(404, f"no token with id {token_id!r}")
    return {"deleted": token_id}


class RouteInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    service: Text = ""
    protocol: Text = ""
    listen: Text = ""
    upstream: Text = ""


class AuditInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    spooled: int = Field(default=0, ge=0, le=MAX_INT)
    dropped: int = Field(default=0, ge=0, le=MAX_INT)


class SidecarBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    app: Text = Field(min_length=1, max_length=256)
    instance: Text | None = Field(default=None, max_length=256)
    hostname: Text = Field(default="", max_length=256)
    pid: int | None = Field(default=None, ge=0, le=MAX_INT)
    routes: list[RouteInfo] = Field(default_factory=list, max_length=1000)
    policy_version: int = Field(default=0, ge=0, le=MAX_INT)
    audit: AuditInfo = Field(default_factory=lambda: AuditInfo())


@router.put("/v1/sidecars/{instance}", tags=["sidecars"])
async def heartbeat(request: Request, instance: Instance, body: SidecarBody, _t: Sidecar) -> Any:
    if body.instance is not None and body.instance != instance:
        raise ApiError(
            422,
            f"body instance {body.instance!r} differs from the path's {instance!r}",
            "invalid request",
        )
    state = state_of(request)
    info = body.model_dump(mode="json")
    try:
        await in_thread(state.stores.sidecars.upsert, instance, info)
    except ValueError as exc:  # a lone surrogate in an extra field
        raise ApiError(422, f"body: {exc}", "invalid request") from None
    return {"registered": True, "heartbeat_interval": state.stores.sidecars.interval}


@router.get("/v1/sidecars", tags=["sidecars"])
async def sidecars(request: Request, _t: Reader) -> Any:
    return {"sidecars": await in_thread(state_of(request).stores.sidecars.sidecars)}

"""Policy routes: apply, list, show, diff, roll back, and the sidecars' blocking query."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from mesh.api.auth import Admin, Reader, Sidecar
from mesh.api.errors import ApiError
from mesh.api.params import duration
from mesh.api.state import in_thread, state_of
from mesh.store.policies import UnknownVersion
from policies.errors import PolicyError

router = APIRouter(tags=["policies"])
MAX_VERSION = 2**53
DEFAULT_WAIT = "30s"
MAX_WAIT = 300.0


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Version = Annotated[int, Path(ge=0, le=MAX_VERSION)]


class ApplyBody(BaseModel):
    files: dict[Text, Text] = Field(description="file name -> YAML text")
    comment: Text = Field(default="", max_length=4096)


class RollbackBody(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    comment: Text = Field(default="", max_length=4096)


def _rejected(exc: PolicyError) -> ApiError:
    problems = [
        {"file": p.file, "line": p.line, "column": p.column, "message": p.message}
        for p in exc.problems
    ]
    detail = f"{len(problems)} problem(s); nothing accepted: " + "; ".join(
        str(p) for p in exc.problems[:5]
    )
    return ApiError(422, detail, "invalid policies", problems=problems)


@router.post("/v1/policies", status_code=201)
async def apply(request: Request, body: ApplyBody, token: Admin) -> Any:
    state = state_of(request)
    try:
        info = await in_thread(state.stores.policies.apply, body.files, body.comment, token.name)
    except PolicyError as exc:
        raise _rejected(exc) from None
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid policies") from None
    await state.watch.changed(info.version)
    return info.to_json()


@router.get("/v1/policies")
async def versions(request: Request, _t: Reader) -> Any:
    state = state_of(request)
    listed = await in_thread(state.stores.policies.versions)
    return {"current": state.watch.version, "versions": [v.to_json() for v in listed]}


@router.get("/v1/policies/current")
async def current(request: Request, _t: Reader) -> Any:
    return (await in_thread(state_of(request).stores.policies.current)).to_json()


@router.get("/v1/policies/{version}")
async def show(request: Request, version: Version, _t: Reader) -> Any:
    try:
        return (await in_thread(state_of(request).stores.policies.get, version)).to_json()
    except UnknownVersion as exc:
        raise ApiError(404, str(exc)) from None


@router.get("/v1/policies/{a}/diff/{b}")
async def diff(request: Request, a: Version, b: Version, _t: Reader) -> Any:
    try:
        text = await in_thread(state_of(request).stores.policies.diff, a, b)
    except UnknownVersion as exc:
        raise ApiError(404, str(exc)) from None
    return {"from": a, "to": b, "diff": text}


@router.post("/v1/policies/rollback", status_code=201)
async def rollback(request: Request, body: RollbackBody, token: Admin) -> Any:
    state = state_of(request)
    try:
        info = await in_thread(
            state.stores.policies.rollback, body.version, body.comment, token.name
        )
    except UnknownVersion as exc:
        raise ApiError(404, str(exc)) from None
    except PolicyError as exc:  # the policy language changed since that version was stored
        raise _rejected(exc) from None
    await state.watch.changed(info.version)
    return info.to_json()


@router.get("/v1/sidecar/policies")
async def watch(
    request: Request,
    _t: Sidecar,
    index: int | None = Query(None, ge=0, le=MAX_VERSION, description="last version seen"),
    wait: str = Query(DEFAULT_WAIT, max_length=32, description="e.g. 30s, 5m; at most 300s"),
) -> Any:
    """Blocking query: with `index`, answer when the current version differs from it (a
    newer apply, or a control plane whose data was reset), or after `wait`."""
    state = state_of(request)
    timeout = min(duration(wait, "wait"), MAX_WAIT)
    if index is not None and index == state.watch.version:
        await state.watch.wait(index, timeout)
    current = await in_thread(state.stores.policies.current)
    return JSONResponse(
        {"version": current.version, "files": current.files},
        headers={"X-Sluice-Index": str(current.version)},
    )

"""Consul's HTTP API, the subset discovery needs, served by the embedded catalog.

Same server as the control API; the paths do not clash. Shapes, status codes and
parameters follow Consul's documentation (developer.hashicorp.com/consul/api-docs:
catalog, health, agent/service, agent/check, kv, status, features/blocking), so py-consul
and the `consul` CLI work unchanged. Unlike the control API, errors are plain text (as
Consul answers them), every answer carries `X-Consul-Index` (404s included), bodies are
read whatever their Content-Type (py-consul sends none), and these routes are left out of
the OpenAPI document (Consul's documentation is their contract).

Auth: the token comes in `X-Consul-Token` (py-consul's `token=`, CONSUL_HTTP_TOKEN), or
`Authorization: Bearer`; it is a Sluice token with its role: reader, sidecar and admin may
read; sidecar and admin may register, deregister and update checks; only admin may write
KV. A missing, unknown or too weak token is 403, as Consul answers with ACLs on.
/v1/status/* needs no token (Consul requires no ACL there; it holds no data).
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from mesh.api.state import state_of
from mesh.catalog.model import MAX_KV_VALUE, NotTtl, UnknownCheck
from mesh.catalog.parse import DEFAULT_WAIT, MAX_WAIT, BadRequest, duration, service_from_json
from mesh.catalog.runtime import EmbeddedCatalog
from mesh.store import Stores

router = APIRouter(include_in_schema=False)
READ = ("admin", "reader", "sidecar")
AGENT_WRITE = ("admin", "sidecar")
KV_WRITE = ("admin",)
MAX_REGISTRATION = 64 * 1024
MAX_INDEX = 2**63 - 1


class ConsulError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def install(
    app: FastAPI, stores: Stores, *, node: str | None = None, node_address: str = "127.0.0.1"
) -> EmbeddedCatalog:
    """Create the catalog over the control database, serve its routes, and run its checks
    for the lifetime of the app (wrapped around the app's own lifespan)."""
    node = node or socket.gethostname().split(".")[0].lower() or "sluice"
    catalog = EmbeddedCatalog(stores.db, node=node, node_address=node_address)
    app.state.catalog = catalog
    app.add_exception_handler(ConsulError, _consul_error)
    app.include_router(router)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        await catalog.start()
        try:
            async with inner(a) as value:
                yield value
        finally:
            await catalog.close()

    app.router.lifespan_context = lifespan
    return catalog


def catalog_of(request: Request) -> EmbeddedCatalog:
    catalog: EmbeddedCatalog = request.app.state.catalog
    return catalog


async def _consul_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsulError)
    index = catalog_of(request).model.index
    return Response(exc.text, exc.status, headers=_headers(index), media_type="text/plain")


def _headers(index: int) -> dict[str, str]:
    return {
        "X-Consul-Index": str(max(1, index)),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }


def _json(data: Any, index: int, status: int = 200) -> Response:
    return Response(
        json.dumps(data), status, headers=_headers(index), media_type="application/json"
    )


def _auth(request: Request, roles: tuple[str, ...]) -> None:
    token = request.headers.get("x-consul-token", "")
    if not token:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else ""
    if not token:
        raise ConsulError(403, "Permission denied: anonymous token lacks permission")
    found = state_of(request).stores.tokens.verify(token)
    if found is None:
        raise ConsulError(403, "ACL not found")
    if found.role not in roles:
        raise ConsulError(403, f"Permission denied: a {found.role} token may not do this")


def _flag(request: Request, name: str) -> bool:
    """Consul's boolean query parameters: present (`?passing`) means true."""
    if name not in request.query_params:
        return False
    return request.query_params[name].lower() not in ("false", "0")


def _uint(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) > MAX_INDEX:
        raise ConsulError(400, f"Invalid {name} index")
    return int(raw)


async def _block(request: Request, current: Callable[[], int]) -> None:
    """A blocking query (features/blocking): with ?index=N wait for current() > N, at most
    ?wait (default 5m, capped at 10m) plus up to wait/16 of jitter."""
    index = _uint(request, "index")
    if index is None:
        return
    try:
        wait = duration(request.query_params.get("wait") or f"{DEFAULT_WAIT:g}s", "wait time")
    except BadRequest as exc:
        raise ConsulError(400, str(exc)) from None
    wait = min(wait, MAX_WAIT)
    wait += random.random() * wait / 16
    await catalog_of(request).wait(current, index, wait)


def _check_dc(request: Request) -> None:
    dc = request.query_params.get("dc")
    if dc and dc.lower() != catalog_of(request).model.datacenter:
        raise ConsulError(400, f"No path to datacenter {dc!r}")


def _tags(request: Request) -> list[str]:
    return request.query_params.getlist("tag")


async def _body(request: Request, limit: int, too_large: str) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ConsulError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ConsulError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


# -- catalog ----------------------------------------------------------------------------


@router.get("/v1/catalog/services")
async def catalog_services(request: Request) -> Response:
    _auth(request, READ)
    _check_dc(request)
    model = catalog_of(request).model
    await _block(request, lambda: model.services_index)
    return _json(model.catalog_services(), model.services_index)


@router.get("/v1/catalog/service/{name}")
async def catalog_service(request: Request, name: str) -> Response:
    _auth(request, READ)
    _check_dc(request)
    model = catalog_of(request).model
    await _block(request, lambda: model.services_index)
    return _json(model.catalog_service(name, _tags(request)), model.services_index)


@router.get("/v1/catalog/nodes")
async def catalog_nodes(request: Request) -> Response:
    _auth(request, READ)
    _check_dc(request)
    model = catalog_of(request).model
    await _block(request, lambda: 1)
    return _json([model.node_json()], 1)


@router.get("/v1/catalog/node/{name}")
async def catalog_node(request: Request, name: str) -> Response:
    _auth(request, READ)
    _check_dc(request)
    model = catalog_of(request).model
    await _block(request, lambda: model.services_index)
    return _json(model.node_services(name), model.services_index)


@router.get("/v1/catalog/datacenters")
async def catalog_datacenters(request: Request) -> Response:
    _auth(request, READ)
    return _json([catalog_of(request).model.datacenter], catalog_of(request).model.index)


# -- health -----------------------------------------------------------------------------


@router.get("/v1/health/service/{name}")
async def health_service(request: Request, name: str) -> Response:
    _auth(request, READ)
    _check_dc(request)
    model = catalog_of(request).model
    await _block(request, lambda: model.service_index(name))
    entries = model.health_service(name, _flag(request, "passing"), _tags(request))
    return _json(entries, model.service_index(name))


# -- agent ------------------------------------------------------------------------------


@router.get("/v1/agent/services")
async def agent_services(request: Request) -> Response:
    _auth(request, READ)
    model = catalog_of(request).model
    services = {i: model.service_json(s, agent=True) for i, s in sorted(model.services.items())}
    return _json(services, model.services_index)


@router.get("/v1/agent/checks")
async def agent_checks(request: Request) -> Response:
    _auth(request, READ)
    model = catalog_of(request).model
    checks = {i: model.check_json(c, agent=True) for i, c in sorted(model.checks.items())}
    return _json(checks, model.index)


@router.put("/v1/agent/service/register")
async def agent_register(request: Request) -> Response:
    _auth(request, AGENT_WRITE)
    raw = await _body(request, MAX_REGISTRATION, "Request body too large")
    catalog = catalog_of(request)
    try:
        spec = service_from_json(json.loads(raw or b"null"))
    except (ValueError, UnicodeDecodeError) as exc:  # BadRequest and JSON errors alike
        text = str(exc) if isinstance(exc, BadRequest) else f"Request decode failed: {exc}"
        raise ConsulError(400, text) from None
    await catalog.register(spec)
    return Response(b"", 200, headers=_headers(catalog.model.index))


@router.put("/v1/agent/service/deregister/{service_id}")
async def agent_deregister(request: Request, service_id: str) -> Response:
    _auth(request, AGENT_WRITE)
    catalog = catalog_of(request)
    if not await catalog.deregister(service_id):
        raise ConsulError(404, f'Unknown service ID "{service_id}". Ensure that the service ID '
                          "is passed, not the service name.")  # fmt: skip
    return Response(b"", 200, headers=_headers(catalog.model.index))


async def _ttl(request: Request, check_id: str, status: str) -> Response:
    _auth(request, AGENT_WRITE)
    catalog = catalog_of(request)
    note = request.query_params.get("note", "")[:4096]
    try:
        catalog.update_ttl(check_id, status, note)
    except UnknownCheck:
        raise ConsulError(404, f'Unknown check ID "{check_id}"') from None
    except NotTtl:
        raise ConsulError(400, f'CheckID "{check_id}" does not have associated TTL') from None
    return Response(b"", 200, headers=_headers(catalog.model.index))


@router.put("/v1/agent/check/pass/{check_id}")
async def check_pass(request: Request, check_id: str) -> Response:
    return await _ttl(request, check_id, "passing")


@router.put("/v1/agent/check/warn/{check_id}")
async def check_warn(request: Request, check_id: str) -> Response:
    return await _ttl(request, check_id, "warning")


@router.put("/v1/agent/check/fail/{check_id}")
async def check_fail(request: Request, check_id: str) -> Response:
    return await _ttl(request, check_id, "critical")


# -- kv ---------------------------------------------------------------------------------


@router.get("/v1/kv/{key:path}")
async def kv_get(request: Request, key: str) -> Response:
    _auth(request, READ)
    _check_dc(request)
    model = catalog_of(request).model
    await _block(request, lambda: model.kv_index)
    if _flag(request, "keys"):
        keys = model.kv_keys(key, request.query_params.get("separator", ""))
        if not keys:
            raise ConsulError(404, "")
        return _json(keys, model.kv_index)
    entries = model.kv_get(key, _flag(request, "recurse"))
    if not entries:
        raise ConsulError(404, "")
    if _flag(request, "raw"):
        return Response(entries[0].value, 200, headers=_headers(model.kv_index))
    return _json([e.to_json() for e in entries], model.kv_index)


@router.put("/v1/kv/{key:path}")
async def kv_put(request: Request, key: str) -> Response:
    _auth(request, KV_WRITE)
    if not key:
        raise ConsulError(400, "Missing key name")
    flags = _uint(request, "flags") or 0
    cas = _uint(request, "cas")
    for unsupported in ("acquire", "release"):
        if unsupported in request.query_params:
            raise ConsulError(400, f"?{unsupported}: sessions are not supported here")
    value = await _body(request, MAX_KV_VALUE, f"Value exceeds {MAX_KV_VALUE} byte limit")
    catalog = catalog_of(request)
    ok = await catalog.kv_put(key, value, flags, cas)
    return _json(ok, catalog.model.kv_index)


@router.delete("/v1/kv/{key:path}")
async def kv_delete(request: Request, key: str) -> Response:
    _auth(request, KV_WRITE)
    recurse = _flag(request, "recurse")
    if not key and not recurse:
        raise ConsulError(400, "Missing key name")
    catalog = catalog_of(request)
    ok = await catalog.kv_delete(key, recurse, _uint(request, "cas"))
    return _json(ok, catalog.model.kv_index)


# -- status -----------------------------------------------------------------------------


@router.get("/v1/status/leader")
async def status_leader(request: Request) -> Response:
    model = catalog_of(request).model
    return _json(f"{model.node_address}:8300", model.index)


@router.get("/v1/status/peers")
async def status_peers(request: Request) -> Response:
    model = catalog_of(request).model
    return _json([f"{model.node_address}:8300"], model.index)

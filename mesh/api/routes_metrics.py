"""`GET /metrics`: the control plane's metrics in the Prometheus text format.

Needs no token, like the OpenAPI document: it holds counts, no audit data or policy text,
and scrapers rarely carry bearer tokens. It is served on the API's own address, which is
loopback unless `sluice up --listen` says otherwise. Not in the OpenAPI document: it is
text, not JSON (docs/api.md describes it).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from mesh.api.state import in_thread, state_of
from sidecar.prometheus import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics", include_in_schema=False, response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    state = state_of(request)
    sidecars = await in_thread(state.stores.sidecars.sidecars)
    stale = sum(bool(s["stale"]) for s in sidecars)
    text = state.metrics.render(
        state.watch.version, len(sidecars) - stale, stale, state.broker.subscribers
    )
    return PlainTextResponse(text, media_type=CONTENT_TYPE)

"""Audit routes: ingest batches, query with a cursor, stream live (SSE), export, stats."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mesh.api.auth import Reader, Sidecar
from mesh.api.errors import ApiError
from mesh.api.params import Filter, duration
from mesh.api.state import in_thread, state_of
from mesh.store.audit import GROUPS, MAX_LIMIT

router = APIRouter(tags=["audit"])
MAX_BATCH = 5000
# An SSE comment this often keeps idle streams open through proxies and notices gone clients.
KEEPALIVE = 15.0
EXPORT_CHUNK = 500


class IngestBody(BaseModel):
    events: list[Any]


@router.post("/v1/audit/events")
async def ingest(request: Request, body: IngestBody, _t: Sidecar) -> Any:
    if len(body.events) > MAX_BATCH:
        raise ApiError(413, f"{len(body.events)} events; send at most {MAX_BATCH} per batch")
    state = state_of(request)
    try:
        fresh, duplicates = await in_thread(state.stores.audit.ingest, body.events)
    except ValueError as exc:
        raise ApiError(422, f"{exc}; nothing stored", "invalid events") from None
    state.broker.publish(fresh)
    state.metrics.audit_batch(len(fresh), duplicates)
    return {"accepted": len(fresh), "duplicates": duplicates}


@router.get("/v1/audit/events")
async def query(
    request: Request,
    _t: Reader,
    filt: Filter,
    limit: int = Query(100, ge=1, le=MAX_LIMIT),
    cursor: str | None = Query(None, max_length=4096),
) -> Any:
    try:
        events, after = await in_thread(state_of(request).stores.audit.query, filt, limit, cursor)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid request") from None
    return {"events": events, "next_cursor": after}


@router.get("/v1/audit/stream", response_class=StreamingResponse)
async def stream(request: Request, filt: Filter, _t: Reader) -> StreamingResponse:
    """Server-sent events: one `data:` line of event JSON per ingested event. A reader too
    slow to keep up gets `event: dropped` with how many it missed."""
    state = state_of(request)
    sub = state.broker.subscribe(filt)

    async def events() -> AsyncIterator[str]:
        try:
            yield ": subscribed\n\n"
            while not sub.closed:
                batch = await sub.next_batch(KEEPALIVE)
                dropped = sub.take_dropped()
                if dropped:
                    yield f'event: dropped\ndata: {{"dropped": {dropped}}}\n\n'
                if batch:
                    yield "".join(f"data: {json.dumps(e)}\n\n" for e in batch)
                elif not sub.closed:
                    yield ": keepalive\n\n"
        finally:
            state.broker.unsubscribe(sub)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/v1/audit/export", response_class=StreamingResponse)
async def export(request: Request, filt: Filter, _t: Reader) -> StreamingResponse:
    """JSON lines, oldest first (read in pages in a worker thread)."""
    store = state_of(request).stores.audit

    def chunks() -> Iterator[str]:
        buf: list[str] = []
        for event in store.export(filt):
            buf.append(json.dumps(event))
            if len(buf) >= EXPORT_CHUNK:
                yield "\n".join(buf) + "\n"
                buf = []
        if buf:
            yield "\n".join(buf) + "\n"

    return StreamingResponse(chunks(), media_type="application/x-ndjson")


@router.get("/v1/stats")
async def stats(
    request: Request,
    _t: Reader,
    filt: Filter,
    window: str = Query("5m", max_length=32, description="e.g. 30s, 5m, 1h"),
    group_by: str = Query("", max_length=256, description=f"comma list of {', '.join(GROUPS)}"),
) -> Any:
    seconds = duration(window, "window")
    if seconds <= 0:
        raise ApiError(422, "window: must be longer than 0s", "invalid request")
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    try:
        return await in_thread(state_of(request).stores.audit.stats, seconds, groups, filt)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid request") from None

"""The quota service's API: sidecars lease tokens of mesh-wide rate limits (docs/api.md)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from mesh.api.auth import Sidecar
from mesh.api.errors import ApiError
from mesh.api.routes_policies import Text
from mesh.api.state import state_of
from mesh.quota import MAX_KEY, MAX_LEASES, LeaseRequest, QuotaUnavailable

log = logging.getLogger("sluice.quota")
router = APIRouter()
_BIG = 1e9  # no limit or lease in a real policy comes near this
Amount = Annotated[float, Field(ge=0, le=_BIG, allow_inf_nan=False)]


class LeaseItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: Text = Field(min_length=1, max_length=MAX_KEY)
    rate: float = Field(gt=0, le=_BIG, allow_inf_nan=False)
    per: float = Field(ge=1e-6, le=_BIG, allow_inf_nan=False)  # rate/per stays finite
    burst: float = Field(ge=1, le=_BIG, allow_inf_nan=False)
    want: Amount = 0.0
    returned: Amount = 0.0


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instance: Text = Field(min_length=1, max_length=256)
    leases: list[LeaseItem] = Field(max_length=MAX_LEASES)


@router.post("/v1/quota/lease", tags=["quota"])
async def lease(request: Request, body: LeaseBody, _t: Sidecar) -> Any:
    state = state_of(request)
    quota = state.quota
    items = [LeaseRequest(i.key, i.rate, i.per, i.burst, i.want, i.returned) for i in body.leases]
    try:
        grants = await quota.lease(body.instance, items)
    except QuotaUnavailable as exc:  # Redis down or slow: sidecars fall back to their share
        log.warning("quota backend failed: %s", exc)
        state.metrics.quota.failed(quota.name)
        raise ApiError(503, f"quota backend unavailable: {exc}") from None
    state.metrics.quota.leased(items, grants)
    return {"grants": [g.to_json() for g in grants]}

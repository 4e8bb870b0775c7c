"""What the API routes share: the stores, the notification hubs and the server's settings.

SQLite work runs in worker threads (`in_thread`), never on the event loop: an audit batch of
5,000 events takes tens of milliseconds, and blocking queries and live streams must keep
being served meanwhile. The stores serialise on one connection lock (mesh/store/db.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request

from mesh.api.hub import AuditBroker, PolicyWatch
from mesh.api.metrics import ApiMetrics
from mesh.quota import QuotaBackend, open_quota
from mesh.store import Stores

T = TypeVar("T")
DAY = 86400.0


@dataclass
class Settings:
    data_dir: str
    audit_retention: float = 30 * DAY
    retention_interval: float = 3600.0
    version: str = "0"
    quota: str | None = None  # quota backend: None (in-process) or a redis:// URL
    quota_prefix: str = "sluice:quota:"  # Redis key prefix of the global buckets


@dataclass
class ApiState:
    stores: Stores
    settings: Settings
    started: float
    watch: PolicyWatch
    broker: AuditBroker = field(default_factory=AuditBroker)
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    quota: QuotaBackend = field(default_factory=lambda: open_quota(None))
    # Called by `shutdown` to end other blocking queries at once (the Consul catalog's).
    releases: list[Callable[[], None]] = field(default_factory=list)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


def state_of(request: Request) -> ApiState:
    state: ApiState = request.app.state.sluice
    return state

"""The control API (docs/api.md): a FastAPI app over the stores in mesh/store.

`create_app(stores, settings)` builds the app; `sluice up` (mesh/up.py) serves it with
uvicorn. Routes live in routes_*.py, one area each; SQLite work runs in worker threads
(mesh/api/state.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from mesh.api import (
    errors,
    routes_admin,
    routes_audit,
    routes_consul,
    routes_metrics,
    routes_policies,
    routes_quota,
)
from mesh.api.hub import PolicyWatch
from mesh.api.metrics import MetricsMiddleware
from mesh.api.state import ApiState, Settings, in_thread
from mesh.quota import open_quota
from mesh.store import Stores

log = logging.getLogger("sluice.api")

__all__ = ["ApiState", "Settings", "create_app"]


def create_app(stores: Stores, settings: Settings) -> FastAPI:
    state = ApiState(
        stores=stores,
        settings=settings,
        started=time.time(),
        watch=PolicyWatch(stores.policies.current_version()),
        quota=open_quota(settings.quota, settings.quota_prefix),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_retention(state), name="audit-retention")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await shutdown(state)

    app = FastAPI(
        title="Sluice control API",
        version=settings.version,
        description="Policies, audit trail, tokens and sidecars of a Sluice mesh. See docs/api.md.",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.sluice = state
    errors.install(app)
    app.include_router(routes_admin.router)
    app.include_router(routes_policies.router)
    app.include_router(routes_audit.router)
    app.include_router(routes_quota.router)
    app.include_router(routes_metrics.router)  # GET /metrics, no token (docs/api.md)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    catalog = routes_consul.install(app, stores)  # Consul's API over the embedded catalog
    state.releases.append(catalog.release)
    return app


async def shutdown(state: ApiState) -> None:
    """End blocking queries and live streams now, so the server can stop without waiting."""
    state.broker.close()
    for release in state.releases:
        release()
    await state.watch.close()
    await state.quota.close()


async def _retention(state: ApiState) -> None:
    """Delete audit events older than the retention, at start and then every interval."""
    while True:
        cutoff = time.time() - state.settings.audit_retention
        try:
            n = await in_thread(state.stores.audit.delete_older_than, cutoff)
            if n:
                log.info("audit retention: deleted %d events older than %.0f", n, cutoff)
        except Exception:  # a failed sweep is retried next interval; serving goes on
            log.exception("audit retention failed")
        await asyncio.sleep(state.settings.retention_interval)

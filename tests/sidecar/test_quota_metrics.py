"""The sidecar's rate-limit series (sidecar/quota_metrics.py): scraped from the sidecar's
metrics registry while a `QuotaLimiter` leases keyed limits from a real `sluice up`, then
after the control plane goes away (the fair-share fallback)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from policies.engine import LimitTicket
from policies.spec import KeyAttribute, Limit, LimitKey, OnExceed, Scope
from sidecar.limits import KeyCap, Limiter
from sidecar.quota import QuotaLimiter
from sidecar.telemetry import SidecarMetrics
from tests.mesh.conftest import ControlPlane
from tests.promtext import Samples, parse, value

RULE = "budget/per-table"


def keyed(table: str, scope: Scope = Scope.SOURCE_APP) -> LimitTicket:
    limit = Limit(100, 1.0, 20, scope, OnExceed.REJECT, 0.0, LimitKey(KeyAttribute.TABLE))
    base = f"{RULE}|app=billing"
    return LimitTicket(RULE, f"{base}|table={table}", limit, None, table, f"{base}|table~other")


def scrape(metrics: SidecarMetrics) -> Samples:
    samples, types = parse(metrics.registry.render())
    assert types["sluice_sidecar_quota_fallback"] == "gauge"
    assert types["sluice_sidecar_quota_tokens_granted_total"] == "counter"
    return samples


def test_counters_follow_grants_returns_and_lapses() -> None:
    def no_client() -> httpx.AsyncClient:
        raise AssertionError("no lease requests here")

    q = QuotaLimiter("billing-1", no_client, clock=lambda: 0.0)
    metrics = SidecarMetrics()
    metrics.watch_limiter(q)
    metrics.watch_limiter(q)  # once per limiter: a second call adds no series
    orders, items = keyed("orders"), keyed("items")
    q.take((orders, items), 0.0)
    for t in (orders, items):
        q.apply([{"key": t.key, "tokens": 6, "expires_in": 1.0, "instances": 1}], 0.0)
    q.take((orders,), 0.1)
    s = scrape(metrics)
    assert value(s, "sluice_sidecar_quota_keys", rule=RULE) == 2
    assert value(s, "sluice_sidecar_quota_tokens_held", rule=RULE) == 5 + 4  # after the credit
    assert value(s, "sluice_sidecar_quota_tokens_granted_total") == 12
    q.take((items,), 0.9)
    q.due(0.9)  # orders idle since 0.1: its 4 tokens go back
    q.due(1.5)  # items' lease expired at 1.0 with 4 unused
    s = scrape(metrics)
    assert value(s, "sluice_sidecar_quota_tokens_returned_total") == 4
    assert value(s, "sluice_sidecar_quota_tokens_lapsed_total") == 4
    assert value(s, "sluice_sidecar_quota_tokens_held") == 0
    assert value(s, "sluice_sidecar_quota_fallback") == 0


def test_keyed_buckets_and_overflow_of_a_local_limiter() -> None:
    local = Limiter()
    local.keys = KeyCap(cap=1)
    metrics = SidecarMetrics()
    metrics.watch_limiter(local)
    for table in ("a", "b", "c"):
        local.take((keyed(table, Scope.SOURCE_INSTANCE),), 0.0)
    samples, types = parse(metrics.registry.render())
    assert "sluice_sidecar_quota_fallback" not in types  # no mesh-wide limits here
    assert value(samples, "sluice_sidecar_limit_keys") == 1
    assert value(samples, "sluice_sidecar_limit_overflow_total") == 2


def test_live_leases_then_fallback_when_the_control_plane_stops(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", "--no-dns").start()
    metrics = SidecarMetrics()

    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {cp.admin_token}"}
        async with httpx.AsyncClient(base_url=cp.url, headers=headers) as c:
            q = QuotaLimiter("billing-1", lambda: c)
            metrics.watch_limiter(q)
            task = asyncio.create_task(q.run())
            orders, items = keyed("orders"), keyed("items")
            try:
                deadline = time.monotonic() + 5
                while not all(
                    q.leases.get(t.key) and q.leases[t.key].leased for t in (orders, items)
                ):
                    assert time.monotonic() < deadline, "no grants"
                    q.take((orders, items), time.time())
                    await asyncio.sleep(0.01)
                s = scrape(metrics)
                assert value(s, "sluice_sidecar_quota_lease_requests_total") >= 1
                assert value(s, "sluice_sidecar_quota_tokens_granted_total") >= 2
                assert value(s, "sluice_sidecar_quota_keys", rule=RULE) == 2
                assert value(s, "sluice_sidecar_quota_fallback") == 0
                assert value(s, "sluice_sidecar_quota_lease_failures_total") == 0
                await asyncio.to_thread(cp.stop)
                deadline = time.monotonic() + 5
                while not q.fallback:
                    assert time.monotonic() < deadline, "no fallback"
                    q.take((orders,), time.time())
                    await asyncio.sleep(0.02)
                s = scrape(metrics)
                assert value(s, "sluice_sidecar_quota_fallback") == 1
                assert value(s, "sluice_sidecar_quota_lease_failures_total") >= 1
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        cp.stop()

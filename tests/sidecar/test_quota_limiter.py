"""`QuotaLimiter`: the hot path on leased tokens, lease bookkeeping, the fair-share
fallback, and recovery against a real `sluice up` started after the sidecar; attribute-keyed
tickets and the cap on their live buckets (`KeyCap`)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx

from policies.engine import LimitTicket
from policies.spec import KeyAttribute, Limit, LimitKey, OnExceed, Scope
from sidecar.config import ControlConfig, Route, SidecarConfig
from sidecar.limits import KEY_IDLE, KeyCap, Limiter
from sidecar.quota import QuotaLimiter
from sidecar.server import Sidecar
from tests.mesh.conftest import ControlPlane


def ticket(
    scope: Scope = Scope.SOURCE_APP,
    on_exceed: OnExceed = OnExceed.REJECT,
    rate: float = 100,
    burst: float = 20,
    key: str | None = None,
) -> LimitTicket:
    max_delay = 1.0 if on_exceed is OnExceed.DELAY else 0.0
    limit = Limit(rate, 1.0, burst, scope, on_exceed, max_delay)
    return LimitTicket("p/r", key or f"p/r|{scope.value}", limit, None)


def limiter() -> QuotaLimiter:
    def no_client() -> httpx.AsyncClient:
        raise AssertionError("no lease requests in this test")

    return QuotaLimiter("billing-1", no_client, clock=lambda: 0.0)


def grant(q: QuotaLimiter, key: str, tokens: float, now: float, instances: int = 1) -> None:
    q.apply([{"key": key, "tokens": tokens, "expires_in": 1.0, "instances": instances}], now)


def test_first_statement_on_credit_then_only_leased_tokens() -> None:
    q, t = limiter(), ticket()
    assert q.take((t,), 0.0).granted  # on credit: the first lease is on its way
    assert not q.take((t,), 0.0).granted
    grant(q, t.key, 3, 0.01)  # one of the three repays the credit
    assert [q.take((t,), 0.02).granted for _ in range(3)] == [True, True, False]


def test_source_instance_limits_stay_local() -> None:
    q, t = limiter(), ticket(Scope.SOURCE_INSTANCE, burst=2)
    assert [q.take((t,), 0.0).granted for _ in range(3)] == [True, True, False]
    assert not q.leases


def test_all_or_nothing_across_tickets() -> None:
    q = limiter()
    local, leased = ticket(Scope.SOURCE_INSTANCE, burst=1), ticket()
    q.take((leased,), 0.0)  # the credit
    assert not q.take((local, leased), 0.0).granted
    assert q.take((local,), 0.0).granted  # the local token was not taken above


def test_lapsed_tokens_are_dropped() -> None:
    q, t = limiter(), ticket()
    q.take((t,), 0.0)
    grant(q, t.key, 5, 0.0)
    assert q.take((t,), 0.5).granted
    assert not q.take((t,), 1.5).granted  # the lease expired at 1.0


def test_delay_waits_for_the_instances_share() -> None:
    q, t = limiter(), ticket(on_exceed=OnExceed.DELAY)
    q.take((t,), 0.0)
    grant(q, t.key, 1, 0.0, instances=4)  # repays the credit: 0 left
    out = q.take((t,), 0.0)
    assert out.granted and abs(out.delay - 1 / 25) < 1e-9  # 100/s over 4 instances
    assert q.leases[t.key].tokens == -1  # owed, asked for with the next lease


def test_due_asks_for_recent_demand_and_returns_idle_tokens() -> None:
    q, t = limiter(), ticket()
    q.take((t,), 0.0)
    (item,) = q.due(0.0)
    assert item["key"] == t.key and item["rate"] == 100 and item["want"] >= 1
    grant(q, t.key, 10, 0.0)
    for _ in range(5):
        q.take((t,), 0.05)
    assert q.due(0.06) == []  # plenty left and asked recently
    (item,) = q.due(0.2)
    assert item["want"] > 0 and item["returned"] == 0
    (item,) = q.due(0.9)  # no demand since 0.05: give back what is held
    assert item["want"] == 0 and item["returned"] == 4
    assert q.leases[t.key].tokens == 0


def test_fallback_is_a_fair_share_of_the_limit() -> None:
    q, t = limiter(), ticket(rate=100, burst=20)
    q.take((t,), 0.0)
    grant(q, t.key, 1, 0.0, instances=4)
    q._failed(OSError("down"))
    assert q.fallback
    granted = sum(q.take((t,), 1.0).granted for _ in range(100))
    assert granted == 5  # burst 20 / 4 instances
    granted = sum(q.take((t,), 2.0).granted for _ in range(100))
    assert granted == 5  # 25/s, capped by the share's burst of 5
    grant(q, t.key, 3, 2.0, instances=4)
    assert not q.fallback  # the first grant ends it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_falls_back_while_the_control_plane_is_down_and_recovers_without_restart(
    tmp_path: Path,
) -> None:
    port = _free_port()
    cp = ControlPlane(tmp_path / "cp", "--no-dns", "--listen", f"127.0.0.1:{port}")
    t = ticket(rate=50, burst=10)

    async def scenario() -> None:
        headers: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as c:
            q = QuotaLimiter("billing-1", lambda: c)
            task = asyncio.create_task(q.run())
            try:
                q.take((t,), time.time())
                for _ in range(100):
                    if q.fallback:
                        break
                    await asyncio.sleep(0.02)
                assert q.fallback, "no control plane: fall back"
                # unknown instance count: the whole limit, locally
                assert sum(q.take((t,), time.time()).granted for _ in range(30)) == 10
                await asyncio.to_thread(cp.start)
                headers["Authorization"] = f"Bearer {cp.admin_token}"
                c.headers["Authorization"] = headers["Authorization"]
                deadline = time.monotonic() + 10
                while q.fallback or q.leases[t.key].tokens < 1:
                    assert time.monotonic() < deadline, "did not recover"
                    q.take((t,), time.time())
                    await asyncio.sleep(0.05)
                assert q.leases[t.key].leased
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        cp.stop()


def test_a_sidecar_leases_with_a_control_plane_and_limits_locally_without(
    tmp_path: Path,
) -> None:
    route = Route("orders-db", "postgres", ("127.0.0.1", 0), ("127.0.0.1", 5432), 3.0)
    control = ControlConfig("http://127.0.0.1:1", "t", str(tmp_path / "state"))
    with_cp = Sidecar(SidecarConfig("billing", "billing-1", (), (route,), control=control))
    assert isinstance(with_cp.limiter, QuotaLimiter)
    policy = tmp_path / "p.yaml"
    policy.write_text("")
    alone = Sidecar(SidecarConfig("billing", "billing-1", (str(policy),), (route,)))
    assert type(alone.limiter) is Limiter
    assert all(rt.ctx.limiter is alone.limiter for rt in alone.routes)


def test_dry_run_tickets_report_what_they_would_have_done() -> None:
    local = Limiter()
    reject = ticket(Scope.SOURCE_INSTANCE, burst=2)
    assert [local.would((reject,), 0.0) for _ in range(3)] == [None, None, "reject"]
    paced = ticket(Scope.SOURCE_INSTANCE, OnExceed.DELAY, burst=1, key="paced|dry")
    assert [local.would((paced,), 0.0) for _ in range(2)] == [None, "delay"]
    q, leased = limiter(), ticket()  # a mesh-wide dry key is leased like any other
    assert [q.would((leased,), 0.0) for _ in range(2)] == [None, "reject"]
    assert leased.key in q.leases


def keyed(value: str, scope: Scope = Scope.SOURCE_APP, burst: float = 2) -> LimitTicket:
    """A ticket of a limit keyed by table, as the engine makes it."""
    key = LimitKey(KeyAttribute.TABLE)
    limit = Limit(10, 1.0, burst, scope, OnExceed.REJECT, 0.0, key)
    base = f"p/r|{scope.value}"
    return LimitTicket("p/r", f"{base}|table={value}", limit, None, value, f"{base}|table~other")


def test_keyed_tickets_are_leased_and_fall_back_as_separate_keys() -> None:
    q = limiter()
    a, b = keyed("a"), keyed("b")
    assert q.take((a, b), 0.0).granted  # both on credit
    items = {str(i["key"]): i for i in q.due(0.0)}
    assert set(items) == {"p/r|source-app|table=a", "p/r|source-app|table=b"}  # verbatim
    grant(q, a.key, 3, 0.01, instances=2)
    grant(q, b.key, 1, 0.01, instances=1)  # repays b's credit: nothing left
    assert q.take((a,), 0.02).granted
    assert not q.take((a, b), 0.02).granted  # all or none: a's token stays
    assert q.leases[a.key].tokens == 1
    q._failed(OSError("down"))
    # Each key its own fair share: burst 2 over the instances last reported for it.
    assert sum(q.take((a,), 1.0).granted for _ in range(10)) == 1
    assert sum(q.take((b,), 1.0).granted for _ in range(10)) == 2


def test_a_keyed_limit_keeps_at_most_max_keys_live_then_shares_an_overflow_bucket() -> None:
    local = Limiter()
    local.keys = KeyCap(cap=2)
    t = {v: keyed(v, Scope.SOURCE_INSTANCE, burst=1) for v in "abcd"}
    assert local.take((t["a"],), 0.0).granted and local.take((t["b"],), 0.0).granted
    assert local.take((t["c"],), 0.0).granted  # c: the overflow bucket's one token
    assert not local.take((t["d"],), 0.0).granted  # d shares it with c
    assert local.keys.overflowed == 2 and local.keys.live() == 2
    assert "p/r|source-instance|table=c" not in local.buckets._buckets
    # Two values beyond the cap in one statement: one token from the shared bucket.
    assert local.take((t["c"], t["d"]), 2.0).granted
    # a and b idle past KEY_IDLE: their places go to new values.
    assert local.take((t["c"],), KEY_IDLE + 1).granted
    assert local.keys.live() == 1 and local.keys.overflowed == 4
    q = limiter()  # the same cap on leased keys
    q.keys = KeyCap(cap=1)
    q.take((keyed("a"),), 0.0)
    q.take((keyed("b"),), 0.0)
    assert set(q.leases) == {"p/r|source-app|table=a", "p/r|source-app|table~other"}

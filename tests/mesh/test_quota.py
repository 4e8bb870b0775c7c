"""The quota service: the in-process and Redis backends (same semantics, real Redis), and
`POST /v1/quota/lease` on a real `sluice up`."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import httpx
import pytest
import redis

from mesh.quota import LEASE_TTL, LeaseRequest, QuotaUnavailable, lease_cap, open_quota
from mesh.quota.memory import MemoryQuota
from mesh.quota.redis_backend import RedisQuota

REDIS_URL = "redis://127.0.0.1:6379/0"


def req(want: float, returned: float = 0.0, key: str = "r|app=billing") -> LeaseRequest:
    return LeaseRequest(key, rate=200, per=1, burst=20, want=want, returned=returned)


def test_lease_cap_is_a_fraction_of_the_rate_split_between_instances() -> None:
    assert lease_cap(200, 1) == 40
    assert lease_cap(200, 4) == 10
    assert lease_cap(0.1, 1) == 1  # a slow limit still makes progress


def test_grants_are_bounded_by_want_cap_and_bucket() -> None:
    q = MemoryQuota()
    (g,) = q.lease_now("a", [req(5)], 100.0)
    assert (g.tokens, g.expires_in, g.instances) == (5, LEASE_TTL, 1)
    (g,) = q.lease_now("a", [req(1000)], 100.0)
    assert g.tokens == 15  # the rest of the burst of 20
    (g,) = q.lease_now("a", [req(1000)], 100.0)
    assert g.tokens == 0
    (g,) = q.lease_now("a", [req(1000)], 100.05)
    assert g.tokens == 10  # 50 ms at 200/s


def test_returned_tokens_go_back_capped_at_the_burst() -> None:
    q = MemoryQuota()
    q.lease_now("a", [req(20)], 10.0)
    (g,) = q.lease_now("a", [req(0, returned=7)], 10.0)
    assert g.tokens == 0
    (g,) = q.lease_now("b", [req(100)], 10.0)
    assert g.tokens == 7  # what a gave back
    (g,) = q.lease_now("b", [req(100, returned=1000)], 10.0)
    assert g.tokens == 20  # a return never fills the bucket past its burst


def test_active_instances_split_the_cap_and_lapse() -> None:
    q = MemoryQuota()
    for i in range(4):
        (g,) = q.lease_now(f"i{i}", [req(1)], 0.0)
    assert g.instances == 4
    (g,) = q.lease_now("i0", [req(1000)], 1.0)
    assert g.tokens == 10 and g.instances == 4
    (g,) = q.lease_now("i0", [req(1000)], 3.5)  # the other three went quiet
    assert g.instances == 1 and g.tokens == 20


def test_open_quota() -> None:
    assert isinstance(open_quota(None), MemoryQuota)
    assert isinstance(open_quota("memory"), MemoryQuota)
    with pytest.raises(ValueError, match="redis://"):
        open_quota("http://x")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable on {REDIS_URL} ({exc})")
    prefix = f"sluice-test-{secrets.token_hex(4)}:"
    yield prefix
    keys = list(client.scan_iter(prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_backend_shares_one_bucket_between_control_planes(redis_prefix: str) -> None:
    async def scenario() -> None:
        a, b = RedisQuota(REDIS_URL, redis_prefix), RedisQuota(REDIS_URL, redis_prefix)
        try:
            (g1,) = await a.lease("i1", [req(15)])
            (g2,) = await b.lease("i2", [req(15)])
            assert g1.tokens == 15
            assert 5 <= g2.tokens <= 6  # the burst's rest, plus what refilled meanwhile
            assert g2.instances == 2
            (g3,) = await a.lease("i1", [req(0, returned=10)])
            assert g3.tokens == 0
            (g4,) = await b.lease("i2", [req(1000)])
            assert 10 <= g4.tokens <= 12
            ttl = await a.redis.pttl(f"{redis_prefix}b:r|app=billing")
            assert 0 < ttl <= 61_000  # unused buckets go away
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_redis_backend_down_raises_so_the_api_answers_503() -> None:
    async def scenario() -> None:
        q = RedisQuota("redis://127.0.0.1:1/0", "x:")
        try:
            with pytest.raises(QuotaUnavailable):
                await q.lease("i", [req(1)])
        finally:
            await q.close()

    asyncio.run(scenario())


def test_lease_api(admin: httpx.Client) -> None:
    key = f"api-{secrets.token_hex(3)}|app=billing"
    body = {
        "instance": "billing-1",
        "leases": [{"key": key, "rate": 100, "per": 1, "burst": 4, "want": 3, "returned": 0}],
    }
    r = admin.post("/v1/quota/lease", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"grants": [{"key": key, "tokens": 3, "expires_in": 1.0, "instances": 1}]}
    r = admin.post("/v1/quota/lease", json=body)
    assert r.json()["grants"][0]["tokens"] == 1
    bad = {"instance": "x", "leases": [{"key": key, "rate": 0, "per": 1, "burst": 1}]}
    assert admin.post("/v1/quota/lease", json=bad).status_code == 422
    assert httpx.post(admin.base_url.join("/v1/quota/lease"), json=body).status_code == 401


KEYED = [  # keys of one attribute-keyed limit, as the engine makes them
    "p/per-table|app=billing|table=orders",
    "p/per-table|app=billing|table=order_items",
    "p/per-table|app=billing|table=",
    "p/by-path|app=billing|path=/ü/a%7Cb",
    "p/by-path|app=billing|path=/ü/a%7Cb|dry",
]


def test_keyed_keys_are_separate_buckets_in_both_backends(redis_prefix: str) -> None:
    memory = MemoryQuota()
    grants = memory.lease_now("a", [req(15, key=k) for k in KEYED], 0.0)
    assert [(g.key, g.tokens) for g in grants] == [(k, 15) for k in KEYED]

    async def scenario() -> None:
        q = RedisQuota(REDIS_URL, redis_prefix)
        try:
            grants = await q.lease("a", [req(15, key=k) for k in KEYED])
            assert [(g.key, g.tokens) for g in grants] == [(k, 15) for k in KEYED]
            for k in KEYED:  # the key reaches Redis unchanged
                assert await q.redis.exists(f"{redis_prefix}b:{k}") == 1
        finally:
            await q.close()

    asyncio.run(scenario())

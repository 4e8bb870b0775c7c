"""Token buckets: burst, refill, reservation with a bounded delay, bounded memory."""

from __future__ import annotations

import pytest

from policies.buckets import MAX_BUCKETS, Buckets, TokenBucket
from policies.spec import Limit, OnExceed, Scope

LIMIT = Limit(
    rate=10, per=1.0, burst=5, scope=Scope.SOURCE_APP, on_exceed=OnExceed.REJECT, max_delay=0
)


def test_burst_then_refill_at_rate() -> None:
    b = TokenBucket.full(LIMIT, now=100.0)
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(100.05)  # half a token
    assert b.take(100.1)  # one token per 0.1 s
    assert not b.take(100.1)
    # Refill stops at the burst size.
    b2 = TokenBucket.full(LIMIT, now=0.0)
    assert sum(b2.take(1000.0) for _ in range(10)) == 5


def test_rate_over_a_longer_period() -> None:
    per_minute = Limit(
        rate=60, per=60.0, burst=1, scope=Scope.GLOBAL, on_exceed=OnExceed.REJECT, max_delay=0
    )
    b = TokenBucket.full(per_minute, now=0.0)
    granted = sum(b.take(t / 10) for t in range(0, 100))  # 10 s in 0.1 s steps
    assert granted == 10  # the initial token, then one per second for 9.9 s


def test_reserve_waits_only_up_to_max_delay() -> None:
    b = TokenBucket.full(LIMIT, now=0.0)
    for _ in range(5):
        assert b.reserve(0.0, max_delay=0.25) == 0.0
    assert b.reserve(0.0, max_delay=0.25) == pytest.approx(0.1)
    assert b.reserve(0.0, max_delay=0.25) == pytest.approx(0.2)
    assert b.reserve(0.0, max_delay=0.25) is None  # would be 0.3 s: nothing is taken
    assert b.reserve(0.0, max_delay=0.35) == pytest.approx(0.3)
    assert b.wait_time(0.0) == pytest.approx(0.4)


def test_buckets_are_per_key_and_bounded() -> None:
    buckets = Buckets()
    a = buckets.get("r|app=a", LIMIT, 0.0)
    assert buckets.get("r|app=a", LIMIT, 5.0) is a
    assert buckets.get("r|app=b", LIMIT, 0.0) is not a
    for i in range(MAX_BUCKETS + 10):
        buckets.get(f"k{i}", LIMIT, 1.0)
    assert len(buckets) <= MAX_BUCKETS
    # A drained bucket survives eviction; full (idle) ones go first.
    drained = buckets.get("busy", LIMIT, 1.0)
    while drained.take(1.0):
        pass
    for i in range(MAX_BUCKETS):
        buckets.get(f"j{i}", LIMIT, 1.0)
    assert buckets.get("busy", LIMIT, 1.0) is drained and len(buckets) <= MAX_BUCKETS

"""The in-process quota backend: the embedded default of `sluice up`.

Global buckets are `policies.buckets.TokenBucket`s in one dict; the event loop serialises
calls, so a lease is atomic without a lock. State is lost on restart, which costs at most
one burst per key: sidecars keep enforcing their fair share meanwhile (sidecar/quota.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mesh.quota import ACTIVE_WINDOW, LEASE_TTL, Grant, LeaseRequest, lease_cap
from policies.buckets import MAX_BUCKETS, TokenBucket

# Instances remembered per key; more than this many live instances of one app is not a
# deployment we expect, and forgetting one only makes the others' caps a little smaller.
MAX_INSTANCES = 10_000


@dataclass(slots=True)
class _Key:
    bucket: TokenBucket
    seen: dict[str, float] = field(default_factory=dict)  # instance -> last asked

    def active(self, now: float) -> int:
        stale = [i for i, t in self.seen.items() if now - t > ACTIVE_WINDOW]
        for i in stale:
            del self.seen[i]
        return len(self.seen)


class MemoryQuota:
    """Global token buckets in this process."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._keys: dict[str, _Key] = {}

    async def lease(self, instance: str, leases: Sequence[LeaseRequest]) -> list[Grant]:
        return self.lease_now(instance, leases, self.clock())

    def lease_now(self, instance: str, leases: Sequence[LeaseRequest], now: float) -> list[Grant]:
        """The lease with an explicit clock (pure apart from the buckets it updates)."""
        return [self._one(instance, r, now) for r in leases]

    def _one(self, instance: str, r: LeaseRequest, now: float) -> Grant:
        rate = r.tokens_per_second
        k = self._keys.get(r.key)
        if k is None:
            if len(self._keys) >= MAX_BUCKETS:
                self._evict(now)
            k = self._keys[r.key] = _Key(TokenBucket(rate, r.burst, r.burst, now))
        b = k.bucket
        b._refill(now)
        b.rate, b.capacity = rate, r.burst  # a new policy version may change the limit
        b.tokens = min(b.capacity, b.tokens + max(0.0, r.returned))
        if r.want > 0 and (instance in k.seen or len(k.seen) < MAX_INSTANCES):
            k.seen[instance] = now
        active = k.active(now)
        grant = min(math.ceil(r.want), lease_cap(rate, active), math.floor(b.tokens + 1e-9))
        grant = max(0, grant)
        b.tokens = max(0.0, b.tokens - grant)
        return Grant(r.key, float(grant), LEASE_TTL, active)

    def _evict(self, now: float) -> None:
        # A full bucket nobody asked for lately carries no state: dropping it is invisible.
        for key, k in list(self._keys.items()):
            k.bucket._refill(now)
            if k.bucket.tokens >= k.bucket.capacity and not k.active(now):
                del self._keys[key]
        if len(self._keys) >= MAX_BUCKETS:
            self._keys.clear()

    async def close(self) -> None:
        self._keys.clear()

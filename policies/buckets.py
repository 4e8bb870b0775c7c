"""Token buckets with an explicit clock: the local half of every rate limit.

Pure: the caller passes the time. A sidecar holds one bucket per (rule, scope key); later
the mesh-wide quota service refills them with leases behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.spec import Limit

# Tolerance for float drift in refills: 10 * (100.1 - 100.05) is 0.49999999999996 tokens.
_EPSILON = 1e-9
# Bound on live buckets per process: scope keys come from app and instance names, so this
# is reached only by a caller inventing keys; idle buckets are dropped first.
MAX_BUCKETS = 100_000


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, limit: Limit, now: float) -> TokenBucket:
        return cls(limit.tokens_per_second, limit.burst, limit.burst, now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take n tokens if there are enough; never goes negative."""
        self._refill(now)
        if self.tokens >= n - _EPSILON:
            self.tokens = max(0.0, self.tokens - n)
            return True
        return False

    def wait_time(self, now: float, n: float = 1.0) -> float:
        """Seconds until n tokens will be there (0 when they are there now)."""
        self._refill(now)
        return 0.0 if self.tokens >= n - _EPSILON else (n - self.tokens) / self.rate

    def reserve(self, now: float, max_delay: float, n: float = 1.0) -> float | None:
        """Take n tokens, possibly from the future: returns the delay to wait before going
        ahead, or None when that delay would exceed max_delay (then nothing is taken)."""
        self._refill(now)
        delay = 0.0 if self.tokens >= n - _EPSILON else (n - self.tokens) / self.rate
        if delay > max_delay + _EPSILON:
            return None
        self.tokens -= n
        return delay


class Buckets:
    """All buckets of one process, keyed by the engine's LimitTicket.key."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def get(self, key: str, limit: Limit, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket.full(limit, now)
        return bucket

    def _evict(self, now: float) -> None:
        # A bucket that has refilled completely carries no state: dropping it is invisible.
        for key, b in list(self._buckets.items()):
            b._refill(now)
            if b.tokens >= b.capacity:
                del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)

"""The quota service: global token buckets the control plane leases to sidecars.

A mesh-wide limit (`scope: source-app`, `destination`, `global`) is one token bucket per
ticket key, held here; each sidecar keeps a local bucket for the statement hot path and
refills it with small leases (`POST /v1/quota/lease`, docs/api.md). One interface, two
backends: `MemoryQuota` (in-process, the embedded default) and `RedisQuota` (several
control-plane processes sharing one Redis). `open_quota(url)` picks one.

Lease sizing: a sidecar asks for what it expects to use before its next lease (its recent
demand); the service grants at most what the bucket holds and at most `lease_cap` tokens:
a `LEASE_FRACTION` of a second's rate, split between the instances asking for that key, so
an idle or a newly busy instance never finds the bucket hoarded by another. Granted tokens
expire after `LEASE_TTL` on the sidecar; a sidecar whose demand stops returns what it holds
with its next request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# A lease covers about this much of a second's rate (200/s: 40 tokens), shared by the
# instances asking: small enough that tokens parked on one sidecar are a small error.
LEASE_FRACTION = 0.2
# Seconds a granted token may stay unused on a sidecar before it lapses.
LEASE_TTL = 1.0
# An instance counts as active on a key while it asked for tokens in this many seconds.
ACTIVE_WINDOW = 2.0
# Bounds on one request, so a caller cannot make one call arbitrarily expensive.
MAX_LEASES = 1000
MAX_KEY = 512


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """One key's part of a lease request: the limit, what the sidecar wants, what it gives
    back (unused tokens of an earlier lease)."""

    key: str
    rate: float
    per: float
    burst: float
    want: float
    returned: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.rate / self.per


@dataclass(frozen=True, slots=True)
class Grant:
    """Tokens handed to one sidecar for one key; `instances` is how many instances asked
    for this key lately (the sidecar's fair share when the service is unreachable)."""

    key: str
    tokens: float
    expires_in: float
    instances: int

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "tokens": self.tokens,
            "expires_in": self.expires_in,
            "instances": self.instances,
        }


class QuotaUnavailable(Exception):
    """The backend cannot answer now (Redis down or slow); the API answers 503."""


class QuotaBackend(Protocol):
    """Where the global buckets live. `lease` is atomic per key across all callers and
    raises `QuotaUnavailable` when the backend cannot answer."""

    name: str  # "memory" or "redis": the `backend` label of the quota metrics

    async def lease(self, instance: str, leases: Sequence[LeaseRequest]) -> list[Grant]: ...

    async def close(self) -> None: ...


def lease_cap(tokens_per_second: float, instances: int) -> float:
    """The most one lease may carry: a fraction of a second's rate, split between the
    instances asking; at least one token so a slow limit still makes progress."""
    return max(1.0, math.floor(tokens_per_second * LEASE_FRACTION / max(1, instances)))


def open_quota(url: str | None, prefix: str = "sluice:quota:") -> QuotaBackend:
    """`None` or `memory`: in-process. `redis://host:port/db`: Redis, keys under prefix."""
    if url is None or url in ("", "memory"):
        from mesh.quota.memory import MemoryQuota

        return MemoryQuota()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from mesh.quota.redis_backend import RedisQuota

        return RedisQuota(url, prefix)
    raise ValueError(f"--quota: expected 'memory' or a redis:// URL, got {url!r}")


__all__ = [
    "ACTIVE_WINDOW",
    "LEASE_TTL",
    "MAX_LEASES",
    "Grant",
    "LeaseRequest",
    "QuotaBackend",
    "QuotaUnavailable",
    "lease_cap",
    "open_quota",
]

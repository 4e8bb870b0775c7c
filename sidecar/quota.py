"""Mesh-wide rate limits on the sidecar: local buckets refilled by leases from the control
plane's quota service (mesh/quota, `POST /v1/quota/lease` in docs/api.md).

`QuotaLimiter` keeps `Limiter.take`'s contract, so sessions do not know which one they
have. The hot path touches only local state: a leased key is a counter of tokens granted
and not yet used. A background task (`run`) batches one lease request for every key due:
at least every `LEASE_PERIOD` while the key is in demand, sooner (`MIN_GAP`) when its
tokens run low. It asks for the demand of the last interval, scaled to `LEASE_AHEAD`
seconds; a key whose demand stopped returns its tokens with the next request, and granted
tokens lapse after the lease's `expires_in` anyway.

Scopes: `source-instance` never leaves the process (the parent `Limiter`'s buckets);
`source-app`, `destination` and `global` are leased under the engine's ticket key, which
already names the app or destination, so every instance of an app draws from one bucket.
A limit keyed by an attribute (`limit.key: table`) has one ticket key per value
(`...|app=billing|table=orders`), leased, shared and fallen back on like any other key;
`KeyCap` (sidecar/limits.py) bounds how many of them one limit keeps live.

Fallback: when a lease request fails (control plane or its Redis unreachable, timeout,
non-200), every leased key switches to a local token bucket with a fair share of the
limit: rate and burst divided by the number of instances the quota service last reported
active on that key, or the whole limit when it never answered. Requests go on with
backoff (capped at `BACKOFF_CAP`); the first grant switches back, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from policies.buckets import MAX_BUCKETS, TokenBucket
from policies.engine import LimitTicket
from policies.spec import Limit, OnExceed, Scope
from sidecar.control import Backoff
from sidecar.limits import GRANTED, Limiter, LimitOutcome

log = logging.getLogger("sluice.quota")

LEASE_PERIOD = 0.1  # a key in demand is leased at least this often
MIN_GAP = 0.05  # an early refill (tokens low) comes no sooner than this after the last ask
LEASE_AHEAD = 0.2  # ask for this many seconds of recent demand
LOW_WATER = 0.25  # "low": fewer tokens than this fraction of the last grant
IDLE_AFTER = 0.5  # no demand this long: return the tokens held
FORGET_AFTER = 60.0  # no demand this long: drop the key's state
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 2.0
TIMEOUT = httpx.Timeout(0.5, connect=0.5)  # a slow answer is as good as none: fall back
MAX_PER_REQUEST = 1000  # the API's bound on leases per request
_EPSILON = 1e-9


@dataclass(slots=True)
class _Lease:
    """One leased key: tokens granted and not yet used (negative: owed by a delay)."""

    limit: Limit
    tokens: float = 0.0
    expires: float = 0.0
    demand: float = 0.0  # tokens asked for (granted or not) since the last lease request
    last_ask: float = -math.inf  # never
    last_use: float = 0.0
    last_grant: float = 0.0
    instances: int = 0  # active instances on the key, as the quota service last said
    leased: bool = False  # a grant has arrived (before that, one statement on credit)
    lapsed: float = 0.0  # tokens dropped unused, not yet added to QuotaLimiter.lapsed

    def lapse(self, now: float) -> None:
        if now >= self.expires and self.tokens > 0:
            # The lease lapsed: its tokens may be someone else's by now.
            self.lapsed += self.tokens
            self.tokens = 0.0

    def wait(self, now: float) -> float:
        self.lapse(now)
        if self.tokens >= 1 - _EPSILON or (not self.leased and self.tokens > -_EPSILON):
            return 0.0
        share = self.limit.tokens_per_second / max(1, self.instances)
        return (1 - self.tokens) / share


class QuotaLimiter(Limiter):
    """A `Limiter` whose mesh-wide buckets live in the control plane's quota service."""

    def __init__(
        self,
        instance: str,
        client: Callable[[], httpx.AsyncClient],
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.instance = instance
        self.client = client
        self.clock = clock  # the sessions' clock (RouteContext.clock)
        self.leases: dict[str, _Lease] = {}
        self.fallback = False  # leasing failed: keys use their fair share locally
        self._shares: dict[str, TokenBucket] = {}
        self._wake = asyncio.Event()
        # Running totals for the sidecar's metrics (sidecar/quota_metrics.py).
        self.requests = 0
        self.failures = 0
        self.granted = 0.0
        self.returned = 0.0
        self.lapsed = 0.0

    # the hot path

    def take(self, tickets: tuple[LimitTicket, ...], now: float) -> LimitOutcome:
        """Take one token per ticket, all or none; a delay ticket may wait up to max_delay."""
        if not tickets:
            return GRANTED
        plan: list[tuple[LimitTicket, TokenBucket | _Lease]] = []
        delay = 0.0
        for t in tickets:
            key = t.key if t.overflow is None else self.keys.key(t, now)
            holder: TokenBucket | _Lease
            if t.limit.scope is Scope.SOURCE_INSTANCE:
                holder = self.buckets.get(key, t.limit, now)
                wait = holder.wait_time(now)
            else:
                lease = self._lease(key, t.limit, now)
                lease.demand += 1
                lease.last_use = now
                if self.fallback:
                    holder = self._share(key, lease, now)
                    wait = holder.wait_time(now)
                else:
                    holder = lease
                    wait = lease.wait(now)
                    if lease.tokens < max(1.0, lease.last_grant * LOW_WATER):
                        self._wake.set()
            if wait > 0 and (t.limit.on_exceed is OnExceed.REJECT or wait > t.limit.max_delay):
                return LimitOutcome(False, 0.0, t)
            delay = max(delay, wait)
            if t.overflow is None or not any(holder is h for _, h in plan):
                plan.append((t, holder))  # (keyed values may share an overflow bucket)
        for t, holder in plan:
            if isinstance(holder, TokenBucket):
                holder.reserve(now, t.limit.max_delay)
            else:
                holder.tokens -= 1
        return LimitOutcome(True, delay, None)

    def _lease(self, key: str, limit: Limit, now: float) -> _Lease:
        lease = self.leases.get(key)
        if lease is None:
            if len(self.leases) >= MAX_BUCKETS:
                self._forget(now, 0.0)
            lease = self.leases[key] = _Lease(limit, last_use=now)
            self._wake.set()  # a first lease right away, not at the next period
        elif lease.limit != limit:
            lease.limit = limit  # a new policy version changed the limit
            self._shares.pop(key, None)
        return lease

    def _share(self, key: str, lease: _Lease, now: float) -> TokenBucket:
        """The fair local share of a leased key while the quota service is unreachable."""
        bucket = self._shares.get(key)
        if bucket is None:
            n = max(1, lease.instances)
            rate = lease.limit.tokens_per_second / n
            burst = max(1.0, lease.limit.burst / n)
            # Full, like any new bucket: the instances together pass at most one burst more
            # as the fallback begins (leased tokens still held are dropped).
            bucket = self._shares[key] = TokenBucket(rate, burst, burst, now)
        return bucket

    # the background task

    async def run(self) -> None:
        """Lease for every key due, for good; start it as a task, cancel it to stop."""
        backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEASE_PERIOD / 2):
                    await self._wake.wait()
            self._wake.clear()
            now = self.clock()
            batch = self.due(now)
            if not batch:
                continue
            try:
                grants = await self._send(batch)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                self._failed(exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.apply(grants, self.clock())

    def due(self, now: float) -> list[dict[str, object]]:
        """The lease request items for every key that needs one now (and their bookkeeping:
        demand reset, tokens handed back)."""
        out: list[dict[str, object]] = []
        for key, lease in list(self.leases.items()):
            if len(out) >= MAX_PER_REQUEST:
                break
            lease.lapse(now)
            self.lapsed += lease.lapsed
            lease.lapsed = 0.0
            returned = 0.0
            if now - lease.last_use > IDLE_AFTER:
                if lease.tokens <= 0 and now - lease.last_use > FORGET_AFTER:
                    del self.leases[key]
                    self._shares.pop(key, None)
                    continue
                if lease.tokens > 0:
                    returned, lease.tokens = lease.tokens, 0.0
                    self.returned += returned
                want = 0.0  # idle: only a debt left by delays is still asked for
                if returned == 0 and lease.tokens >= 0:
                    continue
            else:
                since = now - lease.last_ask
                low = lease.tokens < max(1.0, lease.last_grant * LOW_WATER)
                if since < LEASE_PERIOD and not (low and since >= MIN_GAP):
                    continue
                elapsed = min(max(since, LEASE_PERIOD), 1.0)
                want = math.ceil(lease.demand / elapsed * LEASE_AHEAD - lease.tokens)
                if want <= 0:
                    continue
            lease.demand = 0.0
            lease.last_ask = now
            limit = lease.limit
            out.append(
                {
                    "key": key,
                    "rate": limit.rate,
                    "per": limit.per,
                    "burst": limit.burst,
                    "want": float(max(0.0, want - min(0.0, lease.tokens))),
                    "returned": returned,
                }
            )
        return out

    async def _send(self, batch: list[dict[str, object]]) -> list[dict[str, object]]:
        self.requests += 1
        response = await self.client().post(
            "/v1/quota/lease",
            json={"instance": self.instance, "leases": batch},
            timeout=TIMEOUT,
        )
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
        grants = response.json()["grants"]
        if not isinstance(grants, list):
            raise TypeError("quota answer: grants must be a list")
        return grants

    def apply(self, grants: list[dict[str, object]], now: float) -> None:
        """Add granted tokens to their keys; the first grant after a failure ends fallback."""
        for g in grants:
            lease = self.leases.get(str(g["key"]))
            if lease is None:
                continue  # forgotten meanwhile: the tokens lapse
            tokens = float(g["tokens"])  # type: ignore[arg-type]
            lease.lapse(now)
            lease.tokens += tokens
            self.granted += tokens
            lease.expires = now + float(g["expires_in"])  # type: ignore[arg-type]
            lease.instances = int(g.get("instances", 0))  # type: ignore[call-overload]
            lease.last_grant = tokens
            lease.leased = True
        if self.fallback:
            log.info("quota service reachable again: leasing mesh-wide limits")
            self.fallback = False
            self._shares.clear()

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not self.fallback:
            log.warning(
                "quota lease failed (%s): each limit falls back to a fair local share "
                "(rate / instances last reported) until the quota service answers",
                str(exc) or type(exc).__name__,
            )
            self.fallback = True

    def _forget(self, now: float, idle: float) -> None:
        for key, lease in list(self.leases.items()):
            if now - lease.last_use > idle and lease.tokens <= 0:
                self.lapsed += lease.lapsed
                del self.leases[key]
        if len(self.leases) >= MAX_BUCKETS:
            self.leases.clear()

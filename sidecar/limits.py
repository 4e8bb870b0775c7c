"""Apply the engine's limit tickets to local token buckets: grant, reject or delay.

`Limiter` holds the buckets of a sidecar without a control plane, and of every
`source-instance` limit; `QuotaLimiter` (sidecar/quota.py) keeps this interface for limits
leased mesh-wide. Both bound attribute-keyed buckets with `KeyCap`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from policies.buckets import MAX_BUCKETS, Buckets, TokenBucket
from policies.engine import LimitTicket
from policies.spec import OnExceed

log = logging.getLogger("sluice.limits")

# Live buckets of one keyed limit (one rule and scope key) in one sidecar. Key values come
# from traffic (tables, paths, header values), so without a cap a client inventing values
# grows memory here, in the quota service and in every lease request. 1,000 is the lease
# API's bound on keys per request (mesh/quota MAX_LEASES): one request can carry them all.
MAX_KEYS = 1000
# A keyed bucket unused this long gives its place under MAX_KEYS to a new value (its state
# stays where it is: a leased key's in the quota service, a local one in `Buckets`).
KEY_IDLE = 60.0
# When a limit is full, idle keys are looked for at most this often (each look is O(keys)).
SWEEP_EVERY = 1.0


@dataclass(frozen=True, slots=True)
class LimitOutcome:
    granted: bool
    delay: float  # seconds to hold the request before forwarding (0: go now)
    exceeded: LimitTicket | None  # the ticket that could not be granted


GRANTED = LimitOutcome(True, 0.0, None)


class KeyCap:
    """At most `cap` live buckets per keyed limit. A value beyond it, while the others are
    in use, shares the limit's overflow bucket (`table~other`) with every other such value:
    limited together, never unlimited. Logged once per limit; counted in `overflowed`."""

    def __init__(self, cap: int = MAX_KEYS) -> None:
        self.cap = cap
        self._live: dict[str, dict[str, float]] = {}  # overflow key -> {key: last use}
        self._swept: dict[str, float] = {}
        self._warned: set[str] = set()
        self.overflowed = 0  # tickets sent to an overflow bucket

    def key(self, t: LimitTicket, now: float) -> str:
        """The bucket `t` draws from: its own, or its limit's overflow bucket."""
        group = t.overflow
        if group is None:
            return t.key
        live = self._live.get(group)
        if live is None:
            if len(self._live) >= MAX_BUCKETS:
                self._live.clear()
            live = self._live[group] = {}
        if t.key in live or len(live) < self.cap or self._sweep(group, live, now):
            live[t.key] = now
            return t.key
        self.overflowed += 1
        if group not in self._warned and len(self._warned) < MAX_BUCKETS:
            self._warned.add(group)
            log.warning(
                "limit %s: more than %d %s buckets in use; new values share the bucket %s "
                "until some go idle for %.0f s",
                t.rule_id,
                self.cap,
                t.limit.key.name if t.limit.key else "keyed",
                group,
                KEY_IDLE,
            )
        return group

    def _sweep(self, group: str, live: dict[str, float], now: float) -> bool:
        """Drop idle keys (at most every SWEEP_EVERY); True when there is room now."""
        if now - self._swept.get(group, -math.inf) < SWEEP_EVERY:
            return False
        self._swept[group] = now
        for key, last in list(live.items()):
            if now - last > KEY_IDLE:
                del live[key]
        return len(live) < self.cap

    def live(self) -> int:
        """Keyed buckets in use, over all limits."""
        return sum(len(v) for v in self._live.values())


class Limiter:
    def __init__(self) -> None:
        self.buckets = Buckets()
        self.keys = KeyCap()

    def take(self, tickets: tuple[LimitTicket, ...], now: float) -> LimitOutcome:
        """Take one token per ticket, all or none; a delay ticket may wait up to max_delay."""
        if not tickets:
            return GRANTED
        buckets = [
            self.buckets.get(t.key if t.overflow is None else self.keys.key(t, now), t.limit, now)
            for t in tickets
        ]
        delay = 0.0
        for t, b in zip(tickets, buckets, strict=True):
            wait = b.wait_time(now)
            if wait > 0 and (t.limit.on_exceed is OnExceed.REJECT or wait > t.limit.max_delay):
                return LimitOutcome(False, 0.0, t)
            delay = max(delay, wait)
        shared: list[TokenBucket] = []  # keyed values may share an overflow bucket
        for t, b in zip(tickets, buckets, strict=True):
            if t.overflow is not None:
                if any(b is s for s in shared):
                    continue  # one token per bucket
                shared.append(b)
            b.reserve(now, t.limit.max_delay)
        return LimitOutcome(True, delay, None)

    def would(self, tickets: tuple[LimitTicket, ...], now: float) -> str | None:
        """Check dry-run tickets (the engine's `dry_limits`, keys of their own) as `take`
        would: "reject", "delay", or None when granted. Never refuses or holds anything;
        tokens are taken as an enforcing limit would, so the bucket tracks real traffic."""
        outcome = self.take(tickets, now)
        if not outcome.granted:
            return "reject"
        return "delay" if outcome.delay > 0 else None

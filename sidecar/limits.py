"""Apply the engine's limit tickets to local token buckets: grant, reject or delay.

Local for now; the mesh-wide quota service (a later issue) refills the same buckets with
leases, behind this interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.buckets import Buckets
from policies.engine import LimitTicket
from policies.spec import OnExceed


@dataclass(frozen=True, slots=True)
class LimitOutcome:
    granted: bool
    delay: float  # seconds to hold the request before forwarding (0: go now)
    exceeded: LimitTicket | None  # the ticket that could not be granted


GRANTED = LimitOutcome(True, 0.0, None)


class Limiter:
    def __init__(self) -> None:
        self.buckets = Buckets()

    def take(self, tickets: tuple[LimitTicket, ...], now: float) -> LimitOutcome:
        """Take one token per ticket, all or none; a delay ticket may wait up to max_delay."""
        if not tickets:
            return GRANTED
        buckets = [self.buckets.get(t.key, t.limit, now) for t in tickets]
        delay = 0.0
        for t, b in zip(tickets, buckets, strict=True):
            wait = b.wait_time(now)
            if wait > 0 and (t.limit.on_exceed is OnExceed.REJECT or wait > t.limit.max_delay):
                return LimitOutcome(False, 0.0, t)
            delay = max(delay, wait)
        for t, b in zip(tickets, buckets, strict=True):
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

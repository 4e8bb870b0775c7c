"""In-process notification: policy version changes and the live audit feed.

`PolicyWatch` wakes blocking queries (`GET /v1/sidecar/policies?index=N`) when a new version
is applied. `AuditBroker` fans ingested events out to live-stream subscribers; each
subscriber has a bounded queue that drops its oldest events when the reader is slow, so a
slow subscriber never holds up ingest (it is told how many it missed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from typing import Any

from mesh.store.audit import AuditFilter

SUBSCRIBER_QUEUE = 10_000


class PolicyWatch:
    def __init__(self, version: int) -> None:
        self.version = version
        self.closing = False
        self._cond = asyncio.Condition()

    async def changed(self, version: int) -> None:
        async with self._cond:
            self.version = max(self.version, version)
            self._cond.notify_all()

    async def wait(self, index: int, timeout: float) -> None:
        """Return when the version differs from `index`, after `timeout`, or on shutdown."""
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self.version != index or self.closing), timeout
                )

    async def close(self) -> None:
        async with self._cond:
            self.closing = True
            self._cond.notify_all()


class Subscription:
    def __init__(self, filt: AuditFilter, size: int) -> None:
        self.filter = filt
        self.queue: deque[dict[str, Any]] = deque(maxlen=size)
        self.dropped = 0
        self.closed = False
        self.ready = asyncio.Event()

    def put(self, event: dict[str, Any]) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(event)
        self.ready.set()

    async def next_batch(self, timeout: float) -> list[dict[str, Any]]:
        """What arrived since the last call; [] after `timeout` or when closed."""
        if not self.queue and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), timeout)
        self.ready.clear()
        batch = list(self.queue)
        self.queue.clear()
        return batch

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n


class AuditBroker:
    def __init__(self, queue_size: int = SUBSCRIBER_QUEUE) -> None:
        self.queue_size = queue_size
        self._subs: set[Subscription] = set()

    def subscribe(self, filt: AuditFilter) -> Subscription:
        sub = Subscription(filt, self.queue_size)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, events: Iterable[dict[str, Any]]) -> None:
        if not self._subs:
            return
        for event in events:
            for sub in self._subs:
                if sub.filter.matches(event):
                    sub.put(event)

    def close(self) -> None:
        for sub in self._subs:
            sub.closed = True
            sub.ready.set()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

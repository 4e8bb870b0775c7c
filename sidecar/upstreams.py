"""Picking an upstream instance for a route whose upstream is a catalog service.

`Picker` is pure (no sockets, no threads, no clock of its own): the catalog watch
(sidecar/catalog.py) hands it the healthy instances with `update`, the driver asks `pick`
for the next one, reports `failed` when a connect to an instance failed, `reset` when an
open connection was reset (or broke with an error), and `opened`/`closed` around each
session (for least-connections). Only the event loop's thread calls it, so the data path
reads the current list and never waits on HTTP.

Balancing: round robin (default) over the healthy instances, or least-connections (fewest
open sessions through this sidecar; ties in round-robin order). Passive health: an
instance is ejected for `eject_seconds` and offered again after when a connect to it is
refused, reset or times out; when it resets a connection before sending a byte; or when it
resets `RESETS_TO_EJECT` sessions within `RESET_WINDOW` seconds. A clean close (FIN) never
counts: servers close idle and finished sessions. When every instance is ejected, none is
offered (the app gets the connection-failure error naming the service) until the first
ejection expires.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sidecar.config import ServiceUpstream

# Resets of sessions that had started (the server had answered) are ambiguous one at a
# time: a server restarting, a killed backend, a proxy timing out. Several within a short
# window mean the instance is unwell; a reset before any answer already does.
RESETS_TO_EJECT = 3
RESET_WINDOW = 30.0  # seconds


@dataclass(frozen=True, slots=True)
class Instance:
    """One healthy instance of a service, as the catalog lists it."""

    id: str
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.id} ({host}:{self.port})"


class Picker:
    """Round robin or least-connections over a service's instances, with ejection."""

    def __init__(self, service: ServiceUpstream) -> None:
        self.service = service
        self.instances: tuple[Instance, ...] = ()
        self.synced = False  # the catalog has answered at least once
        self._next = 0  # round-robin position
        self._ejected: dict[Instance, float] = {}  # instance -> until (monotonic seconds)
        self._open: dict[Instance, int] = {}  # open sessions per instance
        self._resets: dict[Instance, deque[float]] = {}  # recent mid-session resets

    def update(self, instances: tuple[Instance, ...]) -> None:
        """The catalog's current healthy instances. Ejections and session counts of
        instances that are still listed are kept."""
        self.instances = instances
        self.synced = True
        self._ejected = {i: t for i, t in self._ejected.items() if i in instances}
        self._resets = {i: r for i, r in self._resets.items() if i in instances}

    def pick(self, now: float, exclude: frozenset[Instance] = frozenset()) -> Instance | None:
        """The instance for a new connection, or None when no healthy one is left.
        `exclude`: instances this connection already failed on."""
        candidates = self._available(now, exclude)
        if not candidates:
            return None
        n = len(self.instances)
        if self.service.balance == "least-connections":
            fewest = min(self._open.get(i, 0) for i in candidates)
            candidates = [i for i in candidates if self._open.get(i, 0) == fewest]
        # Round robin: the first candidate at or after the cursor, in catalog order.
        order = {inst: (pos - self._next) % n for pos, inst in enumerate(self.instances)}
        chosen = min(candidates, key=order.__getitem__)
        self._next = (self.instances.index(chosen) + 1) % n
        return chosen

    def _available(self, now: float, exclude: frozenset[Instance]) -> list[Instance]:
        for inst, until in list(self._ejected.items()):
            if until <= now:
                del self._ejected[inst]  # expired: offered again
        return [i for i in self.instances if i not in self._ejected and i not in exclude]

    def failed(self, instance: Instance, now: float) -> None:
        """A connect to `instance` was refused, reset or timed out: leave it out for a while."""
        self._ejected[instance] = now + self.service.eject_seconds
        self._resets.pop(instance, None)

    def reset(self, instance: Instance, now: float, answered: bool) -> bool:
        """A connection to `instance` was reset or broke with an error; `answered`: the server
        had sent something first. Returns whether the instance is now ejected."""
        if not answered:
            self.failed(instance, now)
            return True
        recent = self._resets.setdefault(instance, deque())
        recent.append(now)
        while recent and recent[0] <= now - RESET_WINDOW:
            recent.popleft()
        if len(recent) < RESETS_TO_EJECT:
            return False
        self.failed(instance, now)
        return True

    def ejected(self, now: float) -> list[Instance]:
        """Instances left out at `now`."""
        return [i for i, until in self._ejected.items() if until > now]

    def opened(self, instance: Instance) -> None:
        """A session to `instance` is open."""
        self._open[instance] = self._open.get(instance, 0) + 1

    def closed(self, instance: Instance) -> None:
        """A session to `instance` ended."""
        left = self._open.get(instance, 0) - 1
        if left > 0:
            self._open[instance] = left
        else:
            self._open.pop(instance, None)

    def open_sessions(self, instance: Instance) -> int:
        return self._open.get(instance, 0)

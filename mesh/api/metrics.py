"""The control plane's metrics, served in the Prometheus text format at `GET /metrics`.

- `sluice_api_requests_total{route,method,status}` and
  `sluice_api_request_duration_ms{route,method}`: every HTTP request, counted by a pure ASGI
  middleware. `route` is the route's template (`/v1/policies/{version}`), never the raw
  path, so the label set stays bounded; a path no route matches is `unmatched`. A
  streamed answer (the live audit stream, export) is timed until its last byte.
- `sluice_audit_events_ingested_total`, `sluice_audit_duplicates_total`,
  `sluice_audit_batches_total`: what `POST /v1/audit/events` stored and dropped.
- `sluice_policy_version`, `sluice_sidecars{state="live"|"stale"}`,
  `sluice_audit_stream_subscribers`: read when scraped.
- The quota service (`QuotaMetrics`): `sluice_quota_leases_total{rule}` (lease items
  answered), `sluice_quota_tokens_{wanted,granted,returned}_total{rule}`,
  `sluice_quota_backend_errors_total{backend}` (the lease answered 503) and
  `sluice_quota_active_keys{rule}` (keys leased here in the last `ACTIVE_KEYS_WINDOW`).
  `rule` is the ticket key's rule id, never the key itself (keys may carry data values).

Pure bookkeeping over `sidecar.prometheus` (no I/O); mesh/api/routes_metrics.py serves it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh.quota import Grant, LeaseRequest
from policies.buckets import MAX_BUCKETS
from sidecar.prometheus import Counter, Gauge, Histogram, Registry

# A key counts as active on this control plane while it was leased in this many seconds:
# longer than a sidecar's lease period (0.1 s) and its idle return (0.5 s), so a key in use
# never drops out between scrapes.
ACTIVE_KEYS_WINDOW = 10.0


class ApiMetrics:
    """Counters kept as requests are served, plus gauges read from the API's state."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.requests = self.registry.add(
            Counter(
                "sluice_api_requests",
                "Control API requests by route template, method and status.",
                ("route", "method", "status"),
            )
        )
        self.duration = self.registry.add(
            Histogram(
                "sluice_api_request_duration_ms",
                "Control API request duration in milliseconds, to the answer's last byte.",
                ("route", "method"),
            )
        )
        self.ingested = self.registry.add(
            Counter("sluice_audit_events_ingested", "Audit events stored (new ids).")
        )
        self.duplicates = self.registry.add(
            Counter("sluice_audit_duplicates", "Audit events dropped as already stored.")
        )
        self.batches = self.registry.add(
            Counter("sluice_audit_batches", "Audit batches acknowledged.")
        )
        # What the gauges show: taken from the API's state at each scrape (`render`).
        self._policy_version = 0
        self._live = self._stale = self._subscribers = 0
        self.registry.add(
            Gauge(
                "sluice_policy_version",
                "The current policy version.",
                lambda: [((), self._policy_version)],
            )
        )
        self.registry.add(
            Gauge(
                "sluice_sidecars",
                "Registered sidecars by state (stale: no heartbeat for 3 intervals).",
                lambda: [(("live",), self._live), (("stale",), self._stale)],
                ("state",),
            )
        )
        self.registry.add(
            Gauge(
                "sluice_audit_stream_subscribers",
                "Readers of the live audit stream.",
                lambda: [((), self._subscribers)],
            )
        )

        self.quota = QuotaMetrics(self.registry)

    def audit_batch(self, accepted: int, duplicates: int) -> None:
        self.batches.inc()
        self.ingested.inc((), accepted)
        self.duplicates.inc((), duplicates)

    def render(self, policy_version: int, live: int, stale: int, subscribers: int) -> str:
        """The text format, with the gauges set to the values given."""
        self._policy_version, self._live, self._stale = policy_version, live, stale
        self._subscribers = subscribers
        return self.registry.render()


class QuotaMetrics:
    """What the quota service granted, by rule; recorded per lease request (a few dict
    updates per item), the active keys counted when scraped."""

    def __init__(self, registry: Registry, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.leases = registry.add(
            Counter("sluice_quota_leases", "Lease items answered, by rule.", ("rule",))
        )
        self.wanted = registry.add(
            Counter("sluice_quota_tokens_wanted", "Tokens sidecars asked for, by rule.", ("rule",))
        )
        self.granted = registry.add(
            Counter("sluice_quota_tokens_granted", "Tokens granted, by rule.", ("rule",))
        )
        self.returned = registry.add(
            Counter(
                "sluice_quota_tokens_returned",
                "Unused tokens sidecars handed back, by rule.",
                ("rule",),
            )
        )
        self.errors = registry.add(
            Counter(
                "sluice_quota_backend_errors",
                "Lease requests the backend could not answer (503), by backend.",
                ("backend",),
            )
        )
        self._recent: dict[str, float] = {}  # key -> last leased
        registry.add(
            Gauge(
                "sluice_quota_active_keys",
                f"Quota keys leased here in the last {ACTIVE_KEYS_WINDOW:g} s, by rule.",
                self._active,
                ("rule",),
            )
        )

    def leased(self, items: Sequence[LeaseRequest], grants: Sequence[Grant]) -> None:
        now = self.clock()
        recent = self._recent
        if len(recent) + len(items) > MAX_BUCKETS:
            self._prune(now)
        for item, grant in zip(items, grants, strict=True):
            rule = (_rule(item.key),)
            self.leases.inc(rule)
            self.wanted.inc(rule, item.want)
            self.granted.inc(rule, grant.tokens)
            if item.returned:
                self.returned.inc(rule, item.returned)
            if len(recent) < MAX_BUCKETS or item.key in recent:
                recent[item.key] = now

    def failed(self, backend: str) -> None:
        self.errors.inc((backend,))

    def _prune(self, now: float) -> None:
        for key, last in list(self._recent.items()):
            if now - last > ACTIVE_KEYS_WINDOW:
                del self._recent[key]

    def _active(self) -> list[tuple[tuple[str, ...], float]]:
        self._prune(self.clock())
        counts: dict[str, float] = {}
        for key in self._recent:
            rule = _rule(key)
            counts[rule] = counts.get(rule, 0.0) + 1.0
        return [((rule,), n) for rule, n in counts.items()]


def _rule(key: str) -> str:
    """The rule id of a ticket key (`policy/rule|app=billing|table=orders`)."""
    return key.split("|", 1)[0]


class MetricsMiddleware:
    """Pure ASGI middleware (no buffering, so streams stay streams): counts each HTTP
    request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes everything is answered 500 by the server

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route: Any = scope.get("route")  # set by the router on a match
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.inc((template, method, str(status)))
            self.metrics.duration.observe(
                (template, method), (time.perf_counter() - start) * 1000.0
            )

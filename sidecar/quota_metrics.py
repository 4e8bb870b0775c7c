"""The sidecar's rate-limit state as Prometheus series, read when `/metrics` is scraped.

`register(registry, limiter)` adds, for any `Limiter`:

- `sluice_sidecar_limit_keys`: attribute-keyed buckets in use (`limit.key`), over all limits.
- `sluice_sidecar_limit_overflow_total`: statements that drew from a keyed limit's overflow
  bucket because the limit had `MAX_KEYS` values in use (sidecar/limits.py).

and for a `QuotaLimiter` (a sidecar with `--control`, mesh-wide limits):

- `sluice_sidecar_quota_fallback`: 1 while lease requests fail and every mesh-wide limit is
  enforced on a fair local share (docs/operations.md), else 0.
- `sluice_sidecar_quota_keys{rule}`, `sluice_sidecar_quota_tokens_held{rule}`: keys leased
  and tokens granted, not yet used and not lapsed, per rule.
- `sluice_sidecar_quota_lease_requests_total`, `sluice_sidecar_quota_lease_failures_total`.
- `sluice_sidecar_quota_tokens_granted_total`, `..._tokens_returned_total` (handed back
  unused after the key went idle), `..._tokens_lapsed_total` (expired unused).

Labels are rule ids, bounded by the policy set; never keys, which may come from data.
Reading walks the leases once per scrape; nothing here runs on the statement path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sidecar.limits import Limiter
from sidecar.prometheus import Gauge, ReadCounter, Registry
from sidecar.quota import QuotaLimiter

Series = Iterable[tuple[tuple[str, ...], float]]


def register(registry: Registry, limiter: Limiter) -> None:
    """Add the limiter's series to `registry` (once per limiter)."""
    registry.add(
        Gauge(
            "sluice_sidecar_limit_keys",
            "Attribute-keyed limit buckets in use (limit.key), over all limits.",
            lambda: [((), limiter.keys.live())],
        )
    )
    registry.add(
        ReadCounter(
            "sluice_sidecar_limit_overflow",
            "Statements that drew from a keyed limit's shared overflow bucket (too many values).",
            lambda: [((), limiter.keys.overflowed)],
        )
    )
    if isinstance(limiter, QuotaLimiter):
        _quota(registry, limiter)


def _quota(registry: Registry, q: QuotaLimiter) -> None:
    def per_rule(tokens: bool) -> Series:
        now = q.clock()
        out: dict[str, float] = {}
        for key, lease in q.leases.items():
            rule = key.split("|", 1)[0]
            live = lease.tokens if lease.tokens > 0 and now < lease.expires else 0.0
            out[rule] = out.get(rule, 0.0) + (live if tokens else 1.0)
        return [((rule,), v) for rule, v in out.items()]

    registry.add(
        Gauge(
            "sluice_sidecar_quota_fallback",
            "1 while the quota service is unreachable and limits use a fair local share.",
            lambda: [((), float(q.fallback))],
        )
    )
    registry.add(
        Gauge(
            "sluice_sidecar_quota_keys",
            "Mesh-wide limit keys this sidecar leases, by rule.",
            lambda: per_rule(False),
            ("rule",),
        )
    )
    registry.add(
        Gauge(
            "sluice_sidecar_quota_tokens_held",
            "Leased tokens not yet used nor lapsed, by rule.",
            lambda: per_rule(True),
            ("rule",),
        )
    )
    totals: tuple[tuple[str, str, Callable[[], float]], ...] = (
        ("lease_requests", "Lease requests sent to the quota service.", lambda: q.requests),
        ("lease_failures", "Lease requests that failed (fair-share fallback).", lambda: q.failures),
        ("tokens_granted", "Tokens the quota service granted.", lambda: q.granted),
        ("tokens_returned", "Unused tokens handed back after a key went idle.", lambda: q.returned),
        ("tokens_lapsed", "Granted tokens that expired unused.", lambda: q.lapsed),
    )
    for name, help, read in totals:
        registry.add(ReadCounter(f"sluice_sidecar_quota_{name}", help, _one(read)))


def _one(read: Callable[[], float]) -> Callable[[], Series]:
    return lambda: [((), read())]

"""Counters, gauges and histograms with labels, rendered in the Prometheus text format.

Pure (no I/O): the sidecar's `/metrics` responder (sidecar/telemetry.py) and the control
plane's `GET /metrics` (mesh/api/metrics.py) render a `Registry`. Recording is a dict
update under the GIL, a few hundred nanoseconds, so it can sit on the audit path; the
text is built only when scraped. Label values are given as tuples in the order of the
metric's label names, so no dict is built per observation.

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (version 0.0.4).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Milliseconds: from a cached decision on a local server to a slow report query.
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# Label sets per metric beyond which new ones are folded into one "other" series: label
# values come from traffic (verbs, SQLSTATEs, routes) and must not grow memory unbounded.
MAX_SERIES = 2000
OTHER = "other"
_M = TypeVar("_M", bound="_Metric")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels

    def _key(
        self, key: tuple[str, ...], series: Mapping[tuple[str, ...], object]
    ) -> tuple[str, ...]:
        if key in series or len(series) < MAX_SERIES:
            return key
        return (OTHER,) * len(self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set (rendered with a `_total` suffix
    when the name does not have one)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name if name.endswith("_total") else name + "_total", help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...] = (), amount: float = 1.0) -> None:
        values = self.values
        if key not in values:
            key = self._key(key, values)
            values.setdefault(key, 0.0)
        values[key] += amount

    def lines(self) -> list[str]:
        out = self.header()
        for key, value in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.label_names, key)} {_number(value)}")
        return out


class Gauge(_Metric):
    """A value read when scraped: `read()` returns (label values, value) pairs."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, help, labels)
        self.read = read

    def lines(self) -> list[str]:
        out = self.header()
        for key, value in sorted(self.read()):
            out.append(f"{self.name}{_labels(self.label_names, key)} {_number(value)}")
        return out


class ReadCounter(Gauge):
    """A counter whose running totals another object keeps, read when scraped (rendered
    with a `_total` suffix when the name does not have one)."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name if name.endswith("_total") else name + "_total", help, read, labels)


class Histogram(_Metric):
    """Observations counted in cumulative buckets per label set, with their sum."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS_MS,
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        # per label set: [count per bucket (the last is +Inf)..., sum]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        row = self.values.get(key)
        if row is None:
            key = self._key(key, self.values)
            row = self.values.setdefault(key, [0.0] * (len(self.buckets) + 2))
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def lines(self) -> list[str]:
        out = self.header()
        bounds = [*map(_number, self.buckets), "+Inf"]
        for key, row in sorted(self.values.items()):
            total = 0.0
            for bound, n in zip(bounds, row[:-1], strict=True):
                total += n
                labels = _labels(self.label_names, key, f'le="{bound}"')
                out.append(f"{self.name}_bucket{labels} {_number(total)}")
            labels = _labels(self.label_names, key)
            out.append(f"{self.name}_sum{labels} {_number(row[-1])}")
            out.append(f"{self.name}_count{labels} {_number(total)}")
        return out


class Registry:
    """The metrics one endpoint serves, in the order they were added."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _M) -> _M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.lines()
        return "\n".join(lines) + "\n"

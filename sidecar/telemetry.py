"""Sidecar observability: a span per statement (sampled), metrics, OTLP export, `/metrics`.

The hook is an `AuditSink`: `TelemetrySink` is fed every audit event beside the audit sinks
(a `TeeSink`). An event carries the statement's arrival time and duration, so a span is
made afterwards with explicit start and end times and nothing runs on the statement path
itself; an event not sampled costs a random draw and three dict updates for the metrics.
Only recorded decisions make spans and metrics: with `--audit non-allow`, allowed
statements are not recorded, so they are neither traced nor counted.

- Spans (opentelemetry-sdk), one per sampled event (ratio `--trace-sample`, default 0.01),
  kind CLIENT, named "<verb> <table>", with the standard `db.system`, `db.operation` (the
  verb), `db.sql.table`, `db.statement` (the masked statement), `server.address` and
  `server.port` (the route's upstream), plus `sluice.decision`, `sluice.rules`,
  `sluice.rule`, `sluice.app`, `sluice.instance`, `sluice.service`; an error sets the
  span's status and `db.response.status_code` (the SQLSTATE).
- Metrics: `sluice_sidecar_decisions_total{app,service,decision,verb}` (an event counts once,
  under its first verb), `sluice_sidecar_statement_duration_ms{app,service,decision}`
  (a histogram), `sluice_sidecar_errors_total{app,service,sqlstate}`; with
  `SidecarMetrics.watch_limiter`, the rate limiter's state (sidecar/quota_metrics.py).
- Export: with `--otlp-endpoint URL` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`, spans and
  metrics go over OTLP/HTTP to `<URL>/v1/traces` and `<URL>/v1/metrics` (batched, in
  opentelemetry's own threads); without one no exporter exists and no span is made.
  With `--metrics-listen HOST:PORT` the Prometheus text is served at `GET /metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from sidecar import quota_metrics
from sidecar.audit import AuditEvent
from sidecar.config import SidecarConfig
from sidecar.limits import Limiter
from sidecar.prometheus import CONTENT_TYPE, Counter, Histogram, Registry

log = logging.getLogger("sluice.telemetry")

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
DB_SYSTEMS = {"postgres": "postgresql", "mysql": "mysql"}
# The /metrics responder: a request head must arrive within this long and fit in this much.
REQUEST_TIMEOUT = 5.0
MAX_HEAD = 8192
# At stop: how long exporters get to send what they hold.
SHUTDOWN_SECONDS = 3.0
METRICS_EXPORT_MS = 10_000


class SidecarMetrics:
    """The sidecar's Prometheus metrics (see the module docstring for names and labels)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.decisions = self.registry.add(
            Counter(
                "sluice_sidecar_decisions",
                "Recorded decisions by app, service, decision and (first) verb.",
                ("app", "service", "decision", "verb"),
            )
        )
        self.duration = self.registry.add(
            Histogram(
                "sluice_sidecar_statement_duration_ms",
                "Statement duration in milliseconds, from arrival to the server's answer.",
                ("app", "service", "decision"),
            )
        )
        self.errors = self.registry.add(
            Counter(
                "sluice_sidecar_errors",
                "Statements that failed, by SQLSTATE (ours: 42501 denied, 53400 limited).",
                ("app", "service", "sqlstate"),
            )
        )
        self._limiters: list[Limiter] = []

    def watch_limiter(self, limiter: Limiter) -> None:
        """Serve the limiter's state as well: keyed buckets and, for mesh-wide limits, the
        leases and the fair-share fallback (sidecar/quota_metrics.py). Once per limiter."""
        if not any(limiter is w for w in self._limiters):
            self._limiters.append(limiter)
            quota_metrics.register(self.registry, limiter)


class _OtelMetrics:
    """The same metrics as OpenTelemetry instruments, for OTLP export."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("sluice.sidecar")
        self.decisions = meter.create_counter("sluice.sidecar.decisions", "{statement}")
        self.duration = meter.create_histogram("sluice.sidecar.statement.duration", "ms")
        self.errors = meter.create_counter("sluice.sidecar.errors", "{statement}")

    def record(self, event: AuditEvent, verb: str) -> None:
        attrs = {"sluice.app": event.app, "sluice.service": event.service}
        self.decisions.add(1, {**attrs, "sluice.decision": event.decision, "db.operation": verb})
        if event.duration_ms is not None:
            self.duration.record(event.duration_ms, {**attrs, "sluice.decision": event.decision})
        if event.error:
            self.errors.add(1, {**attrs, "db.response.status_code": event.error})


class TelemetrySink:
    """An `AuditSink` that turns audit events into metrics and sampled spans. Only recorded
    decisions arrive here: with `--audit non-allow` allowed statements make neither."""

    def __init__(
        self,
        metrics: SidecarMetrics,
        tracer: Tracer | None = None,
        sample: float = 0.01,
        upstreams: Mapping[str, tuple[str, int]] | None = None,
        otel_metrics: _OtelMetrics | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.sample = sample
        self.upstreams = dict(upstreams or {})
        self.otel_metrics = otel_metrics
        self.rand = rand
        self.spans = 0

    def record(self, event: AuditEvent) -> None:
        verb = event.verbs[0] if event.verbs else ""
        m = self.metrics
        m.decisions.inc((event.app, event.service, event.decision, verb))
        if event.duration_ms is not None:
            m.duration.observe((event.app, event.service, event.decision), event.duration_ms)
        if event.error:
            m.errors.inc((event.app, event.service, event.error))
        if self.otel_metrics is not None:
            self.otel_metrics.record(event, verb)
        if self.tracer is not None and self.sample > 0 and self.rand() < self.sample:
            self._span(event, verb)

    def _span(self, event: AuditEvent, verb: str) -> None:
        assert self.tracer is not None
        if event.method is not None:
            self._http_span(event)
            return
        table = event.tables[0] if event.tables else ""
        attrs: dict[str, Any] = {
            "db.system": DB_SYSTEMS.get(event.protocol, event.protocol or "other_sql"),
            "db.statement": event.statement,
            **_sluice_attributes(event),
        }
        if verb:
            attrs["db.operation"] = verb
        if table:
            attrs["db.sql.table"] = table
        if event.rule:
            attrs["sluice.rule"] = event.rule
        if event.rows is not None:
            attrs["db.response.returned_rows"] = event.rows
        upstream = self.upstreams.get(event.service)
        if upstream is not None:
            attrs["server.address"], attrs["server.port"] = upstream
        start = int(event.time * 1e9)
        end = start + int((event.duration_ms or 0.0) * 1e6)
        name = " ".join(p for p in (verb, table) if p) or event.service
        span = self.tracer.start_span(
            name, kind=SpanKind.CLIENT, attributes=attrs, start_time=start
        )
        if event.error:
            span.set_attribute("db.response.status_code", event.error)
            span.set_status(Status(StatusCode.ERROR, f"SQLSTATE {event.error}"))
        span.end(end_time=end)
        self.spans += 1

    def _http_span(self, event: AuditEvent) -> None:
        """An HTTP request's span, with OpenTelemetry's HTTP client attributes."""
        assert self.tracer is not None
        attrs: dict[str, Any] = {
            "http.request.method": event.method,
            "url.path": event.path or "",
            **_sluice_attributes(event),
        }
        if event.host:
            attrs["server.address"] = (
                event.host.rsplit(":", 1)[0] if "]" not in event.host else event.host
            )
        if event.rule:
            attrs["sluice.rule"] = event.rule
        if event.status is not None:
            attrs["http.response.status_code"] = event.status
        start = int(event.time * 1e9)
        end = start + int((event.duration_ms or 0.0) * 1e6)
        span = self.tracer.start_span(
            event.method or "HTTP", kind=SpanKind.CLIENT, attributes=attrs, start_time=start
        )
        if event.status is not None and event.status >= 400:  # client spans: 4xx is an error
            span.set_status(Status(StatusCode.ERROR, f"HTTP {event.status}"))
        span.end(end_time=end)
        self.spans += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _sluice_attributes(event: AuditEvent) -> dict[str, Any]:
    """The `sluice.*` span attributes every recorded decision carries, SQL or HTTP."""
    return {
        "sluice.decision": event.decision,
        "sluice.action": event.action,
        "sluice.enforced": event.enforced,
        "sluice.rules": list(event.rules),
        "sluice.app": event.app,
        "sluice.instance": event.instance,
        "sluice.service": event.service,
        "sluice.session": event.session,
        "sluice.policy_version": event.policy_version,
    }


def otlp_endpoint(config: SidecarConfig, env: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP/HTTP base URL: the config's (flag or file), else the standard variable."""
    url = config.telemetry.otlp_endpoint or env.get(OTLP_ENV, "").strip()
    return url.rstrip("/") or None


def wanted(config: SidecarConfig, env: Mapping[str, str] = os.environ) -> bool:
    """Whether the sidecar needs telemetry at all: an exporter or a `/metrics` listener."""
    return config.telemetry.metrics_listen is not None or otlp_endpoint(config, env) is not None


class Telemetry:
    """The sidecar's telemetry: its sink, its providers (owned when built here) and its
    `/metrics` listener. Tests pass a `tracer_provider` of their own (in-memory export)."""

    def __init__(
        self,
        config: SidecarConfig,
        tracer_provider: TracerProvider | None = None,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.config = config
        self.metrics = SidecarMetrics()
        self._owned: list[TracerProvider | MeterProvider] = []
        endpoint = otlp_endpoint(config, env)
        resource = Resource.create(
            {
                "service.name": "sluice-sidecar",
                "service.instance.id": config.instance,
                "sluice.app": config.app,
            }
        )
        otel_metrics = None
        if endpoint is not None:
            # Imported here: the exporters pull in protobuf and requests, needed only now.
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            if tracer_provider is None:
                tracer_provider = TracerProvider(resource=resource)
                tracer_provider.add_span_processor(
                    BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
                )
                self._owned.append(tracer_provider)
            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"),
                export_interval_millis=METRICS_EXPORT_MS,
            )
            meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
            self._owned.append(meter_provider)
            otel_metrics = _OtelMetrics(meter_provider)
            log.info("telemetry: OTLP export to %s", endpoint)
        tracer = None
        if tracer_provider is not None:
            tracer = tracer_provider.get_tracer("sluice.sidecar")
        self.sink = TelemetrySink(
            self.metrics,
            tracer,
            config.telemetry.trace_sample,
            {r.service: r.upstream for r in config.routes},
            otel_metrics,
        )
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Open the `/metrics` listener, when one is configured."""
        listen = self.config.telemetry.metrics_listen
        if listen is None:
            return
        self._server = await asyncio.start_server(self._serve, *listen, limit=MAX_HEAD)
        host, port = self.metrics_address() or listen
        log.info("metrics: http://%s:%d/metrics (Prometheus text format)", host, port)

    def metrics_address(self) -> tuple[str, int] | None:
        if self._server is None:
            return None
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        loop = asyncio.get_running_loop()
        for provider in self._owned:
            # Shutdown exports what is batched: blocking HTTP, so in a thread, bounded.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    loop.run_in_executor(None, provider.shutdown), SHUTDOWN_SECONDS
                )
        self._owned.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, then close: GET /metrics, 404 elsewhere, 405 for other methods."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (words[0], words[1].split("?", 1)[0]) if len(words) >= 2 else ("", "")
            if not method:
                status, body = "400 Bad Request", "bad request line\n"
            elif path != "/metrics":
                status, body = "404 Not Found", "only /metrics is served here\n"
            elif method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "GET /metrics\n"
            else:
                status, body = "200 OK", self.metrics.registry.render()
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else data)
            )
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

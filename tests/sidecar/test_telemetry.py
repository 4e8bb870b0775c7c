"""Sidecar telemetry: spans and metrics for real statements through a real sidecar in front
of the real PostgreSQL (spans kept in opentelemetry's in-memory exporter), `/metrics`
scraped with httpx and parsed, OTLP/HTTP export to a local receiver, and the config."""

from __future__ import annotations

import asyncio
import http.server
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mesh.cli import _parser
from mesh.sidecar_cmd import _config
from policies.errors import PolicyError
from sidecar.audit import AuditEvent
from sidecar.config import (
    AuditConfig,
    Route,
    SidecarConfig,
    TelemetryConfig,
    load_config,
)
from sidecar.prometheus import MAX_SERIES, Counter, Histogram, Registry
from sidecar.telemetry import SidecarMetrics, Telemetry, TelemetrySink, wanted
from tests.audit_events import audit_event
from tests.promtext import parse, value
from tests.sidecar.conftest import PG_HOST, PG_PORT, RunningSidecar

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: tel}
    spec:
      destination: orders-db
      rules:
        - {name: no-delete, sql: {verbs: [DELETE]}, action: deny}
    """
)


def config(tmp_path: Path, **telemetry: object) -> SidecarConfig:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    route = Route("orders-db", "postgres", ("127.0.0.1", 0), (PG_HOST, PG_PORT), 3.0)
    return SidecarConfig(
        "billing",
        "billing-1",
        (str(policy),),
        (route,),
        AuditConfig(None, "all"),
        0.05,
        telemetry=TelemetryConfig(**telemetry),  # type: ignore[arg-type]
    )


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[RunningSidecar, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = config(tmp_path, trace_sample=1.0, metrics_listen=("127.0.0.1", 0))
    sc = RunningSidecar(cfg, tmp_path / "policy.yaml", Telemetry(cfg, provider, env={}))
    yield sc, exporter
    sc.stop()
    provider.shutdown()


@pytest.mark.postgres
def test_spans_and_metrics_for_real_statements(
    traced: tuple[RunningSidecar, InMemorySpanExporter], scratch_db: str
) -> None:
    sc, exporter = traced
    with psycopg.connect(**sc.dsn(scratch_db), autocommit=True) as c:  # type: ignore[arg-type]
        c.execute("CREATE TABLE IF NOT EXISTS tel_orders (id int)")
        for n in range(3):
            c.execute(f"INSERT INTO tel_orders VALUES ({424240 + n})")
        c.execute("SELECT count(*) FROM tel_orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM tel_orders")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 1/0")
    events = sc.events(lambda es: len(es) >= 7)
    assert len(events) == 7

    spans = exporter.get_finished_spans()
    assert len(spans) == 7  # ratio 1.0: one span per recorded statement
    by_event = {s.attributes["sluice.session"]: s for s in spans if s.attributes}
    assert by_event  # attributes are set
    inserts = [s for s in spans if s.name == "INSERT tel_orders"]
    assert len(inserts) == 3
    a = inserts[0].attributes
    assert a is not None
    assert a["db.system"] == "postgresql"
    assert a["db.operation"] == "INSERT"
    assert a["db.sql.table"] == "tel_orders"
    assert "42424" not in str(a["db.statement"])  # masked
    assert a["server.address"] == PG_HOST and a["server.port"] == PG_PORT
    assert a["sluice.decision"] == "allow"
    assert a["sluice.app"] == "billing"
    [deny] = [s for s in spans if s.attributes and s.attributes["sluice.decision"] == "deny"]
    assert deny.name == "DELETE tel_orders"
    assert deny.attributes is not None
    assert list(deny.attributes["sluice.rules"]) == ["tel/no-delete"]  # type: ignore[arg-type]
    assert deny.attributes["db.response.status_code"] == "42501"
    assert deny.status.status_code is StatusCode.ERROR
    [div] = [
        s for s in spans if s.attributes and s.attributes.get("db.response.status_code") == "22012"
    ]
    assert div.name == "SELECT"
    # Explicit times: the span covers the statement as the audit event saw it.
    event = next(e for e in events if e.decision == "deny")
    assert deny.start_time == int(event.time * 1e9)
    assert deny.end_time is not None and deny.end_time >= deny.start_time

    assert sc.telemetry is not None
    address = sc.telemetry.metrics_address()
    assert address is not None
    url = f"http://{address[0]}:{address[1]}"
    r = httpx.get(url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, types = parse(r.text)
    assert types["sluice_sidecar_decisions_total"] == "counter"
    assert types["sluice_sidecar_statement_duration_ms"] == "histogram"
    d = "sluice_sidecar_decisions_total"
    assert value(samples, d, app="billing", service="orders-db") == 7
    assert value(samples, d, decision="allow", verb="INSERT") == 3
    assert value(samples, d, decision="deny", verb="DELETE") == 1
    assert value(samples, "sluice_sidecar_errors_total", sqlstate="42501") == 1
    assert value(samples, "sluice_sidecar_errors_total", sqlstate="22012") == 1
    timed = sum(e.duration_ms is not None for e in events)
    assert value(samples, "sluice_sidecar_statement_duration_ms_count") == timed
    inf = value(samples, "sluice_sidecar_statement_duration_ms_bucket", le="+Inf")
    assert inf == timed
    assert httpx.get(url + "/other", timeout=5).status_code == 404
    assert httpx.post(url + "/metrics", timeout=5).status_code == 405


def event(n: int = 0, **kw: Any) -> AuditEvent:
    """An allowed SELECT on orders that took 1.5 ms; `kw` sets any other field."""
    orders = dict(
        session="s-1",
        tables=("orders",),
        statement="SELECT * FROM orders WHERE id = $1",
        duration_ms=1.5,
    )
    return audit_event(f"e-{n}", 1_700_000_000.0 + n, **(orders | kw))


def sink_with(
    sample: float, rand: Callable[[], float]
) -> tuple[TelemetrySink, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TelemetrySink(
        SidecarMetrics(), provider.get_tracer("t"), sample, {}, rand=rand
    ), exporter


def test_sampling_ratio_and_metrics_count_every_event() -> None:
    draws = iter([0.05, 0.5, 0.09, 0.99] * 25)
    sink, exporter = sink_with(0.1, lambda: next(draws))
    for n in range(100):
        sink.record(event(n))
    assert len(exporter.get_finished_spans()) == sink.spans == 50
    assert sink.metrics.decisions.values == {("billing", "orders-db", "allow", "SELECT"): 100}
    never, exporter = sink_with(0.0, lambda: 0.0)
    never.record(event())
    assert exporter.get_finished_spans() == ()
    assert never.metrics.decisions.values  # counted all the same


def test_a_span_has_the_events_times() -> None:
    sink, exporter = sink_with(1.0, lambda: 0.0)
    sink.record(event(duration_ms=12.5, verbs=(), tables=()))
    [span] = exporter.get_finished_spans()
    assert span.name == "orders-db"  # no verb, no table
    assert span.start_time == 1_700_000_000 * 10**9
    assert span.end_time == span.start_time + 12_500_000


def test_an_http_request_span_has_http_attributes() -> None:
    sink, exporter = sink_with(1.0, lambda: 0.0)
    sink.record(
        event(
            protocol="http", verbs=("POST",), tables=(), statement="POST /v1/payments",
            decision="deny", rule="payments/no-writes", method="POST", host="payments:8080",
            path="/v1/payments", status=403,
        )
    )  # fmt: skip
    [span] = exporter.get_finished_spans()
    assert span.name == "POST"
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "POST"
    assert span.attributes["url.path"] == "/v1/payments"
    assert span.attributes["server.address"] == "payments"
    assert span.attributes["http.response.status_code"] == 403
    assert "db.system" not in span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert sink.metrics.decisions.values == {("billing", "orders-db", "deny", "POST"): 1}


def test_prometheus_text_escaping_buckets_and_series_bound() -> None:
    reg = Registry()
    c = reg.add(Counter("odd", "label values that need escaping", ("v",)))
    c.inc(('a "quoted"\\ back\nslash',), 2)
    h = reg.add(Histogram("lat_ms", "latency", ("k",), buckets=(1, 10)))
    for v in (0.5, 1, 5, 50):
        h.observe(("x",), v)
    samples, types = parse(reg.render())
    assert types == {"odd_total": "counter", "lat_ms": "histogram"}
    assert value(samples, "odd_total", v='a "quoted"\\ back\nslash') == 2
    assert value(samples, "lat_ms_bucket", le="1") == 2  # le is inclusive
    assert value(samples, "lat_ms_bucket", le="10") == 3
    assert value(samples, "lat_ms_bucket", le="+Inf") == 4
    assert value(samples, "lat_ms_sum") == 56.5
    many = Counter("many", "bounded", ("k",))
    for n in range(MAX_SERIES + 10):
        many.inc((str(n),))
    assert len(many.values) == MAX_SERIES + 1
    assert many.values[("other",)] == 10


class _Receiver(http.server.BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        _Receiver.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_export_to_a_local_receiver(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = config(tmp_path, trace_sample=1.0)
        assert not wanted(cfg, env={})
        assert wanted(cfg, env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        telemetry = Telemetry(cfg, env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint + "/"})
        telemetry.sink.record(event(error="42501", decision="deny"))

        async def lifecycle() -> None:
            await telemetry.start()
            await telemetry.stop()  # shutdown exports what is batched

        asyncio.run(lifecycle())
        assert "/v1/traces" in _Receiver.paths
        assert "/v1/metrics" in _Receiver.paths
    finally:
        server.shutdown()
        server.server_close()


def test_telemetry_section_of_a_config_file(tmp_path: Path) -> None:
    f = tmp_path / "sidecar.yaml"
    f.write_text(
        "app: billing\npolicies: [p.yaml]\n"
        "routes: [{service: orders-db, listen: '127.0.0.1:6432', upstream: '127.0.0.1:5432'}]\n"
        "telemetry: {trace_sample: 0.25, otlp_endpoint: 'http://collector:4318', "
        "metrics_listen: '127.0.0.1:9464'}\n"
    )
    t = load_config(f).telemetry
    assert t == TelemetryConfig(0.25, "http://collector:4318", ("127.0.0.1", 9464))
    f.write_text(f.read_text().replace("0.25", "1.5"))
    with pytest.raises(PolicyError, match=r"telemetry.trace_sample: expected a ratio"):
        load_config(f)


def test_cli_telemetry_flags() -> None:
    argv = ["sidecar", "--app", "billing", "--service", "db", "--listen", "127.0.0.1:1"]
    argv += ["--upstream", "127.0.0.1:2", "--policies", "p.yaml"]
    parser = _parser()  # the real parser of `sluice`
    t = _config(parser.parse_args(argv)).telemetry
    assert t == TelemetryConfig()
    more = [
        "--trace-sample",
        "0.5",
        "--otlp-endpoint",
        "http://c:4318/",
        "--metrics-listen",
        "127.0.0.1:9464",
    ]
    t = _config(parser.parse_args(argv + more)).telemetry
    assert t == TelemetryConfig(0.5, "http://c:4318", ("127.0.0.1", 9464))
    with pytest.raises(ValueError, match="telemetry flags: expected a ratio from 0 to 1"):
        _config(parser.parse_args([*argv, "--trace-sample", "2"]))

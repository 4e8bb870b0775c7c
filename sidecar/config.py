"""Sidecar configuration: the app it serves, its policies, its routes, its audit sink, and
optionally the control plane it takes policies from and ships audit events to.

From command-line flags (one route) or a YAML file (`sluice sidecar -c FILE`, several
routes). Validation errors name file:line:col, like policy errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from policies.errors import PolicyError, Problem
from policies.yamlread import Invalid, Reader, boolean, choice, mapping, number, string, strings
from sidecar.spool import DEFAULT_MAX_BYTES

_T = TypeVar("_T")
_V = TypeVar("_V")

PROTOCOLS = ("postgres", "mysql", "http")
TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
RECORD_MODES = ("all", "non-allow")
# How long to wait for the upstream's TCP handshake before telling the app it is down.
DEFAULT_CONNECT_TIMEOUT = 5.0
# How often policy files are checked for changes (mtime and size; cheap stat calls).
DEFAULT_RELOAD_INTERVAL = 0.5
# One statement in a hundred traced: spans cost an export each; metrics count them all.
DEFAULT_TRACE_SAMPLE = 0.01
# How to spread connections over a catalog service's instances (sidecar/upstreams.py).
BALANCES = ("round-robin", "least-connections")
# How long an instance that refused a connection is left out before it is tried again.
DEFAULT_EJECT_SECONDS = 10.0
_SERVICE = re.compile(r"^(?:([A-Za-z0-9_-]+)\.)?([A-Za-z0-9_-]+)\.service$")
_HOSTPORT = re.compile(r"^\s*(?:\[([0-9a-fA-F:.]+)\]|([^:\s\[\]]+)):(\d{1,5})\s*$")


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    mode: str = "disable"  # libpq's sslmode names
    ca_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceUpstream:
    """An upstream found by name in the service catalog (sidecar/upstreams.py)."""

    name: str
    tag: str | None = None
    balance: str = "round-robin"  # BALANCES
    eject_seconds: float = DEFAULT_EJECT_SECONDS


@dataclass(frozen=True, slots=True)
class HttpTimeouts:
    """How long an HTTP route waits for slow clients (sidecar/http_session.py)."""

    head: float = 10.0  # a request head must be complete this long after its first byte
    body: float = 30.0  # a request body may stall this long
    idle: float = 60.0  # a keep-alive connection with no request open is closed after this


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream service reached through a local listener."""

    service: str
    protocol: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    tls: UpstreamTls = field(default_factory=UpstreamTls)
    # Set: instances come from the catalog, and `upstream` is only a label ("NAME.service", 0).
    upstream_service: ServiceUpstream | None = None
    http: HttpTimeouts = field(default_factory=HttpTimeouts)

    @property
    def upstream_label(self) -> str:
        """The upstream as logs and error messages name it."""
        if self.upstream_service is not None:
            return f"{self.upstream_service.name}.service"
        host, port = self.upstream
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str | None = None  # JSON lines; None: no local sink
    record: str = "all"  # all | non-allow
    full_statements: bool = False  # record statements with their literals


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The control plane: policies come from it, audit events go to it (docs/api.md)."""

    url: str  # http(s)://host:port of `sluice up`
    token: str  # a token with the sidecar role
    state_dir: str  # last good policy set and the audit spool
    spool_max_bytes: int = DEFAULT_MAX_BYTES

    def __repr__(self) -> str:  # configs get logged; tokens must not be
        return f"ControlConfig(url={self.url!r}, token='***', state_dir={self.state_dir!r})"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Spans, metrics and their export (sidecar/telemetry.py)."""

    trace_sample: float = DEFAULT_TRACE_SAMPLE  # share of recorded statements traced
    otlp_endpoint: str | None = None  # OTLP/HTTP base URL; else $OTEL_EXPORTER_OTLP_ENDPOINT
    metrics_listen: tuple[str, int] | None = None  # where GET /metrics is served


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    app: str
    instance: str
    policies: tuple[str, ...]  # ignored (with a warning) when `control` is set
    routes: tuple[Route, ...]
    audit: AuditConfig = field(default_factory=AuditConfig)
    reload_interval: float = DEFAULT_RELOAD_INTERVAL
    control: ControlConfig | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


def parse_hostport(text: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); raises ValueError saying what is expected."""
    m = _HOSTPORT.match(text)
    if not m:
        raise ValueError(f'expected "HOST:PORT", got {text!r}')
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return (m.group(1) or m.group(2), port)


def parse_upstream(
    text: str, balance: str = "round-robin"
) -> tuple[tuple[str, int], ServiceUpstream | None]:
    """ "HOST:PORT", or "[TAG.]NAME.service" for a catalog service -> (address or label,
    service or None); raises ValueError saying what is expected."""
    m = _SERVICE.match(text.strip())
    if m is None:
        try:
            return parse_hostport(text), None
        except ValueError:
            raise ValueError(f'expected "HOST:PORT" or "NAME.service", got {text!r}') from None
    if balance not in BALANCES:
        raise ValueError(f"balance: expected one of {', '.join(BALANCES)}, got {balance!r}")
    service = ServiceUpstream(m.group(2), m.group(1), balance)
    return (f"{service.name}.service", 0), service


def check_control_url(url: str) -> str:
    """The control plane's base URL without a trailing slash; raises ValueError."""
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def load_config(path: str | Path) -> SidecarConfig:
    """Read a sidecar config file; raises PolicyError listing every problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Problem(file, 1, 1, f"cannot read: {exc}")]) from None
    reader = Reader(file)
    docs = list(reader.documents(text))
    if reader.problems:
        raise PolicyError(reader.problems)
    if len(docs) != 1:
        raise PolicyError([Problem(file, 1, 1, "expected exactly one YAML document")])
    try:
        config = _config(docs[0], Path(path).parent)
    except Invalid as exc:
        reader.problem(exc.node, exc.message)
        raise PolicyError(reader.problems) from None
    return config


def _config(node: yaml.Node, base: Path) -> SidecarConfig:
    top = mapping(
        node,
        "sidecar config",
        frozenset(
            {
                "app",
                "instance",
                "policies",
                "routes",
                "audit",
                "reload_interval",
                "control",
                "telemetry",
            }
        ),
        frozenset({"app", "routes"}),
    )
    app = string(top["app"][1], "app")
    instance = string(top["instance"][1], "instance") if "instance" in top else app
    control = _control(top["control"][1], base) if "control" in top else None
    if "policies" not in top and control is None:
        raise Invalid(node, "sidecar config: missing required key 'policies' (or 'control')")
    policies: tuple[str, ...] = ()
    if "policies" in top:
        policies = tuple(
            str(base / p) if not Path(p).is_absolute() else p
            for _, p in strings(top["policies"][1], "policies")
        )
    routes_node = top["routes"][1]
    if not isinstance(routes_node, yaml.SequenceNode) or not routes_node.value:
        raise Invalid(routes_node, "routes: expected a non-empty list of routes")
    routes = tuple(_route(r, i) for i, r in enumerate(routes_node.value))
    audit = _audit(top["audit"][1], base) if "audit" in top else AuditConfig()
    interval = DEFAULT_RELOAD_INTERVAL
    if "reload_interval" in top:
        interval = number(top["reload_interval"][1], "reload_interval")
    telemetry = _telemetry(top["telemetry"][1]) if "telemetry" in top else TelemetryConfig()
    return SidecarConfig(app, instance, policies, routes, audit, interval, control, telemetry)


def check_sample(value: float) -> float:
    """A trace sampling ratio in [0, 1]; raises ValueError."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a ratio from 0 to 1, got {value:g}")
    return value


def _telemetry(node: yaml.Node) -> TelemetryConfig:
    m = mapping(node, "telemetry", frozenset({"trace_sample", "otlp_endpoint", "metrics_listen"}))
    sample = DEFAULT_TRACE_SAMPLE
    if "trace_sample" in m:
        sample = _checked(m["trace_sample"][1], "telemetry.trace_sample", number, check_sample)
    endpoint = None
    if "otlp_endpoint" in m:
        endpoint = _checked(
            m["otlp_endpoint"][1], "telemetry.otlp_endpoint", string, check_control_url
        )
    listen = None
    if "metrics_listen" in m:
        listen = _hostport(m["metrics_listen"][1], "telemetry.metrics_listen")
    return TelemetryConfig(sample, endpoint, listen)


def _control(node: yaml.Node, base: Path) -> ControlConfig:
    m = mapping(
        node,
        "control",
        frozenset({"url", "token", "state_dir", "spool_max_bytes"}),
        frozenset({"url", "token", "state_dir"}),
    )
    url = _checked(m["url"][1], "control.url", string, check_control_url)
    token = string(m["token"][1], "control.token")
    if not token.strip():
        raise Invalid(m["token"][1], "control.token: expected a token, got an empty string")
    raw = string(m["state_dir"][1], "control.state_dir")
    state_dir = raw if Path(raw).is_absolute() else str(base / raw)
    max_bytes = DEFAULT_MAX_BYTES
    if "spool_max_bytes" in m:
        value = number(m["spool_max_bytes"][1], "control.spool_max_bytes")
        if value < 4096 or value != int(value):
            raise Invalid(
                m["spool_max_bytes"][1],
                "control.spool_max_bytes: expected a whole number of bytes, at least 4096",
            )
        max_bytes = int(value)
    return ControlConfig(url, token, state_dir, max_bytes)


def _route(node: yaml.Node, index: int) -> Route:
    what = f"routes[{index}]"
    m = mapping(
        node,
        what,
        frozenset({"service", "protocol", "listen", "upstream", "connect_timeout", "tls", "http"}),
        frozenset({"service", "listen", "upstream"}),
    )
    service = string(m["service"][1], f"{what}.service")
    protocol = (
        choice(m["protocol"][1], f"{what}.protocol", PROTOCOLS) if "protocol" in m else ("postgres")
    )
    listen = _hostport(m["listen"][1], f"{what}.listen")
    upstream, service_upstream = _upstream(m["upstream"][1], f"{what}.upstream")
    timeout = DEFAULT_CONNECT_TIMEOUT
    if "connect_timeout" in m:
        timeout = number(m["connect_timeout"][1], f"{what}.connect_timeout")
        if timeout <= 0:
            raise Invalid(m["connect_timeout"][1], f"{what}.connect_timeout must be positive")
    tls = UpstreamTls()
    if "tls" in m:
        t = mapping(m["tls"][1], f"{what}.tls", frozenset({"mode", "ca_file", "server_name"}))
        tls = UpstreamTls(
            mode=choice(t["mode"][1], f"{what}.tls.mode", TLS_MODES) if "mode" in t else "prefer",
            ca_file=string(t["ca_file"][1], f"{what}.tls.ca_file") if "ca_file" in t else None,
            server_name=string(t["server_name"][1], f"{what}.tls.server_name")
            if "server_name" in t
            else None,
        )
    # mysql: TLS starts mid-handshake, after the server's greeting (sidecar/mysql_handshake.py)
    if protocol == "http" and tls.mode == "prefer":
        raise Invalid(
            m["tls"][1],
            f"{what}.tls.mode: an HTTP upstream speaks TLS or not, it cannot prefer it "
            "(require, verify-ca, verify-full or disable)",
        )
    http = HttpTimeouts()
    if "http" in m:
        if protocol != "http":
            raise Invalid(m["http"][1], f"{what}.http: only for routes with protocol http")
        h = mapping(m["http"][1], f"{what}.http", frozenset(_HTTP_TIMEOUTS))
        values = {}
        for key, attr in _HTTP_TIMEOUTS.items():
            if key in h:
                value = number(h[key][1], f"{what}.http.{key}")
                if value <= 0:
                    raise Invalid(h[key][1], f"{what}.http.{key} must be positive (seconds)")
                values[attr] = float(value)
        http = HttpTimeouts(**values)
    return Route(service, protocol, listen, upstream, timeout, tls, service_upstream, http)


_HTTP_TIMEOUTS = {"head_timeout": "head", "body_timeout": "body", "idle_timeout": "idle"}


def _upstream(node: yaml.Node, what: str) -> tuple[tuple[str, int], ServiceUpstream | None]:
    """HOST:PORT or NAME.service, or {service, tag, balance, eject_seconds}."""
    if not isinstance(node, yaml.MappingNode):
        return _checked(node, what, string, parse_upstream)
    m = mapping(
        node,
        what,
        frozenset({"service", "tag", "balance", "eject_seconds"}),
        frozenset({"service"}),
    )
    name = string(m["service"][1], f"{what}.service")
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise Invalid(m["service"][1], f"{what}.service: expected a service name, got {name!r}")
    tag = string(m["tag"][1], f"{what}.tag") if "tag" in m else None
    balance = choice(m["balance"][1], f"{what}.balance", BALANCES) if "balance" in m else None
    eject = DEFAULT_EJECT_SECONDS
    if "eject_seconds" in m:
        eject = number(m["eject_seconds"][1], f"{what}.eject_seconds")
        if eject <= 0:
            raise Invalid(m["eject_seconds"][1], f"{what}.eject_seconds must be positive")
    service = ServiceUpstream(name, tag, balance or "round-robin", eject)
    return (f"{name}.service", 0), service


def _audit(node: yaml.Node, base: Path) -> AuditConfig:
    m = mapping(node, "audit", frozenset({"path", "record", "full_statements"}))
    path = None
    if "path" in m:
        raw = string(m["path"][1], "audit.path")
        path = raw if Path(raw).is_absolute() else str(base / raw)
    record = choice(m["record"][1], "audit.record", RECORD_MODES) if "record" in m else "all"
    full = (
        boolean(m["full_statements"][1], "audit.full_statements")
        if ("full_statements" in m)
        else False
    )
    return AuditConfig(path, record, full)


def _hostport(node: yaml.Node, what: str) -> tuple[str, int]:
    return _checked(node, what, string, parse_hostport)


def _checked(
    node: yaml.Node,
    what: str,
    read: Callable[[yaml.Node, str], _V],
    check: Callable[[_V], _T],
) -> _T:
    """Read a value and validate it; a ValueError from `check` becomes an error at the
    value's file:line:col."""
    try:
        return check(read(node, what))
    except ValueError as exc:
        raise Invalid(node, f"{what}: {exc}") from None

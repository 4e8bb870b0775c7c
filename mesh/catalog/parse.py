"""Consul's request shapes: Go durations and service/check registrations.

Consul decodes request JSON case-insensitively and also takes snake_case spellings
(`DeregisterCriticalServiceAfter`, `deregistercriticalserviceafter`,
`deregister_critical_service_after`); py-consul sends lowercase keys. `fold` maps every
spelling to one key (lowercase, no underscores). Problems raise `BadRequest` with Consul's
kind of message; the routes answer them 400 in plain text, as Consul does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Consul's limits: a blocking query waits at most 10 minutes, 5 by default.
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
MAX_NAME = 256
MAX_TAGS = 64
MAX_CHECKS = 16
MIN_INTERVAL = 0.1  # a check interval below this is raised to it (Consul: 1 s minimum)
DEFAULT_CHECK_TIMEOUT = 10.0  # Consul's default for TCP and HTTP checks
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class BadRequest(ValueError):
    """A request Consul would answer 400; the message is the response body."""


def duration(text: Any, what: str) -> float:
    """A Go duration ("10s", "1m30s", "250ms") in seconds; a bare number is seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        # Consul's JSON also takes nanoseconds as a number.
        return float(text) / 1e9
    if not isinstance(text, str) or len(text) > 32:
        raise BadRequest(f'Invalid {what}: expected a duration such as "10s"')
    s = text.strip()
    if re.fullmatch(r"\d+", s):
        return float(s)
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise BadRequest(f'Invalid {what}: {text!r} is not a duration such as "10s"')
    return total


def fold(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Keys in one spelling: lowercase, without underscores."""
    return {str(k).lower().replace("_", ""): v for k, v in doc.items()}


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """A health check as registered: exactly one of ttl, tcp, http."""

    check_id: str
    name: str
    kind: str  # "ttl" | "tcp" | "http"
    ttl: float = 0.0
    target: str = ""  # host:port for tcp, the URL for http
    interval: float = 0.0
    timeout: float = DEFAULT_CHECK_TIMEOUT
    method: str = "GET"
    header: tuple[tuple[str, str], ...] = ()
    tls_skip_verify: bool = False
    status: str = "critical"  # Consul's initial status unless the registration says
    notes: str = ""
    deregister_after: float = 0.0  # DeregisterCriticalServiceAfter; 0: never

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"CheckID": self.check_id, "Name": self.name, "Type": self.kind}
        if self.kind == "ttl":
            out["TTL"] = self.ttl
        else:
            out[self.kind.upper()] = self.target
            out["Interval"] = self.interval
            out["Timeout"] = self.timeout
        if self.method != "GET":
            out["Method"] = self.method
        if self.header:
            out["Header"] = {k: [v] for k, v in self.header}
        out.update(TLSSkipVerify=self.tls_skip_verify, Status=self.status, Notes=self.notes)
        if self.deregister_after:
            out["DeregisterCriticalServiceAfter"] = self.deregister_after
        return out


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A service registration (PUT /v1/agent/service/register), normalised."""

    service_id: str
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    port: int = 0
    meta: Mapping[str, str] = field(default_factory=dict)
    weights: tuple[int, int] = (1, 1)  # passing, warning
    enable_tag_override: bool = False
    checks: tuple[CheckSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The form kept in SQLite; `service_from_json` reads it back."""
        return {
            "ID": self.service_id,
            "Name": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Port": self.port,
            "Meta": dict(self.meta),
            "Weights": {"Passing": self.weights[0], "Warning": self.weights[1]},
            "EnableTagOverride": self.enable_tag_override,
            "Checks": [c.to_json() for c in self.checks],
        }


def service_from_json(doc: Any) -> ServiceSpec:
    """A registration body (any key spelling) as a ServiceSpec; raises BadRequest."""
    if not isinstance(doc, dict):
        raise BadRequest("Request decode failed: expected a JSON object")
    d = fold(doc)
    name = _text(d.get("name"), "service name", required=True)
    if not name:
        raise BadRequest("Missing service name")
    service_id = _text(d.get("id"), "service ID") or name
    tags = d.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadRequest("Request decode failed: Tags: expected a list of strings")
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"Too many tags: at most {MAX_TAGS}")
    port = d.get("port") or 0
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise BadRequest("Request decode failed: Port: expected an integer 0-65535")
    meta = d.get("meta") or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise BadRequest("Request decode failed: Meta: expected a map of strings")
    weights = fold(d.get("weights") or {})
    passing, warning = weights.get("passing", 1), weights.get("warning", 1)
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in (passing, warning)):
        raise BadRequest("Request decode failed: Weights: expected integers")
    raw_checks: list[Any] = []
    if d.get("check"):
        raw_checks.append(d["check"])
    extra = d.get("checks") or []
    if not isinstance(extra, list):
        raise BadRequest("Request decode failed: Checks: expected a list")
    raw_checks.extend(extra)
    if len(raw_checks) > MAX_CHECKS:
        raise BadRequest(f"Too many checks: at most {MAX_CHECKS}")
    checks = tuple(
        check_from_json(c, service_id, name, i + 1 if len(raw_checks) > 1 else 0)
        for i, c in enumerate(raw_checks)
    )
    if len({c.check_id for c in checks}) != len(checks):
        raise BadRequest("Duplicate check ID in the registration")
    return ServiceSpec(
        service_id=service_id,
        name=name,
        tags=tuple(tags),
        address=_text(d.get("address"), "Address"),
        port=port,
        meta=meta,
        weights=(passing, warning),
        enable_tag_override=bool(d.get("enabletagoverride", False)),
        checks=checks,
    )


def check_from_json(doc: Any, service_id: str, service: str, number: int) -> CheckSpec:
    """One check of a service registration. IDs default as Consul's: `service:<id>`, or
    `service:<id>:<n>` when the registration has several."""
    if not isinstance(doc, dict):
        raise BadRequest("Request decode failed: a check must be a JSON object")
    c = fold(doc)
    default_id = f"service:{service_id}" + (f":{number}" if number else "")
    check_id = _text(c.get("checkid") or c.get("id"), "CheckID") or default_id
    name = _text(c.get("name"), "check Name") or f"Service '{service}' check"
    status = c.get("status") or "critical"
    if status not in ("passing", "warning", "critical"):
        raise BadRequest(f"Invalid check status: {status!r}")
    notes = _text(c.get("notes"), "Notes")
    deregister = 0.0
    if c.get("deregistercriticalserviceafter"):
        deregister = duration(c["deregistercriticalserviceafter"], "DeregisterCriticalServiceAfter")
    timeout = duration(c["timeout"], "Timeout") if c.get("timeout") else DEFAULT_CHECK_TIMEOUT
    common: dict[str, Any] = {"check_id": check_id, "name": name, "status": status, "notes": notes}
    if c.get("args") or c.get("script") or c.get("grpc") or c.get("dockercontainerid"):
        raise BadRequest("Invalid check: only TTL, TCP and HTTP checks are supported here")
    if c.get("ttl"):
        if c.get("tcp") or c.get("http"):
            raise BadRequest("Invalid check: TTL checks take no TCP or HTTP target")
        ttl = duration(c["ttl"], "TTL")
        if ttl <= 0:
            raise BadRequest("Invalid check: TTL must be > 0 for TTL checks")
        return CheckSpec(kind="ttl", ttl=ttl, deregister_after=deregister, **common)
    kind = "tcp" if c.get("tcp") else "http" if c.get("http") else ""
    if not kind:
        raise BadRequest("Invalid check: must be one of TTL, TCP or HTTP")
    if c.get("tcp") and c.get("http"):
        raise BadRequest("Invalid check: give one of TCP or HTTP")
    target = _text(c.get(kind), kind.upper())
    if kind == "http" and not re.match(r"^https?://", target):
        raise BadRequest("Invalid check: HTTP must be an http:// or https:// URL")
    if kind == "tcp" and ":" not in target:
        raise BadRequest("Invalid check: TCP must be HOST:PORT")
    if not c.get("interval"):
        raise BadRequest("Invalid check: Interval must be > 0 for TCP and HTTP checks")
    interval = max(MIN_INTERVAL, duration(c["interval"], "Interval"))
    header = c.get("header") or {}
    if not isinstance(header, dict):
        raise BadRequest("Request decode failed: Header: expected a map of lists")
    pairs = tuple(
        (str(k), str(v)) for k, vs in header.items() for v in (vs if isinstance(vs, list) else [vs])
    )
    method = _text(c.get("method"), "Method") or "GET"
    return CheckSpec(
        kind=kind,
        target=target,
        interval=interval,
        timeout=max(0.01, timeout),
        method=method.upper(),
        header=pairs,
        tls_skip_verify=bool(c.get("tlsskipverify", False)),
        deregister_after=deregister,
        **common,
    )


def _text(value: Any, what: str, required: bool = False) -> str:
    if value is None:
        if required:
            raise BadRequest(f"Missing {what}")
        return ""
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise BadRequest(f"Request decode failed: {what}: expected a string (at most {MAX_NAME})")
    return value

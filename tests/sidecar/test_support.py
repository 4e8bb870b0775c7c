"""Sidecar support modules: config files, policy reload with last-good, audit sink, limiter."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import pytest

from policies.engine import LimitTicket
from policies.errors import PolicyError
from policies.spec import Limit, OnExceed, Scope
from sidecar.audit import AuditEvent, JsonlSink
from sidecar.config import load_config, parse_hostport
from sidecar.limits import Limiter
from sidecar.policy_watch import PolicyWatcher
from tests.audit_events import audit_event

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: g}
    spec:
      destination: db
      rules: [{name: r, sql: {verbs: [DROP]}, action: deny}]
    """
)


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        textwrap.dedent(
            """\
            app: billing
            policies: [policies]
            audit: {path: audit.jsonl, record: non-allow}
            routes:
              - service: orders-db
                listen: 127.0.0.1:6432
                upstream: "[::1]:5432"
                connect_timeout: 2
                tls: {mode: verify-full, ca_file: /etc/ca.pem}
            """
        )
    )
    c = load_config(cfg)
    assert c.app == c.instance == "billing"
    assert c.policies == (str(tmp_path / "policies"),)
    (route,) = c.routes
    assert route.listen == ("127.0.0.1", 6432) and route.upstream == ("::1", 5432)
    assert route.connect_timeout == 2 and route.tls.mode == "verify-full"
    assert c.audit.path == str(tmp_path / "audit.jsonl") and c.audit.record == "non-allow"


def test_config_errors_are_located(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "app: a\npolicies: [p]\nroutes:\n  - service: s\n    listen: nowhere\n    upstream: h:1\n"
    )
    with pytest.raises(PolicyError) as info:
        load_config(cfg)
    assert str(info.value) == f"{cfg}:5:13: routes[0].listen: expected \"HOST:PORT\", got 'nowhere'"


@pytest.mark.parametrize("bad", ["", "host", "host:0", "host:70000", ":5432"])
def test_bad_hostports(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(bad)


def test_policy_reload_keeps_last_good_set(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    w = PolicyWatcher([str(tmp_path)])
    first = w.engine
    assert w.version == 1 and w.poll() is None
    f.write_text(POLICY.replace("verbs: [DROP]", "verb: [DROP]"))  # a typo
    os.utime(f, ns=(1, 1))
    assert w.poll() is None and w.engine is first and w.version == 1
    assert w.last_error is not None and "unknown key 'verb'" in w.last_error
    f.write_text(POLICY.replace("[DROP]", "[DROP, TRUNCATE]"))
    new = w.poll()
    assert new is not None and w.engine is new and w.version == 2 and w.last_error is None
    (tmp_path / "more.yaml").write_text(POLICY.replace("name: g", "name: h"))
    assert w.poll() is not None and len(w.engine.policies) == 2


def test_initial_invalid_set_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("kind: [")
    with pytest.raises(PolicyError):
        PolicyWatcher([str(tmp_path)])


def event(i: int) -> AuditEvent:
    return audit_event(
        f"i-{i}",
        1.0,
        app="a",
        instance="a-1",
        service="db",
        session="s",
        tables=("t",),
        statement="SELECT ?",
    )


def test_jsonl_sink_batches_and_survives_a_write_failure(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(str(path))
    for i in range(3):
        sink.record(event(i))
    sink.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["i-0", "i-1", "i-2"] and sink.written == 3
    broken = JsonlSink(str(tmp_path / "no-such-dir" / "audit.jsonl"))
    broken.record(event(9))
    broken.flush()  # must not raise
    assert broken.dropped == 1 and broken.written == 0


def test_audit_event_line_carries_every_field(tmp_path: Path) -> None:
    full = audit_event(
        "i-1",
        1795720725.9388852,
        rules=("p/r",),
        rule="r",
        statement="SELECT 'déjà' FROM t WHERE a = ?",
        duration_ms=0.123,
        rows=3,
        error="42501",
        would="reject",
    )
    line = full.to_line()
    assert b"\n" not in line and "déjà".encode() in line  # UTF-8, not \u escapes
    decoded = json.loads(line)
    assert list(decoded) == [f.name for f in dataclasses.fields(AuditEvent)]
    for name, value in decoded.items():
        expected = getattr(full, name)
        assert value == (list(expected) if isinstance(expected, tuple) else expected), name
    assert full.to_json() == line.decode()


def test_audit_event_with_a_lone_surrogate_is_still_written(tmp_path: Path) -> None:
    # No decoder on the data path makes one, but an event must never be lost to encoding.
    odd = event(1)
    odd = dataclasses.replace(odd, statement="SELECT '\udcff'")
    sink = JsonlSink(str(tmp_path / "audit.jsonl"))
    sink.record(odd)
    sink.close()
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(line)["statement"] == "SELECT '\udcff'" and sink.written == 1


def ticket(on_exceed: OnExceed, max_delay: float = 0.0) -> LimitTicket:
    limit = Limit(
        rate=10, per=1.0, burst=2, scope=Scope.GLOBAL, on_exceed=on_exceed, max_delay=max_delay
    )
    return LimitTicket("p/r", f"p/r|{on_exceed}", limit, "slow down")


def test_limiter_reject_and_delay() -> None:
    lim = Limiter()
    reject = ticket(OnExceed.REJECT)
    assert [lim.take((reject,), 0.0).granted for _ in range(3)] == [True, True, False]
    assert lim.take((reject,), 0.0).exceeded is reject
    delay = ticket(OnExceed.DELAY, max_delay=0.15)
    outcomes = [lim.take((delay,), 0.0) for _ in range(5)]
    assert [o.granted for o in outcomes] == [True, True, True, False, False]
    assert outcomes[2].delay == pytest.approx(0.1)


def test_limiter_all_or_nothing() -> None:
    lim = Limiter()
    a, b = ticket(OnExceed.REJECT), ticket(OnExceed.DELAY, 1.0)
    b = LimitTicket("p/s", "p/s|x", a.limit, None)  # a second reject bucket
    assert lim.take((a,), 0.0).granted and lim.take((a,), 0.0).granted
    assert not lim.take((b, a), 0.0).granted
    # b's tokens were not spent by the refused attempt.
    assert lim.take((b,), 0.0).granted and lim.take((b,), 0.0).granted

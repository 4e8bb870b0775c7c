"""The cached hot path: exact-text keys, session state in the key, minute-bounded reuse."""

from __future__ import annotations

import textwrap
from datetime import datetime

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.spec import Action
from policies.sql.inspect import POSTGRES, InspectionCache, SessionState

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: g}
    spec:
      destination: db
      rules:
        - name: night
          sql: {verbs: [DROP]}
          when: {time: "01:00-02:00"}
          action: deny
    """
)
PEER = Peer("app", "db")


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_cached_decision_is_reused_within_the_minute_only() -> None:
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES)
    drop = "DROP TABLE t"
    _, first = d.decide(drop, at("2026-11-24T00:59:10+00:00"))
    _, again = d.decide(drop, at("2026-11-24T00:59:50+00:00"))
    assert first.applied is again.applied is Action.ALLOW and (d.hits, d.misses) == (1, 1)
    _, inside = d.decide(drop, at("2026-11-24T01:00:00+00:00"))
    assert inside.applied is Action.DENY and d.misses == 2


def test_constants_are_never_merged() -> None:
    # These two share a libpg_query fingerprint; their decisions differ.
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES)
    now = at("2026-11-24T01:30:00+00:00")
    _, benign = d.decide("DO $$ BEGIN PERFORM 1; END $$", now)
    _, evil = d.decide("DO $$ BEGIN DROP TABLE users; END $$", now)
    assert benign.applied is Action.ALLOW and evil.applied is Action.DENY


def test_session_state_is_part_of_the_key() -> None:
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES)
    now = at("2026-11-24T01:30:00+00:00")
    # With standard_conforming_strings on, the backslash is plain: two SELECTs. With it off,
    # the quote is escaped and the rest is one literal, which Sluice refuses to guess at.
    text = "SELECT 'a\\'; SELECT 2; --'"
    statements, on = d.decide(text, now)
    assert on.applied is Action.ALLOW and [s.verb for s in statements] == ["SELECT", "SELECT"]
    off = SessionState(standard_conforming_strings=False)
    statements, decision = d.decide(text, now, off)
    assert statements[0].error is not None and decision.applied is Action.DENY


def test_engine_swap_drops_cached_decisions() -> None:
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES)
    now = at("2026-11-24T12:00:00+00:00")
    assert d.decide("TRUNCATE t", now)[1].applied is Action.ALLOW
    timeless = "\n".join(line for line in POLICY.splitlines() if "when:" not in line)
    stricter = timeless.replace("verbs: [DROP]", "verbs: [DROP, TRUNCATE]")
    d.use(Engine(load_texts([("p.yaml", stricter)])))
    assert d.decide("TRUNCATE t", now)[1].applied is Action.DENY


def test_inspection_cache_is_bounded_fifo() -> None:
    cache = InspectionCache(size=3)
    for i in range(5):
        cache.inspect(f"SELECT {i}")
    assert len(cache) == 3 and cache.misses == 5
    cache.inspect("SELECT 4")
    assert cache.hits == 1
    cache.inspect("SELECT 0")
    assert cache.misses == 6

"""The cached hot path: exact-text keys, session state in the key, minute-bounded reuse."""

from __future__ import annotations

import textwrap
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.spec import Action
from policies.sql.inspect import POSTGRES, InspectionCache, SessionState, inspect
from policies.sql.postgres import shape

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


def test_texts_differing_only_in_constants_share_one_inspection() -> None:
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES)
    now = at("2026-11-24T12:00:00+00:00")
    for i in range(50):
        statements, decision = d.decide(
            f"SELECT abalance FROM accounts WHERE aid = {i} AND note = 'n{i}'", now
        )
        assert statements[0].tables == ("accounts",) and decision.applied is Action.ALLOW
    assert d.misses == 1 and d.shape_hits == 49


def test_shapes_never_merge_what_constants_can_change() -> None:
    d = SqlDecider(
        Engine(
            load_texts([("p.yaml", POLICY.replace('\n          when: {time: "01:00-02:00"}', ""))])
        ),
        PEER,
        POSTGRES,
    )
    night = at("2026-11-24T01:30:00+00:00")
    # EXPLAIN's options may be quoted constants; DO bodies are strings.
    assert d.decide("EXPLAIN (ANALYZE 'off') SELECT 1", night)[1].applied is Action.ALLOW
    assert d.decide("DO $$BEGIN PERFORM 1; END$$", night)[1].applied is Action.ALLOW
    assert d.decide("DO $$BEGIN DROP TABLE t; END$$", night)[1].applied is Action.DENY
    # Comments and identifiers are part of the shape.
    assert d.decide("SELECT 1 /* a */ FROM t", night)[0][0].tables == ("t",)
    assert d.decide("SELECT 1 /* a */ FROM u", night)[0][0].tables == ("u",)
    # Multi-statement strings are never shared by shape (their byte spans differ).
    first, _ = d.decide("SELECT 1; DROP TABLE t", night)
    second, decision = d.decide("SELECT 22; DROP TABLE t", night)
    assert decision.applied is Action.DENY and second[1].span == (11, 23) != first[1].span


TEMPLATES = [
    "SELECT * FROM t WHERE a = {c}",
    "UPDATE t SET a = {c} WHERE b = {c}",
    "DELETE FROM t WHERE a = {c}",
    "DELETE FROM t",
    "INSERT INTO t VALUES ({c}, {c})",
    "SELECT dblink_exec({c})",
    "WITH d AS (DELETE FROM t WHERE a = {c} RETURNING *) SELECT * FROM d",
    "DROP TABLE t",
    "SELECT {c} FROM t -- {c}",
]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(TEMPLATES),
            st.sampled_from(
                ["1", "-2", "3.5", "'x'", "'DROP TABLE t'", "$$q$$", "E'\\\\x'", "NULL"]
            ),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_cached_results_equal_fresh_inspection(texts: list[tuple[str, str]]) -> None:
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES)
    now = at("2026-11-24T01:30:00+00:00")
    for template, constant in texts:
        sql = template.format(c=constant)
        statements, decision = d.decide(sql, now)
        fresh = inspect(sql)
        assert [(s.verbs, s.tables, s.no_where, s.opaque, s.error) for s in statements] == [
            (s.verbs, s.tables, s.no_where, s.opaque, s.error) for s in fresh
        ], sql
        assert decision == d.engine.decide_all(PEER, fresh, now)


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$ BEGIN PERFORM 1; END $$",
        "Explain Analyze DELETE FROM t WHERE id = 1",
        "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
        "CoPy (SELECT 1) TO STDOUT",
        "EXECUTE p(1)",
        "PREPARE p AS SELECT 1",
        "CALL proc(1)",
    ],
)
def test_constant_sensitive_statements_have_no_shape(sql: str) -> None:
    assert shape(sql) is None
    assert shape("SELECT abalance FROM pgbench_accounts WHERE aid = 7") is not None

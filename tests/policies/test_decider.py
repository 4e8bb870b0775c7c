"""The cached hot path: exact-text keys, session state in the key, minute-bounded reuse."""

from __future__ import annotations

import pickle
import textwrap
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Decision, Engine
from policies.loader import load_texts
from policies.spec import Action
from policies.sql import mysql_shape, pg_fastshape
from policies.sql.inspect import (
    MYSQL,
    POSTGRES,
    InspectionCache,
    SessionState,
    inspect,
    session_state,
)
from policies.sql.model import StatementInfo
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


def test_fast_shapes_decide_inlined_constants_without_libpg_query() -> None:
    d = SqlDecider(
        Engine(load_texts([("p.yaml", POLICY)])),
        PEER,
        POSTGRES,
        fast_shape=pg_fastshape.fast_shape,
    )
    night = at("2026-11-24T01:30:00+00:00")
    for i in range(20):
        statements, decision = d.decide(f"DELETE FROM accounts WHERE aid = {i}", night)
        assert statements[0].tables == ("accounts",) and not statements[0].no_where
        assert decision.applied is Action.ALLOW
        assert d.last_shape == f"{pg_fastshape.MARK}DELETE FROM accounts WHERE aid = $i"
    assert d.misses == 1 and d.shape_hits == 19
    # Another text is another shape, whatever it shares with the one decided.
    statements, _ = d.decide("DELETE FROM accounts", night)
    assert statements[0].no_where and d.misses == 2
    # A text the fast lexer refuses falls back to libpg_query's normaliser.
    d.decide("SELECT -1 FROM accounts", night)
    assert d.last_shape == "SELECT $1 FROM accounts"
    _, decision = d.decide("DROP TABLE accounts", night)
    assert decision.applied is Action.DENY


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


Shape = Callable[[str], "str | None"] | None
TEMPLATES = [
    "SELECT * FROM t WHERE a = {c}",
    "SELECT * FROM t WHERE a = {c} AND b = {c}",
    "DELETE FROM t WHERE a = {c} OR b = {c}",
    "UPDATE t SET a = {c} WHERE b = {c}",
    "DELETE FROM t WHERE a = {c}",
    "DELETE FROM t",
    "INSERT INTO t VALUES ({c}, {c})",
    "SELECT dblink_exec({c})",
    "WITH d AS (DELETE FROM t WHERE a = {c} RETURNING *) SELECT * FROM d",
    "DROP TABLE t",
    "SELECT {c} FROM t -- {c}",
]


@pytest.mark.parametrize("fast", [None, pg_fastshape.fast_shape], ids=["libpg_query", "fast"])
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
def test_cached_results_equal_fresh_inspection(fast: Shape, texts: list[tuple[str, str]]) -> None:
    d = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), PEER, POSTGRES, fast_shape=fast)
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


# -- MySQL/MariaDB: the shape cache (policies/sql/mysql_shape.py) ----------------------------

MYSQL_POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: db
      rules:
        - name: no-ddl
          sql: {verbs: [DROP, TRUNCATE, CREATE, ALTER, GRANT]}
          action: deny
        - name: no-unbounded-writes
          sql: {verbs: [DELETE, UPDATE], where: absent}
          action: deny
        - name: secrets
          sql: {tables: [secret]}
          action: deny
        - name: insert-budget
          sql: {verbs: [INSERT], tables: [orders]}
          action: limit
          limit: {rate: 100, per: 1s}
        - name: watch-deletes
          sql: {verbs: [DELETE]}
          action: audit
    """
)
MYSQL_STATES = [
    replace(MYSQL, ansi_quotes=ansi, no_backslash_escapes=nbe)
    for ansi in (False, True)
    for nbe in (False, True)
]
NOON = at("2026-11-24T12:00:00+00:00")


def mysql_decider() -> SqlDecider:
    return SqlDecider(Engine(load_texts([("g.yaml", MYSQL_POLICY)])), PEER, MYSQL)


def fresh(d: SqlDecider, sql: str, state: SessionState) -> tuple[tuple[object, ...], Decision]:
    """What a full inspection of `sql` reports and decides, to compare a cached result with."""
    statements = inspect(sql, state)
    return summary(statements), d.engine.decide_all(PEER, statements, NOON)


def summary(statements: tuple[StatementInfo, ...]) -> tuple[object, ...]:
    return tuple((s.verbs, s.tables, s.no_where, s.opaque, s.deferred, s.error) for s in statements)


def test_mysql_texts_differing_only_in_literals_share_one_inspection() -> None:
    d = mysql_decider()
    for i in range(50):
        statements, decision = d.decide(f"SELECT c FROM sbtest1 WHERE id={i * 7919}", NOON)
        assert statements[0].tables == ("sbtest1",) and decision.applied is Action.ALLOW
    for i in range(20):
        d.decide(f"INSERT INTO orders (id, note) VALUES ({i}, 'n{i}', _binary'x', 0x{i:02x})", NOON)
    assert (d.misses, d.shape_hits) == (2, 49 + 19)
    assert d.last_shape == "INSERT INTO orders (id, note) VALUES (\0n, \0s, \0s, \0x)"
    # A policy change drops shapes with the rest.
    d.use(Engine(load_texts([("g.yaml", MYSQL_POLICY.replace("[secret]", "[sbtest1]"))])))
    assert d.decide("SELECT c FROM sbtest1 WHERE id=1", NOON)[1].applied is Action.DENY


def test_mysql_shapes_are_kept_apart_by_session_state() -> None:
    d = mysql_decider()
    ansi = replace(MYSQL, ansi_quotes=True)
    # Without ANSI_QUOTES "secret" is a string (and the statement reads no table); with it,
    # a table name. Decided without it first, the shape must not carry over.
    assert d.decide('SELECT * FROM t WHERE a = "secret"', NOON)[1].applied is Action.ALLOW
    assert d.decide('SELECT * FROM t WHERE a = "other"', NOON)[1].applied is Action.ALLOW
    _, decision = d.decide('SELECT * FROM "secret" WHERE a = 1', NOON, ansi)
    assert decision.applied is Action.DENY
    assert d.decide('SELECT * FROM t WHERE a = "x"', NOON, ansi)[0][0].tables == ("t",)
    assert d.shape_hits == 1


# Statements an app runs (most of them allowed), each with a form that hides something in a comment,
# a string or the session's sql_mode. Decided in that order through one decider, the second
# must get its own full inspection's decision, never the first's by shape.
EVASIONS = [
    (
        "SELECT * FROM t WHERE id = 1",
        "SELECT * FROM t WHERE id = 1 /*!50000 UNION SELECT * FROM secret */",
    ),
    (
        "SELECT * FROM t WHERE id = 1",
        "SELECT * FROM t WHERE id = 1 /*M!100000 UNION SELECT * FROM secret */",
    ),
    (
        "SELECT * FROM t WHERE id = 1",
        "SELECT * FROM t WHERE id = /*!99999 1 UNION SELECT * FROM secret */ 2",
    ),
    ("SELECT * FROM t WHERE id = 1", "SELECT * FROM t WHERE id = 1 /*!50000 ; DROP TABLE users */"),
    ("SELECT 1", "/*!50000 DROP TABLE users */"),
    ("SELECT 1", "SELECT 1; DROP TABLE users"),
    ("SELECT 1", "SELECT 1\x00; DROP TABLE users"),
    ("DELETE FROM t WHERE id = 1", "DELETE FROM t -- WHERE id = 1"),
    ("DELETE FROM t WHERE id = 1", "DELETE FROM t # WHERE id = 1"),
    ("DELETE FROM t WHERE id = 1", "DELETE FROM t /* WHERE id = 1 */"),
    ("DELETE FROM t WHERE id = 1", "DELETE/**/FROM t"),
    ("DELETE FROM t WHERE id = 1", "DEL/**/ETE FROM t WHERE id = 1"),
    ("DELETE FROM t WHERE id = 1", "DELETE FROM t WHERE id = 1--1\nOR 1"),
    ("SELECT 'a'", "SELECT 'a\\'; DROP TABLE users; -- '"),
    ("SELECT 'a' FROM t", "SELECT 'a\\' FROM t WHERE ''; DELETE FROM t; -- ' FROM t"),
    ('SELECT "a"', 'SELECT "a\\"; DROP TABLE users; -- "'),
    ("SELECT x'00'", "SELECT x'zz'; DROP TABLE users"),
    (
        "SELECT `a` FROM t WHERE x = 'y'",
        "SELECT `a'` FROM t WHERE x = 'y' UNION SELECT * FROM secret",
    ),
    ("SELECT @a FROM t", "SELECT @'a' FROM secret"),
    ("EXECUTE IMMEDIATE 'SELECT 1'", "EXECUTE IMMEDIATE 'DROP TABLE users'"),
    ("EXECUTE IMMEDIATE 'SELECT 1'", "EXECUTE IMMEDIATE 'SELECT 1; DROP TABLE users'"),
    ("PREPARE s FROM 'SELECT 1'", "PREPARE s FROM 'DROP TABLE users'"),
    (
        "SET STATEMENT max_statement_time=1 FOR SELECT 1",
        "SET STATEMENT max_statement_time=1 FOR DROP TABLE t",
    ),
    ("CALL p(1)", "CALL p('DROP TABLE users')"),
    # The forms of tests/policies/sql/test_mysql.py.
    ("DELETE FROM t WHERE id = 1", "DELETE FROM t /*!99999 WHERE id = 1 */"),
    ("SELECT * FROM t1 WHERE a = 1", "SELECT * FROM t1 /*!99999 JOIN secret */ WHERE a = 1"),
    ("SELECT 1", "/*!50700 DROP TABLE users */"),
    ("SELECT 1", "SELECT 1 /*! ; DROP TABLE users */"),
    ("SELECT 1", "SELECT 1 --; DROP TABLE x"),
    ("SELECT ';'", "SELECT ';' ; DELETE FROM t"),
    ("SELECT `a`", "SELECT `;`; UPDATE t SET a = 1"),
    ('SELECT "x;"', 'SELECT "x;"; DELETE FROM t'),
    ("SELECT 'a'", "SELECT 'a\\'; DELETE FROM t; -- '"),
]


@pytest.mark.parametrize(
    "state", MYSQL_STATES, ids=lambda s: f"ansi={s.ansi_quotes},nbe={s.no_backslash_escapes}"
)
@pytest.mark.parametrize(("allowed", "evasion"), EVASIONS)
def test_mysql_evasions_never_ride_on_an_allowed_shape(
    allowed: str, evasion: str, state: SessionState
) -> None:
    d = mysql_decider()
    statements, decision = d.decide(allowed, NOON, state)
    assert (summary(statements), decision) == fresh(d, allowed, state)
    form = mysql_shape.shape(evasion, ansi_quotes=state.ansi_quotes)
    assert form is None or form != mysql_shape.shape(allowed, ansi_quotes=state.ansi_quotes)
    statements, decision = d.decide(evasion, NOON, state)
    assert (summary(statements), decision) == fresh(d, evasion, state)
    assert d.shape_hits == 0


def test_mysql_strings_holding_sql_are_data() -> None:
    # One shape, one decision: a string's text is a value, wherever a statement only reads it.
    d = mysql_decider()
    assert d.decide("SELECT * FROM t WHERE note = 'x'", NOON)[1].applied is Action.ALLOW
    statements, decision = d.decide("SELECT * FROM t WHERE note = 'DROP TABLE secret'", NOON)
    assert d.shape_hits == 1 and decision.applied is Action.ALLOW
    assert (summary(statements), decision) == fresh(
        d, "SELECT * FROM t WHERE note = 'DROP TABLE secret'", MYSQL
    )


MYSQL_TEMPLATES = [
    "SELECT c FROM sbtest1 WHERE id={c}",
    "SELECT c FROM sbtest1 WHERE id BETWEEN {c} AND {c} ORDER BY c",
    "UPDATE sbtest1 SET k=k+{c} WHERE id={c}",
    "UPDATE sbtest1 SET c={c}",
    "DELETE FROM sbtest1 WHERE id={c}",
    "DELETE FROM sbtest1 ORDER BY id LIMIT {c}",
    "INSERT INTO orders (id, note) VALUES ({c}, {c})",
    "INSERT INTO orders VALUES ({c}) ON DUPLICATE KEY UPDATE note = {c}",
    "REPLACE INTO orders VALUES ({c}, {c})",
    "SELECT * FROM `secret` WHERE a = {c}",
    "SELECT {c} FROM t WHERE x IN (SELECT y FROM secret WHERE z = {c})",
    "SELECT * FROM t LIMIT {c} OFFSET {c}",
    "WITH c AS (SELECT {c}) DELETE FROM t WHERE id = {c}",
    "SET STATEMENT max_statement_time={c} FOR DELETE FROM t",
    "SET @a = {c}",
    "EXECUTE IMMEDIATE {c}",
    "PREPARE s FROM {c}",
    "SELECT {c}{c}",
    "SELECT x{c}",
    "SELECT t.{c} FROM t",
    "SELECT {c} -- {c}",
    "SELECT {c} /*!50000 , {c} */",
    "SELECT {c} FROM t WHERE a = {c};",
    "LOAD DATA INFILE {c} REPLACE INTO TABLE t",
    "DROP TABLE t",
]
MYSQL_LITERALS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["1.5", "1e5", ".5", "3.14E-2", "0x1F", "X'ab'", "b'01'", "0b1", "NULL"]),
    st.sampled_from(["N'x'", "_utf8mb4'x'", '"x"', '"DROP TABLE t"', "'a\\'; DROP TABLE t; -- '"]),
    st.text(alphabet="ab';-#/*\\ \nDROP", max_size=12).map(
        lambda s: "'" + s.replace("'", "''") + "'"
    ),
    st.sampled_from(["'; DROP TABLE secret; -- '", "1 UNION SELECT * FROM secret", "?", "@v"]),
    st.sampled_from(["1; DROP TABLE t", "1 /*!50000 ; DROP TABLE t */", "1 -- x", "`secret`"]),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(MYSQL_TEMPLATES), st.lists(MYSQL_LITERALS, min_size=2, max_size=2)
        ),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(MYSQL_STATES),
)
def test_mysql_cached_results_equal_fresh_inspection(
    texts: list[tuple[str, list[str]]], state: SessionState
) -> None:
    d = mysql_decider()
    for template, (first, second) in texts:
        sql = template.replace("{c}", first, 1).replace("{c}", second)
        statements, decision = d.decide(sql, NOON, state)
        assert (summary(statements), decision) == fresh(d, sql, state), sql


def test_session_states_hash_by_value_once() -> None:
    ansi = replace(MYSQL, ansi_quotes=True)
    same = SessionState("mysql", ansi_quotes=True)
    assert ansi == same and hash(ansi) == hash(same) and ansi != MYSQL
    assert {ansi: 1}[same] == 1
    copied = pickle.loads(pickle.dumps(ansi))
    assert copied == ansi and hash(copied) == hash(ansi)


def test_session_state_gives_one_object_per_reading_of_text() -> None:
    # Sessions hand the caches interned states: an identical key compares without calling
    # the generated __eq__.
    assert session_state() is POSTGRES and session_state("mysql") is MYSQL
    ansi = session_state("mysql", True, 100500, False, True, False)
    assert ansi is session_state("mysql", True, 100500, False, True, False)
    assert ansi == SessionState("mysql", True, 100500, False, True, False) and ansi is not MYSQL
    assert session_state("postgres", False) is not POSTGRES

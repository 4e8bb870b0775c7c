"""The PostgreSQL inspector on its own cases: every place a statement can hide what it runs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.sql.model import StatementInfo
from policies.sql.postgres import inspect


def one(sql: str, **kwargs: bool) -> StatementInfo:
    infos = inspect(sql, **kwargs)
    assert len(infos) == 1, infos
    return infos[0]


@pytest.mark.parametrize(
    ("sql", "verb", "verbs"),
    [
        ("SELECT * FROM t WHERE id = 1", "SELECT", {"SELECT"}),
        ("INSERT INTO t SELECT * FROM u", "INSERT", {"INSERT"}),
        ("UPDATE t SET a = 1 WHERE id = 2", "UPDATE", {"UPDATE"}),
        ("DELETE FROM t WHERE id = 2", "DELETE", {"DELETE"}),
        ("TRUNCATE t, u", "TRUNCATE", {"TRUNCATE"}),
        ("DROP TABLE IF EXISTS t", "DROP", {"DROP"}),
        ("DROP ROLE r", "DROP", {"DROP"}),
        ("DROP OWNED BY r", "DROP", {"DROP"}),
        ("CREATE TABLE t (a int)", "CREATE", {"CREATE"}),
        ("CREATE INDEX i ON t (a)", "CREATE", {"CREATE"}),
        ("ALTER TABLE t ADD COLUMN b int", "ALTER", {"ALTER"}),
        ("ALTER TABLE t RENAME TO u", "ALTER", {"ALTER"}),
        ("GRANT SELECT ON t TO r", "GRANT", {"GRANT"}),
        ("REVOKE SELECT ON t FROM r", "REVOKE", {"REVOKE"}),
        ("SET search_path = x", "SET", {"SET"}),
        ("SHOW search_path", "SHOW", {"SHOW"}),
        ("BEGIN", "TRANSACTION", {"TRANSACTION"}),
        ("LOCK TABLE t", "LOCK", {"LOCK"}),
        ("VACUUM t", "OTHER", {"OTHER"}),
        # Data-modifying CTEs run whatever the main statement is.
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "SELECT", {"SELECT", "DELETE"}),
        (
            "WITH u AS (UPDATE t SET a = 1 RETURNING *) INSERT INTO l SELECT * FROM u",
            "INSERT",
            {"INSERT", "UPDATE"},
        ),
        # MERGE runs its actions.
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "MERGE",
            {"MERGE", "DELETE"},
        ),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 1 "
            "WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
            "MERGE",
            {"MERGE", "UPDATE", "INSERT"},
        ),
        # COPY: FROM writes; a query runs.
        ("COPY t FROM STDIN", "COPY", {"COPY", "INSERT"}),
        ("COPY t TO STDOUT", "COPY", {"COPY"}),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "COPY", {"COPY", "DELETE"}),
        # EXPLAIN runs its statement only with ANALYZE.
        ("EXPLAIN DELETE FROM t", "EXPLAIN", {"EXPLAIN"}),
        ("EXPLAIN ANALYZE DELETE FROM t", "EXPLAIN", {"EXPLAIN", "DELETE"}),
        ("EXPLAIN (ANALYZE true) DELETE FROM t", "EXPLAIN", {"EXPLAIN", "DELETE"}),
        ("EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)", "EXPLAIN", {"EXPLAIN", "INSERT"}),
        ("EXPLAIN (ANALYZE on, COSTS off) DELETE FROM t", "EXPLAIN", {"EXPLAIN", "DELETE"}),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", "EXPLAIN", {"EXPLAIN"}),
        # ALTER TABLE ... DROP anything counts as DROP.
        ("ALTER TABLE t DROP COLUMN c", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t DROP CONSTRAINT k", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t ALTER COLUMN c DROP NOT NULL", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t ADD COLUMN d int, DROP COLUMN c", "ALTER", {"ALTER", "DROP"}),
        # Creating tables from queries.
        ("SELECT * INTO x FROM t", "CREATE", {"CREATE"}),
        ("CREATE TABLE x AS SELECT * FROM t", "CREATE", {"CREATE"}),
        ("CREATE MATERIALIZED VIEW m AS SELECT 1", "CREATE", {"CREATE"}),
        # DO blocks: static SQL inside is seen.
        ("DO $$ BEGIN DELETE FROM t; END $$", "DO", {"DO", "DELETE"}),
        ("DO $x$ BEGIN PERFORM 1; END $x$", "DO", {"DO"}),
        (
            "DO $$ DECLARE n int; BEGIN n := (SELECT count(*) FROM t); END $$",
            "DO",
            {"DO", "SELECT"},
        ),
        ("DO $$ BEGIN IF true THEN TRUNCATE t; END IF; END $$", "DO", {"DO", "TRUNCATE"}),
        (
            "DO $$ BEGIN FOR i IN 1..3 LOOP DROP TABLE IF EXISTS t; END LOOP; END $$",
            "DO",
            {"DO", "DROP"},
        ),
    ],
)
def test_verbs(sql: str, verb: str, verbs: set[str]) -> None:
    info = one(sql)
    assert (info.verb, set(info.verbs), info.error) == (verb, verbs, None)


@pytest.mark.parametrize(
    "sql",
    [
        "CALL p(1)",
        "EXECUTE p(1)",
        "CREATE TABLE x AS EXECUTE p",
        "EXPLAIN ANALYZE EXECUTE p",
        "DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$",
        "DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'DELETE FROM t RETURNING *' LOOP END LOOP; END $$",
        "DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT 1'; END $$",
        "DO $$ BEGIN CALL p(); END $$",
        "DO LANGUAGE plperl $$ system('x') $$",
        "DO $$ BEGIN this is not plpgsql; END $$",
        "SELECT dblink_exec('conn', 'DROP TABLE t')",
        "SELECT * FROM public.query_to_xml('DELETE FROM t RETURNING 1', true, true, '')",
        "COPY t FROM PROGRAM 'rm -rf /'",
    ],
)
def test_opaque(sql: str) -> None:
    info = one(sql)
    assert info.opaque and info.error is None


def test_plain_statements_are_not_opaque() -> None:
    for sql in (
        "SELECT 1",
        "DO $$ BEGIN DELETE FROM t; END $$",
        "EXPLAIN EXECUTE p",
        "PREPARE p AS SELECT 1",
    ):
        assert not one(sql).opaque, sql


def test_prepare_stores_its_statement_for_execute() -> None:
    info = one("PREPARE wipe (int) AS DELETE FROM orders WHERE id = $1")
    assert (info.verb, set(info.verbs), info.prepare_name) == ("PREPARE", {"PREPARE"}, "wipe")
    assert info.deferred == {"DELETE"}
    assert info.body is not None and info.body.verb == "DELETE" and info.body.tables == ("orders",)
    execute = one("EXECUTE wipe(1)")
    assert execute.execute_name == "wipe" and execute.opaque
    assert one("DEALLOCATE wipe").deallocate_name == "wipe"
    assert one("DEALLOCATE ALL").deallocate_name == "*"


def test_rules_and_function_bodies_are_deferred() -> None:
    rule = one("CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM u")
    assert set(rule.verbs) == {"CREATE"} and rule.deferred == {"DELETE"}
    function = one("CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END")
    assert set(function.verbs) == {"CREATE"} and function.deferred == {"DELETE"}


@pytest.mark.parametrize(
    ("sql", "no_where"),
    [
        ("DELETE FROM t", True),
        ("DELETE FROM t WHERE id = 1", False),
        ("UPDATE t SET a = 1", True),
        ("UPDATE t SET a = 1 WHERE CURRENT OF c", False),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d WHERE true", True),
        ("DELETE FROM t WHERE id IN (SELECT id FROM u)", False),
        ("SELECT * FROM t", False),
    ],
)
def test_no_where(sql: str, no_where: bool) -> None:
    assert one(sql).no_where is no_where


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("SELECT * FROM t JOIN s.u ON true", ("s.u", "t")),
        ('SELECT * FROM "Orders", Items', ("Orders", "items")),
        ("WITH t AS (SELECT 1) SELECT * FROM t, u", ("u",)),
        ("WITH orders AS (SELECT 1) DELETE FROM orders", ("orders",)),  # the target is a table
        ("DROP TABLE a, s.b", ("a", "s.b")),
        ("DROP INDEX i", ()),
        ("TRUNCATE a, b", ("a", "b")),
        ("SELECT * INTO x FROM t", ("t", "x")),
        ("INSERT INTO db.s.t VALUES (1)", ("db.s.t",)),
        ("ALTER TABLE t DROP COLUMN c", ("t",)),
        ("COPY t FROM STDIN", ("t",)),
        ("EXPLAIN SELECT * FROM t", ("t",)),
        ("DO $$ BEGIN DELETE FROM audit_log; END $$", ("audit_log",)),
    ],
)
def test_tables(sql: str, tables: tuple[str, ...]) -> None:
    assert one(sql).tables == tables


def test_multi_statement_strings_have_byte_spans() -> None:
    sql = "SELECT 'é'; DELETE FROM t;  DROP TABLE u"
    infos = inspect(sql)
    assert [i.verb for i in infos] == ["SELECT", "DELETE", "DROP"]
    raw = sql.encode()
    pieces = [raw[i.span[0] : i.span[1]].decode() for i in infos if i.span]
    assert pieces == ["SELECT 'é'", "DELETE FROM t", "DROP TABLE u"]


def test_parse_errors_fail_closed() -> None:
    for sql in ("SELEC 1", "SELECT 'unterminated", "DELETE FROM", "SELECT 1; DROP TABLE"):
        infos = inspect(sql)
        assert len(infos) == 1 and infos[0].error and not infos[0].verbs, sql


def test_backslashes_without_standard_conforming_strings_are_refused() -> None:
    # With standard_conforming_strings off the server reads 'a\' as an escaped quote, so the
    # statements below are one SELECT of a long literal; Sluice does not guess.
    sql = "SELECT 'a\\'; DROP TABLE t; --'"
    assert [i.verb for i in inspect(sql)] == ["SELECT", "DROP"]
    off = inspect(sql, standard_conforming_strings=False)
    assert len(off) == 1 and off[0].error and "standard_conforming_strings" in off[0].error
    assert one("SELECT 1", standard_conforming_strings=False).error is None


def test_empty_and_comment_only_text_has_no_statements() -> None:
    assert inspect("") == () and inspect("-- nothing\n/* here */") == ()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_never_raises(sql: str) -> None:
    infos = inspect(sql)
    assert isinstance(infos, tuple) and all(isinstance(i, StatementInfo) for i in infos)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "SELECT 1",
                "DELETE FROM t",
                "DROP TABLE t",
                "DO $$BEGIN TRUNCATE t; END$$",
                "CALL p()",
            ]
        ),
        min_size=1,
        max_size=5,
    )
)
def test_each_statement_of_a_script_is_seen(statements: list[str]) -> None:
    infos = inspect("; ".join(statements))
    assert len(infos) == len(statements)
    for text, info in zip(statements, infos, strict=True):
        assert info.verb == one(text).verb

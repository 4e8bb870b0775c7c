"""MySQL/MariaDB inspection: verbs, tables, WHERE-less writes and statement splitting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.sql.model import VERBS, StatementInfo
from policies.sql.mysql import inspect, split

MARIADB = {
    "server_version": 101100,
    "mariadb": True,
    "ansi_quotes": False,
    "no_backslash_escapes": False,
}


def one(sql: str, **options: object) -> StatementInfo:
    results = inspect(sql, **options)
    assert len(results) == 1, results
    return results[0]


@pytest.mark.parametrize(
    ("sql", "verb", "verbs"),
    [
        ("SELECT * FROM t WHERE id = 1", "SELECT", {"SELECT"}),
        ("select 1", "SELECT", {"SELECT"}),
        ("(SELECT 1) UNION (SELECT 2)", "SELECT", {"SELECT"}),
        ("TABLE t", "SELECT", {"SELECT"}),
        ("VALUES (1), (2)", "SELECT", {"SELECT"}),
        ("SELECT * FROM t INTO OUTFILE '/tmp/x'", "SELECT", {"SELECT"}),
        ("HANDLER t OPEN", "SELECT", {"SELECT"}),
        ("WITH c AS (SELECT 1) SELECT * FROM c", "SELECT", {"SELECT"}),
        ("WITH RECURSIVE c (n) AS (SELECT 1) (SELECT n FROM c)", "SELECT", {"SELECT"}),
        (
            "WITH c AS (SELECT id FROM a) UPDATE t JOIN c USING (id) SET x = 1",
            "UPDATE",
            {"UPDATE", "SELECT"},
        ),
        (
            "WITH c AS (SELECT id FROM a) DELETE FROM t WHERE id IN (SELECT id FROM c)",
            "DELETE",
            {"DELETE", "SELECT"},
        ),
        ("INSERT INTO t VALUES (1)", "INSERT", {"INSERT"}),
        ("INSERT INTO t SELECT * FROM s", "INSERT", {"INSERT", "SELECT"}),
        ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 2", "INSERT", {"INSERT", "UPDATE"}),
        ("UPDATE t SET a = 1 WHERE id = 2", "UPDATE", {"UPDATE"}),
        ("DELETE FROM t WHERE id = 1", "DELETE", {"DELETE"}),
        ("REPLACE INTO t VALUES (1)", "REPLACE", {"REPLACE", "INSERT", "DELETE"}),
        ("LOAD DATA INFILE '/tmp/x' INTO TABLE t", "LOAD", {"LOAD", "INSERT"}),
        ("LOAD DATA LOCAL INFILE 'x' REPLACE INTO TABLE t", "LOAD", {"LOAD", "INSERT", "DELETE"}),
        ("LOAD XML INFILE 'x' INTO TABLE t", "LOAD", {"LOAD", "INSERT"}),
        ("LOAD INDEX INTO CACHE t", "OTHER", {"OTHER"}),
        ("TRUNCATE TABLE t", "TRUNCATE", {"TRUNCATE"}),
        ("TRUNCATE t", "TRUNCATE", {"TRUNCATE"}),
        ("CREATE TABLE t (a INT)", "CREATE", {"CREATE"}),
        ("CREATE TABLE t AS SELECT * FROM s", "CREATE", {"CREATE", "INSERT", "SELECT"}),
        ("CREATE TABLE t SELECT * FROM s", "CREATE", {"CREATE", "INSERT", "SELECT"}),
        ("CREATE OR REPLACE TABLE t (a INT)", "CREATE", {"CREATE", "DROP"}),
        ("CREATE VIEW v AS SELECT * FROM t", "CREATE", {"CREATE"}),
        ("CREATE INDEX i ON t (a)", "CREATE", {"CREATE"}),
        ("ALTER TABLE t ADD COLUMN c INT", "ALTER", {"ALTER"}),
        ("ALTER TABLE t DROP COLUMN c", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t DROP PRIMARY KEY", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t DROP PARTITION p1", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t ALTER COLUMN c DROP DEFAULT", "ALTER", {"ALTER", "DROP"}),
        ("ALTER TABLE t TRUNCATE PARTITION p1", "ALTER", {"ALTER", "TRUNCATE"}),
        ("DROP TABLE t", "DROP", {"DROP"}),
        ("DROP DATABASE d", "DROP", {"DROP"}),
        ("RENAME TABLE a TO b", "RENAME", {"RENAME", "ALTER"}),
        ("GRANT SELECT ON db.t TO u", "GRANT", {"GRANT"}),
        ("REVOKE SELECT ON db.t FROM u", "REVOKE", {"REVOKE"}),
        ("EXPLAIN SELECT * FROM t", "EXPLAIN", {"EXPLAIN"}),
        ("EXPLAIN DELETE FROM t", "EXPLAIN", {"EXPLAIN"}),
        ("EXPLAIN FORMAT=JSON DELETE FROM t", "EXPLAIN", {"EXPLAIN"}),
        ("EXPLAIN ANALYZE DELETE FROM t", "EXPLAIN", {"EXPLAIN", "DELETE"}),
        ("ANALYZE DELETE FROM t", "EXPLAIN", {"EXPLAIN", "DELETE"}),
        ("ANALYZE FORMAT=JSON UPDATE t SET a = 1", "EXPLAIN", {"EXPLAIN", "UPDATE"}),
        ("ANALYZE TABLE t", "OTHER", {"OTHER"}),
        ("DESCRIBE t", "EXPLAIN", {"EXPLAIN"}),
        ("DESC t", "EXPLAIN", {"EXPLAIN"}),
        ("SET @a = 1", "SET", {"SET"}),
        ("SET NAMES utf8mb4", "SET", {"SET"}),
        ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "TRANSACTION", {"TRANSACTION"}),
        ("SET SESSION TRANSACTION READ ONLY", "TRANSACTION", {"TRANSACTION"}),
        ("SET STATEMENT max_statement_time=1 FOR DELETE FROM t", "DELETE", {"DELETE", "SET"}),
        ("SHOW TABLES", "SHOW", {"SHOW"}),
        ("START TRANSACTION", "TRANSACTION", {"TRANSACTION"}),
        ("BEGIN", "TRANSACTION", {"TRANSACTION"}),
        ("BEGIN WORK", "TRANSACTION", {"TRANSACTION"}),
        ("COMMIT", "TRANSACTION", {"TRANSACTION"}),
        ("ROLLBACK TO SAVEPOINT s", "TRANSACTION", {"TRANSACTION"}),
        ("SAVEPOINT s", "TRANSACTION", {"TRANSACTION"}),
        ("RELEASE SAVEPOINT s", "TRANSACTION", {"TRANSACTION"}),
        ("XA START 'x'", "TRANSACTION", {"TRANSACTION"}),
        ("DO SLEEP(1)", "DO", {"DO"}),
        ("LOCK TABLES t READ", "LOCK", {"LOCK"}),
        ("UNLOCK TABLES", "LOCK", {"LOCK"}),
        ("USE db", "OTHER", {"OTHER"}),
        ("FLUSH PRIVILEGES", "OTHER", {"OTHER"}),
        ("KILL 12", "OTHER", {"OTHER"}),
        ("OPTIMIZE TABLE t", "OTHER", {"OTHER"}),
        ("CHECK TABLE t", "OTHER", {"OTHER"}),
        ("CHANGE MASTER TO MASTER_HOST='h'", "OTHER", {"OTHER"}),
        ("START SLAVE", "OTHER", {"OTHER"}),
        ("STOP REPLICA", "OTHER", {"OTHER"}),
        ("CACHE INDEX t IN c", "OTHER", {"OTHER"}),
        ("SIGNAL SQLSTATE '45000'", "OTHER", {"OTHER"}),
        ("GET DIAGNOSTICS @n = NUMBER", "OTHER", {"OTHER"}),
        ("BACKUP STAGE START", "OTHER", {"OTHER"}),
        ("SHUTDOWN", "OTHER", {"OTHER"}),
    ],
)
def test_verbs(sql: str, verb: str, verbs: set[str]) -> None:
    info = one(sql)
    assert info.ok, info.error
    assert (info.verb, set(info.verbs)) == (verb, verbs)
    assert info.verbs <= VERBS


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",
        "FROB t",
        "LOAD t",
        "START NOTHING",
        "GET x",
        "WITH c AS (SELECT 1)",
        "DECLARE x INT",  # only inside stored programs
        "PREPARE s",
        "DEALLOCATE s",
        "SELECT 'open",
        "SELECT 1 /* open",
        "IF 1 THEN SELECT 1;",  # a compound statement without its END
    ],
)
def test_unrecognised_statements_are_parse_errors(sql: str) -> None:
    results = inspect(sql)
    assert any(not r.ok for r in results)
    assert all(r.verbs == frozenset() for r in results if not r.ok)


@pytest.mark.parametrize(
    ("sql", "no_where"),
    [
        ("DELETE FROM t", True),
        ("DELETE FROM t WHERE id = 1", False),
        ("DELETE FROM t /*!99999 WHERE id = 1 */", True),
        ("DELETE FROM t /*!50000 WHERE id = 1 */", False),
        ("DELETE FROM t -- WHERE id = 1", True),
        ("DELETE FROM t # WHERE id = 1", True),
        ("DELETE FROM t WHERE id IN (SELECT id FROM s WHERE x)", False),
        ("DELETE FROM t ORDER BY id LIMIT 1", True),
        ("UPDATE t SET a = (SELECT b FROM s WHERE s.id = 1)", True),
        ("UPDATE t SET a = 1 WHERE b = 2", False),
        ("UPDATE t JOIN s ON t.id = s.id SET t.a = s.a", True),
        ("DELETE t1 FROM t1 JOIN t2 ON t1.id = t2.id", True),
        ("SELECT * FROM t", False),
        ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 1", False),
        ("EXPLAIN DELETE FROM t", False),  # explained, not run
        ("ANALYZE DELETE FROM t", True),
        ("SET STATEMENT max_statement_time=1 FOR UPDATE t SET a = 1", True),
    ],
)
def test_no_where(sql: str, no_where: bool) -> None:
    assert one(sql).no_where is no_where


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("SELECT * FROM t WHERE id = 1", ("t",)),
        ("SELECT * FROM Db.Tbl", ("db.tbl",)),
        ("SELECT * FROM `Db`.`Tbl`", ("Db.Tbl",)),
        ("SELECT * FROM `a``b`", ("a`b",)),
        (
            "SELECT * FROM a x, b AS y JOIN c ON x.id = c.id LEFT JOIN d USING (id)",
            ("a", "b", "c", "d"),
        ),
        ("SELECT * FROM a WHERE id IN (SELECT id FROM b)", ("a", "b")),
        ("SELECT EXTRACT(YEAR FROM d) FROM t", ("t",)),
        ("SELECT 1 FROM DUAL", ()),
        ("INSERT INTO t (a, b) VALUES (1, 2)", ("t",)),
        ("INSERT t VALUES (1)", ("t",)),
        ("INSERT LOW_PRIORITY IGNORE INTO t VALUES (1)", ("t",)),
        ("INSERT INTO t SELECT * FROM hr.payroll", ("hr.payroll", "t")),
        ("UPDATE LOW_PRIORITY t SET a = 1", ("t",)),
        ("UPDATE t1, t2 SET t1.a = t2.a", ("t1", "t2")),
        ("DELETE FROM t WHERE id = 1", ("t",)),
        ("DELETE QUICK IGNORE FROM t", ("t",)),
        ("DELETE t1.*, t2 FROM t1 JOIN t2 ON t1.id = t2.id", ("t1", "t2")),
        ("DELETE FROM t1, t2 USING t1 JOIN t2 JOIN t3", ("t1", "t2", "t3")),
        ("REPLACE INTO t VALUES (1)", ("t",)),
        ("TRUNCATE t", ("t",)),
        ("TRUNCATE TABLE s.t", ("s.t",)),
        ("DROP TABLE IF EXISTS a, `B`, c.d", ("B", "a", "c.d")),
        ("DROP TEMPORARY TABLE t", ("t",)),
        ("ALTER TABLE t ADD COLUMN c INT", ("t",)),
        ("ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES p (id)", ("p", "t")),
        ("RENAME TABLE a TO b, c TO d", ("a", "b", "c", "d")),
        ("LOCK TABLES a READ, b AS x WRITE", ("a", "b")),
        ("CREATE TABLE t (a INT)", ("t",)),
        ("CREATE TABLE IF NOT EXISTS t (a INT)", ("t",)),
        ("CREATE INDEX i ON t (a)", ("t",)),
        ("GRANT SELECT ON db.t TO u", ("db.t",)),
        ("LOAD DATA INFILE 'f' INTO TABLE t", ("t",)),
        ("DESCRIBE t", ("t",)),
        ("SHOW TABLES FROM db", ()),
        ("SELECT * FROM t1 /*!99999 JOIN secret */", ("t1",)),
    ],
)
def test_tables(sql: str, tables: tuple[str, ...]) -> None:
    assert one(sql).tables == tables


def test_executable_comments_decide_the_verb() -> None:
    assert one("/*!50000 DROP TABLE users */").verb == "DROP"
    assert inspect("/*!99999 DROP TABLE users */") == ()
    assert one("/*M!100000 DROP TABLE users */").verb == "DROP"
    assert inspect("/*M!100000 DROP TABLE users */", mariadb=False) == ()
    assert inspect("/*!50700 DROP TABLE users */") == ()  # MariaDB skips 5.7+ MySQL comments
    assert one("/*!50700 DROP TABLE users */", server_version=80036, mariadb=False).verb == "DROP"


def test_semicolon_inside_an_executable_comment_is_an_error() -> None:
    # The server starts a fresh lexer after a `;`: the rest is a syntax error, not a comment.
    results = inspect("SELECT 1 /*! ; DROP TABLE users */")
    assert results[0].error is not None


@pytest.mark.parametrize(
    ("sql", "verbs"),
    [
        ("SELECT 1; DROP TABLE x", ["SELECT", "DROP"]),
        ("SELECT 1 -- ; DROP TABLE x", ["SELECT"]),
        ("SELECT 1 --; DROP TABLE x", ["SELECT", "DROP"]),
        ("SELECT 1 # ; DROP TABLE x\n", ["SELECT"]),
        ("SELECT 1 /* ; DROP TABLE x */", ["SELECT"]),
        ("SELECT ';' ; DELETE FROM t", ["SELECT", "DELETE"]),
        (r"SELECT 'a\'; DROP TABLE x; '", ["SELECT"]),
        ("SELECT `;`; UPDATE t SET a = 1", ["SELECT", "UPDATE"]),
        ('SELECT "x;"; DELETE FROM t', ["SELECT", "DELETE"]),
        (";;SELECT 1;;", ["SELECT"]),
        ("SELECT 1; -- trailing", ["SELECT"]),
        ("BEGIN; DELETE FROM t; COMMIT", ["TRANSACTION", "DELETE", "TRANSACTION"]),
    ],
)
def test_statement_splitting(sql: str, verbs: list[str]) -> None:
    assert [r.verb for r in inspect(sql)] == verbs


def test_backslash_escapes_change_where_statements_end() -> None:
    sql = r"SELECT 'a\'; DELETE FROM t; -- '"
    assert [r.verb for r in inspect(sql)] == ["SELECT"]
    assert [r.verb for r in inspect(sql, no_backslash_escapes=True)] == ["SELECT", "DELETE"]


def test_ansi_quotes() -> None:
    assert one('SELECT * FROM "Tbl"', ansi_quotes=True).tables == ("Tbl",)
    assert one('SELECT * FROM "Tbl"').tables == ()  # a string: a syntax error on the server


def test_spans_are_utf8_byte_offsets() -> None:
    sql = "SELECT 'é';  /* c */ DELETE FROM t ; "
    first, second = inspect(sql)
    data = sql.encode()
    assert first.span == (0, len("SELECT 'é'".encode()))
    assert second.span is not None
    assert data[second.span[0] : second.span[1]].decode() == "/* c */ DELETE FROM t"


def test_split_returns_statement_texts() -> None:
    sql = "SELECT 1; /*!50000 DROP TABLE x */ ;\n-- nothing\n; SELECT ';'"
    assert split(sql, **MARIADB) == ["SELECT 1", "/*!50000 DROP TABLE x */", "SELECT ';'"]
    assert split("SELECT 'open", **MARIADB) == ["SELECT 'open"]
    assert split("  ", **MARIADB) == []


def test_compound_statements() -> None:
    sql = "BEGIN NOT ATOMIC DELETE FROM t; UPDATE u SET a = 1; END; DROP TABLE x"
    compound, drop = inspect(sql)
    assert (compound.verb, compound.opaque) == ("OTHER", True)
    assert drop.verb == "DROP"
    loop = "lbl: LOOP SELECT 1; IF 1 THEN LEAVE lbl; END IF; END LOOP lbl; SELECT 2"
    assert [r.verb for r in inspect(loop)] == ["OTHER", "SELECT"]


@pytest.mark.parametrize(
    ("sql", "deferred"),
    [
        ("CREATE PROCEDURE p() BEGIN DELETE FROM t; SELECT 1; END", {"DELETE"}),
        ("CREATE PROCEDURE p() DELETE FROM t", {"DELETE"}),
        (
            "CREATE DEFINER=`root`@`%` PROCEDURE p(IN a INT) SQL SECURITY INVOKER BEGIN UPDATE t SET x = a; END",
            {"UPDATE"},
        ),
        (
            "CREATE FUNCTION f(a INT) RETURNS VARCHAR(10) CHARSET utf8mb4 DETERMINISTIC BEGIN RETURN 'x'; END",
            set(),
        ),
        (
            "CREATE TRIGGER tr BEFORE DELETE ON t FOR EACH ROW INSERT INTO log VALUES (OLD.id)",
            {"INSERT"},
        ),
        (
            "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW BEGIN IF NEW.a THEN DROP TABLE z; END IF; END",
            {"DROP"},
        ),
        ("CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO TRUNCATE TABLE logs", {"TRUNCATE"}),
        (
            "CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO BEGIN DELETE FROM a; REPLACE INTO b VALUES (1); END",
            {"DELETE", "REPLACE", "INSERT"},
        ),
        ("ALTER EVENT e DO DELETE FROM a", {"DELETE"}),
    ],
)
def test_stored_programs_defer_their_body(sql: str, deferred: set[str]) -> None:
    info = one(sql)
    assert info.verb in ("CREATE", "ALTER")
    assert info.verbs == {info.verb}
    assert set(info.deferred) == deferred


@pytest.mark.parametrize(
    "tail",
    [
        "; DROP TABLE x",
        ";\nDROP TABLE x",
    ],
)
@pytest.mark.parametrize(
    "routine",
    [
        "CREATE PROCEDURE p() BEGIN SELECT 1; END",
        "CREATE PROCEDURE p() BEGIN DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; END; SELECT 1; END",
        "CREATE PROCEDURE p() BEGIN DECLARE CONTINUE HANDLER FOR SQLSTATE '23000', NOT FOUND SET @x = 1; END",
        "CREATE PROCEDURE p() BEGIN CASE WHEN 1 THEN SELECT CASE WHEN 2 THEN 3 END; ELSE BEGIN END; END CASE; END",
        "CREATE PROCEDURE p() BEGIN REPEAT SET @a = @a + 1; UNTIL @a > 3 END REPEAT; END",
        "CREATE PROCEDURE p() BEGIN WHILE (SELECT CASE WHEN 1 THEN 1 END) DO SELECT 1; END WHILE; END",
        "CREATE PROCEDURE p(begin INT) SELECT begin",  # a simple body; BEGIN only a parameter
        "CREATE PROCEDURE p() SELECT CASE WHEN 1 THEN 2 END",
        "CREATE FUNCTION f() RETURNS SET('a', 'b') RETURN 'a'",
        "CREATE FUNCTION f RETURNS STRING SONAME 'udf.so'",
        "CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW FOLLOWS other BEGIN SET NEW.a = 1; END",
    ],
)
def test_a_statement_after_a_stored_program_is_seen(routine: str, tail: str) -> None:
    results = inspect(routine + tail)
    assert [r.verb for r in results] == ["CREATE", "DROP"], results


def test_prepare_inspects_its_body() -> None:
    info = one("PREPARE Stmt FROM 'DELETE FROM t WHERE id = ?'")
    assert (info.verb, info.prepare_name) == ("PREPARE", "stmt")
    assert info.body is not None and info.body.verb == "DELETE"
    assert info.deferred == {"DELETE"}
    assert info.verbs == {"PREPARE"}
    escaped = one(r"PREPARE s FROM 'SELECT \'x\'; DROP TABLE t'")
    assert escaped.body is not None and not escaped.body.ok  # two statements: the server refuses
    assert one("PREPARE s FROM 'DROP ' 'TABLE t'").deferred == {"DROP"}
    assert one("PREPARE s FROM '/*!50000 DROP TABLE t */'").deferred == {"DROP"}


def test_prepare_with_an_unlexable_body() -> None:
    info = one("PREPARE s FROM 'SELECT ''open'")
    assert info.ok and info.body is not None and not info.body.ok
    assert info.deferred == {"OTHER"}


def test_prepare_from_a_variable_has_no_body() -> None:
    info = one("PREPARE s FROM @sql")
    assert info.body is None and info.deferred == {"OTHER"} and info.prepare_name == "s"


def test_execute_and_deallocate() -> None:
    execute = one("EXECUTE S USING @a, @b")
    assert (execute.verb, execute.opaque, execute.execute_name) == ("EXECUTE", True, "s")
    assert one("DEALLOCATE PREPARE s").deallocate_name == "s"
    assert one("DROP PREPARE s").verb == "DEALLOCATE"
    immediate = one("EXECUTE IMMEDIATE 'DROP TABLE t'")
    assert immediate.verbs == {"EXECUTE", "DROP"} and immediate.tables == ("t",)
    assert one("EXECUTE IMMEDIATE @q").opaque


def test_call_is_opaque_and_do_is_not() -> None:
    assert one("CALL purge()").opaque
    assert not one("DO 1").opaque


@settings(max_examples=300)
@given(st.text())
def test_inspect_never_raises(sql: str) -> None:
    results = inspect(sql)
    assert isinstance(results, tuple)
    assert all(isinstance(r, StatementInfo) for r in results)
    assert all(r.verbs <= VERBS for r in results)


_WORDS = ["SELECT", "DELETE", "FROM", "t", "WHERE", "BEGIN", "END", "IF", "CASE", "THEN"]
_MORE_WORDS = ["CREATE", "PROCEDURE", "p()", "TRIGGER", "DROP", "TABLE", "PREPARE", "s", "@v"]
_MARKS = [";", "'", '"', "`", "/*", "*/", "/*!", "/*!50000", "/*!99999", "/*M!", "--", "-- "]
_MORE_MARKS = ["#", "\n", "\\", "(", ")", "1", "ANALYZE", "NOT", "ATOMIC", "LOOP"]
_SQLISH = st.lists(
    st.sampled_from([*_WORDS, *_MORE_WORDS, *_MARKS, *_MORE_MARKS]), max_size=30
).map(" ".join)


@settings(max_examples=500)
@given(_SQLISH)
def test_inspect_never_raises_on_sql_like_text(sql: str) -> None:
    results = inspect(sql)
    assert all(isinstance(r, StatementInfo) for r in results)

"""The MySQL inspector against a real MariaDB: what it reports is what the server does.

Each case runs tricky SQL (version comments around the server's own version, `-- ` and `#`
comments, backslash quotes) as one multi-statement query against a fresh table `x` with
three rows, then looks at what happened to `x`. The inspector must have reported it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from policies.sql.model import StatementInfo
from policies.sql.mysql import inspect

pymysql = pytest.importorskip("pymysql", reason="PyMySQL is not installed (pip install -e .[dev])")

pytestmark = pytest.mark.mariadb

HOST, PORT, USER = "127.0.0.1", 3306, "root"


@dataclass(frozen=True)
class Server:
    database: str
    version: int  # M*10000 + m*100 + p, as /*!NNNNN compares it

    def connect(self, sql_mode: str | None = None) -> pymysql.connections.Connection:
        conn = pymysql.connect(
            host=HOST,
            port=PORT,
            user=USER,
            password="",
            database=self.database,
            autocommit=True,
            client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS,
        )
        if sql_mode is not None:
            with conn.cursor() as cur:
                cur.execute("SET SESSION sql_mode = %s", (sql_mode,))
        return conn


def _version(text: str) -> int:
    major, minor, patch = (int(part) for part in text.split("-")[0].split(".")[:3])
    return major * 10000 + minor * 100 + patch


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    try:
        admin = pymysql.connect(host=HOST, port=PORT, user=USER, password="", autocommit=True)
    except pymysql.MySQLError as exc:
        pytest.skip(f"MariaDB is not reachable at {HOST}:{PORT} as {USER}: {exc}")
    database = f"sluice_test_{secrets.token_hex(4)}"
    with admin.cursor() as cur:
        cur.execute("SELECT VERSION()")
        (version_text,) = cur.fetchone()
        if "mariadb" not in version_text.lower():
            pytest.skip(f"the server at {HOST}:{PORT} is not MariaDB ({version_text})")
        cur.execute(f"CREATE DATABASE `{database}`")
    try:
        yield Server(database, _version(version_text))
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()


def _outcome(server: Server, sql: str, sql_mode: str | None) -> str:
    """Run `sql` against a fresh `x` (ids 1, 2, 3); what became of `x`."""
    with server.connect() as setup, setup.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS x")
        cur.execute("CREATE TABLE x (id INT PRIMARY KEY)")
        cur.execute("INSERT INTO x VALUES (1), (2), (3)")
    with server.connect(sql_mode) as conn, conn.cursor() as cur:
        try:
            cur.execute(sql)
            while cur.nextset():
                pass
        except pymysql.MySQLError:
            pass  # the server stops at the first failing statement; look at what ran
    with server.connect() as check, check.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'x'"
        )
        if cur.fetchone() == (0,):
            return "dropped"
        cur.execute("SELECT COUNT(*) FROM x")
        (rows,) = cur.fetchone()
    return {0: "all deleted", 2: "one deleted", 3: "unchanged"}[rows]


def _predicted(results: tuple[StatementInfo, ...]) -> str:
    """What the inspection says happens to `x`."""
    if any(r.opaque for r in results):
        return "opaque"
    if any("DROP" in r.verbs for r in results):
        return "dropped"
    deletes = [r for r in results if "DELETE" in r.verbs]
    if any(r.no_where for r in deletes):
        return "all deleted"
    return "one deleted" if deletes else "unchanged"


# (sql, what the server does, does the inspector report exactly that). `{v}` is the server's
# version, `{v1}` the next one. Inexact cases are those the server rejects part-way: the
# inspector may report more than ran, never less.
CASES: list[tuple[str, str, bool]] = [
    ("DELETE FROM x /*!99999 WHERE id = 1 */", "all deleted", True),
    ("DELETE FROM x /*!50000 WHERE id = 1 */", "one deleted", True),
    ("DELETE FROM x /*!{v} WHERE id = 1 */", "one deleted", True),
    ("DELETE FROM x /*!{v1} WHERE id = 1 */", "all deleted", True),
    ("DELETE FROM x /*M!{v} WHERE id = 1 */", "one deleted", True),
    ("DELETE FROM x /*M!{v1} WHERE id = 1 */", "all deleted", True),
    ("DELETE FROM x /*!50700 WHERE id = 1 */", "all deleted", True),  # MariaDB skips 5.7+
    ("DELETE FROM x /*M!50700 WHERE id = 1 */", "one deleted", True),
    ("DELETE FROM x /*! WHERE id = 1 */", "one deleted", True),
    ("DELETE FROM x /*!{v} WHERE id = 1 /* note */ AND 1 */", "one deleted", True),
    ("DELETE FROM x WHERE id = 1 /*!99999 OR 1 = 1 */", "one deleted", True),
    # read by the server, so every row goes; the statement still has its WHERE
    ("DELETE FROM x WHERE id = 1 /*!{v} OR 1 = 1 */", "all deleted", False),
    ("/*!50000 DROP TABLE x */", "dropped", True),
    ("/*!{v} DROP TABLE x */", "dropped", True),
    ("/*M!{v} DROP TABLE x */", "dropped", True),
    ("/*!{v1} DROP TABLE x */", "unchanged", True),
    ("SELECT 1; /*!99999 DROP TABLE x */", "unchanged", True),
    ("SELECT 1 -- ; DROP TABLE x", "unchanged", True),
    ("SELECT 1 --\t; DROP TABLE x", "unchanged", True),
    ("SELECT 1 --1; DROP TABLE x", "dropped", True),
    ("SELECT 1 # ; DROP TABLE x", "unchanged", True),
    ("SELECT 1 /* ; DROP TABLE x */", "unchanged", True),
    ("SELECT 1; DROP TABLE x", "dropped", True),
    ("DELETE FROM x WHERE id = 1 -- ; DELETE FROM x", "one deleted", True),
    ("DELETE FROM x\n# WHERE id = 1", "all deleted", True),
    ("DELETE FROM x --\tWHERE id = 1", "all deleted", True),
    ("DELETE FROM x WHERE id = 1 --\n; DELETE FROM x", "all deleted", True),
    ("SELECT 'a\\'; DROP TABLE x; -- '", "unchanged", True),
    ("SELECT 'a'';DROP TABLE x;'", "unchanged", True),
    ('SELECT "a\\";DROP TABLE x;"', "unchanged", True),
    ("SELECT `a;DROP TABLE x;` FROM (SELECT 1 AS `a;DROP TABLE x;`) t", "unchanged", True),
    ("SELECT 1 /*! ; DROP TABLE x */", "unchanged", False),  # a syntax error on the server
    ("EXPLAIN DELETE FROM x", "unchanged", True),
    ("ANALYZE DELETE FROM x WHERE id = 1", "one deleted", True),
    ("SET STATEMENT max_statement_time=10 FOR DELETE FROM x", "all deleted", True),
    ("EXECUTE IMMEDIATE 'DROP TABLE x'", "dropped", True),
    ("PREPARE s FROM 'DROP TABLE x'", "unchanged", True),
    ("CREATE PROCEDURE p1() BEGIN DROP TABLE x; END; SELECT 1", "unchanged", True),
    ("CREATE PROCEDURE p2() BEGIN SELECT 1; END; DROP TABLE x", "dropped", True),
    ("BEGIN NOT ATOMIC DELETE FROM x; END", "opaque", True),
]


@pytest.mark.parametrize(("sql", "expected", "exact"), CASES)
def test_inspector_agrees_with_mariadb(
    server: Server, sql: str, expected: str, exact: bool
) -> None:
    sql = sql.format(v=server.version, v1=server.version + 1)
    observed = _outcome(server, sql, None)
    predicted = _predicted(inspect(sql, server_version=server.version, mariadb=True))
    if expected == "opaque":
        assert predicted == "opaque"
        return
    assert observed == expected, f"the server did not do what this case documents: {sql!r}"
    if exact:
        assert predicted == observed, sql
    else:
        assert predicted != "unchanged" or observed == "unchanged", sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 'a\\'; DROP TABLE x; -- '", "dropped"),
        ("DELETE FROM x WHERE id = 1 AND 'a\\' <> ''; DELETE FROM x; -- '", "all deleted"),
    ],
)
def test_no_backslash_escapes(server: Server, sql: str, expected: str) -> None:
    observed = _outcome(server, sql, "NO_BACKSLASH_ESCAPES")
    assert observed == expected
    results = inspect(sql, server_version=server.version, mariadb=True, no_backslash_escapes=True)
    assert _predicted(results) == observed


def test_ansi_quotes(server: Server) -> None:
    sql = 'SELECT "a;DROP TABLE x;" FROM (SELECT 1 AS "a;DROP TABLE x;") t'
    assert _outcome(server, sql, "ANSI_QUOTES") == "unchanged"
    results = inspect(sql, server_version=server.version, ansi_quotes=True)
    assert [r.verb for r in results] == ["SELECT"]

"""The MySQL sidecar end to end: real MariaDB 127.0.0.1:3306, real clients (the mariadb
command-line client, PyMySQL, mysql-connector-python) through a sidecar in this process.
Every denial is checked against the server's truth, read around the sidecar."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT

from sidecar import connection
from sidecar.connection import PassingClientSide, PassingServerSide
from sidecar.mysql_handshake import COMMAND
from sidecar.mysql_session import MySqlSession
from tests.sidecar.conftest import GUARD_POLICY, RunningSidecar

pytestmark = pytest.mark.mariadb

HOST, PORT, USER = "127.0.0.1", 3306, "root"
POLICY = GUARD_POLICY  # deny, no-WHERE, reject and delay limits (tests/sidecar/conftest.py)


def _direct(db: str | None = None, **extra: object) -> pymysql.Connection:
    return pymysql.connect(
        host=HOST, port=PORT, user=USER, database=db, autocommit=True, connect_timeout=3, **extra
    )


@pytest.fixture(scope="module")
def scratch() -> Iterator[str]:
    try:
        _direct().close()
    except pymysql.MySQLError as exc:
        pytest.skip(f"MariaDB is not reachable on {HOST}:{PORT} ({exc})")
    name = f"sluice_test_{secrets.token_hex(4)}"
    with _direct() as c, c.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    yield name
    with _direct() as c, c.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def db(scratch: str) -> str:
    with _direct(scratch) as c, c.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS keep, limited, paced")
        cur.execute("CREATE TABLE keep (id int primary key, v varchar(20))")
        cur.execute("INSERT INTO keep VALUES (1,'v1'),(2,'v2'),(3,'v3'),(4,'v4'),(5,'v5')")
        cur.execute("CREATE TABLE limited (id int)")
        cur.execute("CREATE TABLE paced (id int)")
    return scratch


def truth(db: str, sql: str = "SELECT count(*) FROM keep") -> object:
    """What the server says, bypassing the sidecar."""
    with _direct(db) as c, c.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest.fixture
def start_mysql(start_sidecar: Callable[..., RunningSidecar]) -> Callable[..., RunningSidecar]:
    """`start_sidecar` (conftest) with a MySQL route, in front of the MariaDB here."""

    def start(policy: str = POLICY, *, upstream: tuple[str, int] = (HOST, PORT)) -> RunningSidecar:
        return start_sidecar(policy, protocol="mysql", upstream=upstream)

    return start


def connect(sc: RunningSidecar, db: str, **extra: object) -> pymysql.Connection:
    return pymysql.connect(
        host=sc.host, port=sc.port, user=USER, database=db, autocommit=True, **extra
    )


class Passes:
    """Records the reads the live driver's MySQL session (`connection.MYSQL_SESSION`, the
    compiled build when it is current) returned from `client_pass`/`server_pass` to be
    written as they came: (side, the session's phase as the read came, the read)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, int, bytes]] = []
        live = connection.MYSQL_SESSION
        for side, name in (("c", "client_pass"), ("s", "server_pass")):
            monkeypatch.setattr(live, name, self._wrap(side, getattr(live, name)))

    def _wrap(
        self, side: str, original: Callable[[MySqlSession, bytes], bytes | None]
    ) -> Callable[[MySqlSession, bytes], bytes | None]:
        def recorded(session: MySqlSession, data: bytes) -> bytes | None:
            phase = session._phase
            passed = original(session, data)
            if passed is not None:
                self.reads.append((side, phase, bytes(passed)))
            return passed

        return recorded

    def sides(self) -> list[str]:
        return [side for side, _, _ in self.reads]

    def check_phases(self) -> None:
        """Nothing was passed before the command phase (greeting, TLS, authentication)."""
        assert all(phase == COMMAND for _, phase, _ in self.reads)


def test_pymysql_deny_answers_1142_and_the_session_continues(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db) as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM keep")
        assert cur.fetchall() == ((5,),)
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("DROP TABLE keep")
        assert info.value.args == (
            1142,
            "sluice: DROP denied by policy guard, rule guard/no-drop: ask the DBA",
        )
        with pytest.raises(pymysql.MySQLError) as info:
            cur.execute("DELETE FROM keep")
        assert info.value.args[0] == 1142
        assert cur.execute("DELETE FROM keep WHERE id = 5") == 1
        cur.execute("SELECT count(*) FROM keep")
        assert cur.fetchall() == ((4,),)
    assert truth(db) == ((4,),)


@pytest.mark.parametrize(
    "sql",
    [
        "/*!50000 DROP TABLE keep */",
        "/*!DROP TABLE keep */",
        "/*M!100000 DROP TABLE keep */",
        "DELETE FROM keep /*!99999 WHERE id = 1 */",
        "DELETE FROM keep /*M!999999 WHERE id = 1 */",
        "DROP TABLE keep; SELECT 1",
        "/*!50000 SELECT 1; DROP TABLE keep */",
    ],
)
def test_executable_comments_and_multi_statements_seen_as_the_server_sees_them(
    start_mysql, db: str, sql: str
) -> None:
    sc = start_mysql()
    with connect(sc, db, client_flag=CLIENT.MULTI_STATEMENTS) as c, c.cursor() as cur:
        with pytest.raises(pymysql.MySQLError) as info:
            cur.execute(sql)
        assert info.value.args[0] == 1142
        cur.execute("SELECT 1")  # the session goes on
        assert cur.fetchall() == ((1,),)
    # The whole string was refused: nothing of it ran.
    assert truth(db, "SELECT id, v FROM keep ORDER BY id") == tuple(
        (i, f"v{i}") for i in range(1, 6)
    )


def results_until_error(cur: pymysql.cursors.Cursor, sql: str) -> tuple[list[object], object]:
    """What the app sees of a multi-statement string: each result, then the error if any."""
    seen: list[object] = []
    try:
        cur.execute(sql)
        seen.append((cur.rowcount, cur.fetchall()))
        while cur.nextset():
            seen.append((cur.rowcount, cur.fetchall()))
    except pymysql.MySQLError as exc:
        return seen, exc.args[0]
    return seen, None


MULTI = [
    "UPDATE keep SET v = 'a' WHERE id = 1; {}; UPDATE keep SET v = 'b' WHERE id = 2",
    "UPDATE keep SET v = 'a' WHERE id = 1; SELECT v FROM keep WHERE id < 3 ORDER BY id;\n"
    "  -- the next one\n  {}; UPDATE keep SET v = 'b' WHERE id = 2",
    "SELECT 'é' AS e; UPDATE keep SET v = 'a' WHERE id = 1; {}; SELECT 2",
]


@pytest.mark.parametrize("template", MULTI)
@pytest.mark.parametrize("charset", ["utf8mb4", "latin1"])
def test_multi_statement_runs_up_to_the_denied_statement_like_a_server_error(
    start_mysql, db: str, template: str, charset: str
) -> None:
    """`a; DENIED; b` through the sidecar looks like `a; <failing>; b` direct: the same
    results, then an error, the same rows changed, and the connection goes on."""
    with _direct(db, client_flag=CLIENT.MULTI_STATEMENTS, charset=charset) as c:
        native, code = results_until_error(c.cursor(), template.format("SELECT * FROM nope"))
        assert code == 1146
        with c.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
    changed = truth(db, "SELECT id, v FROM keep ORDER BY id")
    with _direct(db) as c, c.cursor() as cur:
        cur.execute("UPDATE keep SET v = CONCAT('v', id)")
    sc = start_mysql()
    with connect(sc, db, client_flag=CLIENT.MULTI_STATEMENTS, charset=charset) as c:
        seen, code = results_until_error(c.cursor(), template.format("DROP TABLE keep"))
        assert (seen, code) == (native, 1142)
        with c.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
    assert truth(db, "SELECT id, v FROM keep ORDER BY id") == changed
    assert changed[:2] == ((1, "a"), (2, "v2"))
    events = sc.events(lambda es: any(e.decision == "deny" for e in es))
    denied = [e for e in events if e.decision == "deny"]
    assert [(e.verbs, e.tables, e.error) for e in denied] == [(("DROP",), ("keep",), "42000")]


def test_multi_statement_failing_before_the_denied_one_shows_only_the_servers_error(
    start_mysql, db: str
) -> None:
    sql = "UPDATE keep SET v = 'a' WHERE id = 1; SELECT * FROM nope; DROP TABLE keep; SELECT 2"
    sc = start_mysql()
    with connect(sc, db, client_flag=CLIENT.MULTI_STATEMENTS) as c:
        seen, code = results_until_error(c.cursor(), sql)
        assert (seen, code) == ([(1, [])], 1146)
        with c.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
    assert truth(db, "SELECT v FROM keep WHERE id = 1") == (("a",),)
    assert truth(db) == ((5,),)
    events = sc.events(lambda es: any(e.decision == "deny" for e in es))
    denied = [e for e in events if e.decision == "deny"]
    assert [(e.statement, e.error) for e in denied] == [("DROP TABLE keep", "skipped")]


def test_multi_statement_prepare_then_denied_execute(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db, client_flag=CLIENT.MULTI_STATEMENTS) as c, c.cursor() as cur:
        seen, code = results_until_error(cur, "PREPARE s FROM 'DELETE FROM keep'; EXECUTE s")
        assert (seen, code) == ([(0, [])], 1142)
        with pytest.raises(pymysql.MySQLError) as info:
            cur.execute("EXECUTE s")  # prepared by the prefix, known to the sidecar
        assert info.value.args[0] == 1142
    assert truth(db) == ((5,),)


def test_version_comment_the_server_skips_is_allowed_and_runs(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db) as c, c.cursor() as cur:
        assert cur.execute("DELETE FROM keep WHERE id = 1 /*!99999 OR 1 = 1 */") == 1
    assert truth(db) == ((4,),)


def test_multi_statement_results_and_sql_level_prepare(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db, client_flag=CLIENT.MULTI_STATEMENTS) as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM keep; UPDATE keep SET v = 'x' WHERE id = 2; SELECT 7")
        assert cur.fetchall() == ((5,),)
        assert cur.nextset()
        assert cur.nextset()
        assert cur.fetchall() == ((7,),)
        cur.execute("PREPARE s FROM 'DELETE FROM keep'")
        with pytest.raises(pymysql.MySQLError) as info:
            cur.execute("EXECUTE s")
        assert info.value.args[0] == 1142
        cur.execute("PREPARE s FROM 'SELECT count(*) FROM keep'")
        cur.execute("EXECUTE s")
        assert cur.fetchall() == ((5,),)
    assert truth(db, "SELECT v FROM keep WHERE id = 2") == (("x",),)


def test_denial_inside_a_transaction_leaves_it_open_like_the_server(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db) as c, c.cursor() as cur:
        c.begin()
        cur.execute("UPDATE keep SET v = 'changed' WHERE id = 1")
        with pytest.raises(pymysql.MySQLError):
            cur.execute("TRUNCATE keep")
        cur.execute("SELECT v FROM keep WHERE id = 1")
        assert cur.fetchall() == (("changed",),)
        c.rollback()
    assert truth(db, "SELECT v FROM keep WHERE id = 1") == (("v1",),)


def test_mysql_connector_prepared_statements_denied_at_prepare(start_mysql, db: str) -> None:
    sc = start_mysql()
    cnx = mysql.connector.connect(
        host=sc.host, port=sc.port, user=USER, database=db, autocommit=True, use_pure=True
    )
    try:
        cur = cnx.cursor(prepared=True)
        cur.execute("SELECT v FROM keep WHERE id = %s", (3,))
        assert cur.fetchall() == [("v3",)]
        with pytest.raises(mysql.connector.Error) as info:
            cur.execute("DELETE FROM keep")
        assert info.value.errno == 1142
        assert info.value.sqlstate == "42000"
        cur = cnx.cursor(prepared=True)
        cur.execute("DELETE FROM keep WHERE id = %s", (4,))
        assert cur.rowcount == 1
        for i in range(3):  # re-executions decided again, by statement id
            cur.execute("DELETE FROM keep WHERE id = %s", (10 + i,))
        plain = cnx.cursor()
        plain.execute("SELECT count(*) FROM keep")
        assert plain.fetchall() == [(4,)]
        cnx.cmd_change_user(username=USER, password="", database=db)  # re-auth passes through
        plain = cnx.cursor()
        plain.execute("SELECT DATABASE()")
        assert plain.fetchall() == [(db,)]
    finally:
        cnx.close()
    assert truth(db) == ((4,),)


def test_utility_commands_pass_through_and_closed_statements_are_unknown(
    start_mysql, db: str
) -> None:
    sc = start_mysql()
    with connect(sc, db) as c, c.cursor() as cur:
        c.ping(reconnect=False)  # COM_PING
        c.select_db("mysql")  # COM_INIT_DB
        cur.execute("SELECT DATABASE()")
        assert cur.fetchall() == (("mysql",),)
        c.select_db(db)
        with pytest.raises(pymysql.MySQLError) as info:
            cur.execute("DELETE FROM keep")
        assert info.value.args[0] == 1142
    cnx = mysql.connector.connect(
        host=sc.host, port=sc.port, user=USER, database=db, autocommit=True, use_pure=True
    )
    try:
        # COM_STMT_PREPARE / EXECUTE / RESET / CLOSE, spoken one by one.
        select = cnx.cmd_stmt_prepare(b"SELECT v FROM keep WHERE id = ?")
        assert _executed(cnx, select, 3) == [("v3",)]
        cnx.cmd_stmt_reset(select["statement_id"])
        delete = cnx.cmd_stmt_prepare(b"DELETE FROM keep WHERE id = ?")
        assert _executed(cnx, delete, 1)["affected_rows"] == 1
        cnx.cmd_stmt_close(delete["statement_id"])  # no answer: the next command must not wait
        assert _executed(cnx, select, 2) == [("v2",)]
        # A closed statement's id is one neither the server nor the sidecar knows: answered
        # as the server answers it, never forwarded nor run on its old decision.
        with pytest.raises(mysql.connector.Error) as refused:
            _executed(cnx, delete, 2)
        assert (refused.value.errno, refused.value.sqlstate) == (1243, "HY000")
        assert f"handler ({delete['statement_id']})" in refused.value.msg
        assert cnx.cmd_reset_connection()  # COM_RESET_CONNECTION: every statement is gone
        with pytest.raises(mysql.connector.Error) as gone:
            _executed(cnx, select, 2)
        assert gone.value.errno == 1243
        cnx.cmd_init_db(db)
        cur = cnx.cursor()
        cur.execute("SELECT count(*) FROM keep")
        assert cur.fetchall() == [(4,)]
    finally:
        cnx.close()  # COM_QUIT
    assert truth(db) == ((4,),)
    events = sc.events(lambda es: sum(e.verbs == ("DELETE",) for e in es) >= 2)
    deletes = [e for e in events if e.verbs == ("DELETE",)]
    assert [(e.decision, e.rows) for e in deletes] == [("deny", None), ("allow", 1)]
    unknown = [e for e in events if e.verbs == ("EXECUTE",)]
    assert [(e.decision, e.error) for e in unknown] == [("deny", "HY000")] * 2


def _executed(cnx: Any, statement: dict[str, Any], value: int) -> Any:
    """COM_STMT_EXECUTE of a statement from `cmd_stmt_prepare`: its rows, or its OK."""
    result = cnx.cmd_stmt_execute(
        statement["statement_id"], data=(value,), parameters=statement["parameters"]
    )
    if isinstance(result, dict):
        return result
    cnx.unread_result = True  # what the library's prepared cursor does before reading rows
    return cnx.get_rows(binary=True, columns=result[1])[0]


def test_mariadb_cli_denied_statement_and_the_rest_runs(start_mysql, db: str) -> None:
    if shutil.which("mariadb") is None:
        pytest.skip("the mariadb client is not installed")
    sc = start_mysql()
    script = "SELECT 'before';\nDROP TABLE keep;\nDELETE FROM keep WHERE id = 1;\nSELECT 'after';\n"
    done = subprocess.run(
        ["mariadb", "-h", sc.host, "-P", str(sc.port), "-u", USER, "--force", "-N", db],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.split() == ["before", "after"]
    assert (
        "ERROR 1142 (42000) at line 2: sluice: DROP denied by policy guard, rule "
        "guard/no-drop: ask the DBA" in done.stderr
    )
    assert truth(db) == ((4,),)


def test_limits_reject_with_1226_and_delay(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db) as c, c.cursor() as cur:
        for i in range(3):
            cur.execute("INSERT INTO limited VALUES (%s)", (i,))
        with pytest.raises(pymysql.MySQLError) as info:
            cur.execute("INSERT INTO limited VALUES (99)")
        assert info.value.args[0] == 1226
        assert "rate limit guard/few-inserts exceeded" in info.value.args[1]
        started = time.monotonic()
        for i in range(3):
            cur.execute("INSERT INTO paced VALUES (%s)", (i,))
        assert time.monotonic() - started >= 0.15  # burst 1 at 10/s: two waits of 0.1 s
    assert truth(db, "SELECT count(*) FROM limited") == ((3,),)
    events = sc.events(lambda es: sum(e.decision == "delay" for e in es) >= 2)
    assert sum(e.decision == "reject" for e in events) == 1


def test_audit_events(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db) as c, c.cursor() as cur:
        cur.execute("SELECT v FROM keep WHERE id IN (1, 2)")
        with pytest.raises(pymysql.MySQLError):
            cur.execute("DROP TABLE keep")
        with pytest.raises(pymysql.MySQLError):
            cur.execute("SELECT * FROM no_such_table")
    events = sc.events(lambda es: any(e.error == "42S02" for e in es))
    by_statement = {e.statement: e for e in events if e.protocol == "mysql"}
    ok = by_statement["SELECT v FROM keep WHERE id IN (?, ?)"]
    assert (ok.decision, ok.rows, ok.error, ok.verbs, ok.tables) == (
        "allow",
        2,
        None,
        ("SELECT",),
        ("keep",),
    )
    denied = by_statement["DROP TABLE keep"]
    assert (denied.decision, denied.rule, denied.error) == ("deny", "guard/no-drop", "42000")
    assert by_statement["SELECT * FROM no_such_table"].error == "42S02"


def test_the_driver_writes_unchanged_reads_as_they_came(
    start_sidecar: Callable[..., RunningSidecar], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's MySQL sides write what the session passes on unchanged straight to the
    other side (`PassingClientSide`/`PassingServerSide`): executions of a prepared statement
    (audit non-allow: on their cached plain decision), their rows, allowed queries; never
    the connection phase, nor a denial. The app sees the server's answers and the
    sidecar's, in order."""
    passes = Passes(monkeypatch)
    sc = start_sidecar(POLICY, protocol="mysql", upstream=(HOST, PORT), record="non-allow")
    cnx = mysql.connector.connect(
        host=sc.host, port=sc.port, user=USER, database=db, autocommit=True, use_pure=True
    )
    try:
        assert sc.sidecar is not None
        (side,) = sc.sidecar.routes[0].sessions
        assert type(side) is PassingClientSide and type(side.upstream) is PassingServerSide
        opened = len(passes.reads)
        cur = cnx.cursor(prepared=True)
        for i in (1, 2, 3, 2, 1):
            cur.execute("SELECT id FROM keep WHERE id = %s", (i,))
            assert cur.fetchall() == [(i,)]
        plain = cnx.cursor()
        with pytest.raises(mysql.connector.Error) as info:
            plain.execute("DROP TABLE keep")
        assert info.value.errno == 1142
        plain.execute("SELECT count(*) FROM keep")
        assert plain.fetchall() == [(5,)]
    finally:
        cnx.close()
    assert truth(db) == ((5,),)
    passes.check_phases()
    sides = passes.sides()[opened:]
    # The prepare, five executions and the count, and their answers.
    assert sides.count("c") >= 7 and sides.count("s") >= 7
    assert all(b"DROP" not in data for _, _, data in passes.reads)


def test_load_data_local_infile_passes_through(start_mysql, db: str, tmp_path: Path) -> None:
    data = tmp_path / "rows.tsv"
    data.write_text("".join(f"{i}\tl{i}\n" for i in range(100, 110)))
    sc = start_mysql()
    with connect(sc, db, local_infile=True) as c, c.cursor() as cur:
        cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE keep")
        cur.execute("SELECT count(*) FROM keep")
        assert cur.fetchall() == ((15,),)
    events = sc.events(lambda es: any("LOAD" in e.verbs for e in es))
    assert any(set(e.verbs) >= {"LOAD", "INSERT"} for e in events)


def test_authentication_native_password_and_ed25519(start_mysql, db: str) -> None:
    user, password = f"sluice_{secrets.token_hex(3)}", "s3cret-pw"
    with _direct() as c, c.cursor() as cur:
        cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
        cur.execute(f"GRANT SELECT ON `{db}`.* TO '{user}'@'%'")
    sc = start_mysql()
    try:
        with (
            pymysql.connect(
                host=sc.host, port=sc.port, user=user, password=password, database=db
            ) as c,
            c.cursor() as cur,
        ):
            cur.execute("SELECT count(*) FROM keep")
            assert cur.fetchall() == ((5,),)
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host=sc.host, port=sc.port, user=user, password="wrong")
        assert info.value.args[0] == 1045
        _check_ed25519(sc, user, password, db)
    finally:
        with _direct() as c, c.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def _check_ed25519(sc: RunningSidecar, user: str, password: str, db: str) -> None:
    if shutil.which("mariadb") is None:
        return
    with _direct() as c, c.cursor() as cur:
        cur.execute(
            "SELECT plugin_status FROM information_schema.plugins WHERE plugin_name='ed25519'"
        )
        if not cur.fetchall():
            try:
                cur.execute("INSTALL SONAME 'auth_ed25519'")
            except pymysql.MySQLError as exc:
                pytest.skip(f"ed25519 is not available on this server: {exc}")
        cur.execute(f"ALTER USER '{user}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{password}')")
    done = subprocess.run(
        ["mariadb", "-h", sc.host, "-P", str(sc.port), "-u", user, f"-p{password}", "-N", db],
        input="SELECT count(*) FROM keep;\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5"]


def test_upstream_down_gives_an_error_naming_it(start_mysql) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    sc = start_mysql(upstream=("127.0.0.1", port))
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host=sc.host, port=sc.port, user=USER, connect_timeout=5)
    assert time.monotonic() - started < 5
    assert info.value.args[0] == 1043  # ER_HANDSHAKE_ERROR, SQLSTATE 08S01
    assert "sluice: cannot connect to upstream orders-db" in str(info.value.args[1])
    # The mariadb client shows the sidecar's code and message (it calls a server sending a
    # client-library code such as 2003 a malformed packet); it adds that an error before
    # its TLS handshake cannot be authenticated.
    cli = subprocess.run(
        ["mariadb", "-h", sc.host, "-P", str(sc.port), "-u", USER, "-e", "SELECT 1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode != 0
    assert "1043" in cli.stderr and "malformed" not in cli.stderr, cli.stderr
    assert "sluice: cannot connect to upstream orders-db" in cli.stderr, cli.stderr


def test_malformed_packet_closes_only_that_connection(start_mysql, db: str) -> None:
    sc = start_mysql()
    with connect(sc, db) as healthy, socket.create_connection((sc.host, sc.port), 5) as raw:
        raw.settimeout(5)
        greeting = _read_packet(raw)
        assert greeting[0] == 10
        raw.sendall(b"\x05\x00\x00\x01hello")  # a HandshakeResponse of five bytes
        err = _read_packet(raw)
        assert err[0] == 0xFF and int.from_bytes(err[1:3], "little") == 1156
        assert b"sluice: invalid packet from the client" in err
        assert raw.recv(100) == b""  # closed
        with healthy.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)


def _read_packet(sock: socket.socket) -> bytes:
    head = _recv_exactly(sock, 4)
    return _recv_exactly(sock, int.from_bytes(head[:3], "little"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed")
        out += chunk
    return out

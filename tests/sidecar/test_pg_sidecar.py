"""The PostgreSQL sidecar end to end: real PostgreSQL 127.0.0.1:5432, real clients (psql,
psycopg 3, asyncpg, pgbench) through a sidecar running in this process."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import textwrap
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors

from tests.sidecar.conftest import GUARD_POLICY

pytestmark = pytest.mark.postgres

POLICY = GUARD_POLICY  # deny, no-WHERE, reject and delay limits (tests/sidecar/conftest.py)


@pytest.fixture
def db(scratch_db: str) -> str:
    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname=scratch_db, autocommit=True
    ) as c:
        c.execute("DROP TABLE IF EXISTS keep, limited, paced, big")
        c.execute("CREATE TABLE keep (id int primary key, v text)")
        c.execute("INSERT INTO keep SELECT g, 'v' || g FROM generate_series(1, 5) g")
        c.execute("CREATE TABLE limited (id int)")
        c.execute("CREATE TABLE paced (id int)")
    return scratch_db


def keep_rows(db: str) -> int:
    """What the server says, bypassing the sidecar."""
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=db) as c:
        row = c.execute("SELECT count(*) FROM keep").fetchone()
        assert row is not None
        return int(row[0])


def test_simple_query_deny_keeps_the_session(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM keep").fetchone() == (5,)
        with pytest.raises(errors.InsufficientPrivilege) as info:
            c.execute("DROP TABLE keep")
        diag = info.value.diag
        assert diag.sqlstate == "42501"
        assert (
            diag.message_primary
            == "sluice: DROP denied by policy guard, rule guard/no-drop: ask the DBA"
        )
        assert diag.context is None  # the raising statement does not show through
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("DELETE FROM keep")
        assert c.execute("DELETE FROM keep WHERE id = 5").rowcount == 1
        assert c.execute("SELECT count(*) FROM keep").fetchone() == (4,)
    assert keep_rows(db) == 4


def test_denial_inside_a_transaction_aborts_it_like_the_server(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db)) as c:
        c.execute("UPDATE keep SET v = 'changed' WHERE id = 1")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("TRUNCATE keep")
        with pytest.raises(errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SELECT v FROM keep WHERE id = 1").fetchone() == ("v1",)


def test_multi_statement_string_runs_up_to_the_denied_statement(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        # One simple Query: the server runs it as one implicit transaction, so the error in
        # the second statement undoes the first, and the third never runs.
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(
                "UPDATE keep SET v = 'x' WHERE id = 2; DROP TABLE keep; UPDATE keep SET v = 'y' WHERE id = 3"
            )
        rows = c.execute("SELECT id, v FROM keep WHERE id IN (2, 3) ORDER BY id").fetchall()
        assert rows == [(2, "v2"), (3, "v3")]
    assert keep_rows(db) == 5


def test_extended_protocol_deny_at_parse_and_session_continues(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        # Parameters make psycopg use Parse/Bind/Execute.
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("DELETE FROM keep WHERE %s", (True,)) if False else c.execute(
                "TRUNCATE keep /* %s */", ("x",)
            )
        assert c.execute("SELECT v FROM keep WHERE id = %s", (4,)).fetchone() == ("v4",)
        with c.cursor() as cur:
            cur.execute("SELECT id FROM keep WHERE id > %s ORDER BY id", (3,), prepare=True)
            assert cur.fetchall() == [(4,), (5,)]
    assert keep_rows(db) == 5


def _pipeline_outcome(conninfo: dict[str, object], failing: str) -> tuple[object, ...]:
    """Run a pipeline whose middle statement fails; what ran, what the app saw."""
    with psycopg.connect(**conninfo, autocommit=True) as c:
        c.execute("UPDATE keep SET v = 'v' || id WHERE id > 0")
        raised = None
        try:
            with c.pipeline() as p:
                c.execute("UPDATE keep SET v = %s WHERE id = 1", ("p1",))
                p.sync()
                c.execute("UPDATE keep SET v = %s WHERE id = 2", ("p2",))
                c.execute(failing)
                c.execute("UPDATE keep SET v = %s WHERE id = 3", ("p3",))
                p.sync()
                c.execute("UPDATE keep SET v = %s WHERE id = 4", ("p4",))
        except psycopg.Error as exc:
            raised = type(exc).__mro__[1].__name__  # the error class family
        rows = c.execute("SELECT v FROM keep WHERE id <= 4 ORDER BY id").fetchall()
        alive = c.execute("SELECT 42").fetchone()
    return raised, tuple(r[0] for r in rows), alive


def test_pipeline_with_a_denied_statement_behaves_like_a_server_error(
    start_sidecar, db: str
) -> None:
    sc = start_sidecar(POLICY)
    direct = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": db}
    native = _pipeline_outcome(direct, "SELECT 1/0")
    denied = _pipeline_outcome(sc.dsn(db), "DROP TABLE keep")
    # p1 committed at its sync; p2 rolled back with the failure; p3 skipped; the error
    # surfaces at the second sync, so p4 is never sent.
    assert native[1] == ("p1", "v2", "v3", "v4") and native[2] == (42,)
    assert denied[1:] == native[1:]
    assert keep_rows(db) == 5


def test_asyncpg_prepared_statement_redecided_at_execute(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)

    async def scenario() -> None:
        conn = await asyncpg.connect(host=sc.host, port=sc.port, user="postgres", database=db)
        try:
            stmt = await conn.prepare("DELETE FROM keep WHERE id = $1")
            assert await stmt.fetch(5) == []
            # Now the policies change while the statement stays prepared in the session.
            sc.write_policy(
                POLICY.replace("verbs: [DELETE, UPDATE], where: absent", "verbs: [DELETE, UPDATE]")
            )
            await asyncio.sleep(0.5)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await stmt.fetch(4)
            assert await conn.fetchval("SELECT count(*) FROM keep") == 4
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DROP TABLE keep")
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert keep_rows(db) == 4


def test_sql_level_prepare_execute_is_decided_as_its_statement(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        c.execute("PREPARE wipe AS DELETE FROM keep")  # preparing runs nothing
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("EXECUTE wipe")
        c.execute("PREPARE one(int) AS DELETE FROM keep WHERE id = $1")
        c.execute("EXECUTE one(5)")
        c.execute("DEALLOCATE ALL")
        with pytest.raises(errors.InsufficientPrivilege):  # unknown to us: opaque, denied
            c.execute("EXECUTE wipe")
    assert keep_rows(db) == 4


EVASIONS = [
    "/* comment */ DROP TABLE keep",
    "DROP/**/TABLE keep",
    "-- line\nDROP TABLE keep",
    "SELECT 1; DROP TABLE keep",
    "SELECT 1 -- ;\n; TRUNCATE keep",
    "WITH d AS (DELETE FROM keep RETURNING *) SELECT count(*) FROM d",
    "EXPLAIN ANALYZE DELETE FROM keep",
    "COPY (DELETE FROM keep RETURNING *) TO STDOUT",
    "DO $$ BEGIN DELETE FROM keep; END $$",
    "DO $x$ BEGIN EXECUTE 'DROP TABLE keep'; END $x$",
    "DO $$ BEGIN EXECUTE 'TRUNC' || 'ATE keep'; END $$",
    "ALTER TABLE keep DROP COLUMN v",
    "MERGE INTO keep k USING (SELECT 1 AS id) s ON k.id = s.id WHEN MATCHED THEN DELETE",
    "SELECT 'unterminated",
]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_evasion_matrix(start_sidecar, db: str, protocol: str) -> None:
    sc = start_sidecar(POLICY.replace("verbs: [DROP, TRUNCATE]", "verbs: [DROP, TRUNCATE, MERGE]"))
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        for sql in EVASIONS:
            with pytest.raises(errors.InsufficientPrivilege):
                if protocol == "simple":
                    c.execute(sql.encode())  # bytes: psycopg sends it as a simple Query
                else:
                    c.execute(sql, prepare=True)
            assert c.execute("SELECT 1").fetchone() == (1,), sql
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=db) as direct:
        assert direct.execute("SELECT count(*) FROM keep").fetchone() == (5,)
        columns = direct.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'keep'"
        ).fetchone()
        assert columns == (2,)


def test_psql_sees_the_server_style_error(start_sidecar, db: str) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    sc = start_sidecar(POLICY)
    script = "SELECT 'before';\nDROP TABLE keep;\nSELECT 'after';\n"
    proc = subprocess.run(
        [psql, "-h", sc.host, "-p", str(sc.port), "-U", "postgres", "-d", db, "-X", "-At"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout.split() == ["before", "after"]
    assert (
        "ERROR:  sluice: DROP denied by policy guard, rule guard/no-drop: ask the DBA"
        in proc.stderr
    )
    assert "CONTEXT" not in proc.stderr


def test_limits_reject_with_53400(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        outcomes = []
        for i in range(6):
            try:
                c.execute("INSERT INTO limited VALUES (%s)", (i,))
                outcomes.append("ok")
            except errors.ConfigurationLimitExceeded as exc:
                assert "rate limit guard/few-inserts exceeded" in str(exc) and "slow down" in str(
                    exc
                )
                outcomes.append("limited")
        assert outcomes[:3] == ["ok"] * 3 and "limited" in outcomes[3:]
        c.execute("INSERT INTO keep VALUES (100, 'x')")  # other tables are not limited
        time.sleep(1.1)
        c.execute("INSERT INTO limited VALUES (99)")  # the bucket refilled


def test_limits_delay_instead_of_reject(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        start = time.monotonic()
        for i in range(4):
            c.execute("INSERT INTO paced VALUES (%s)", (i,))
        elapsed = time.monotonic() - start
        assert c.execute("SELECT count(*) FROM paced").fetchone() == (4,)
    assert 0.25 <= elapsed < 1.5  # burst 1, then 10/s: three waits of ~0.1 s
    delayed = [
        e
        for e in sc.events(lambda ev: sum(e.decision == "delay" for e in ev) >= 3)
        if e.decision == "delay"
    ]
    assert len(delayed) >= 3


def test_audit_events_carry_decision_rows_and_masked_statement(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        c.execute("UPDATE keep SET v = 'secret-4111' WHERE id <= 2")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("DROP TABLE keep")
    events = sc.events(lambda ev: any(e.decision == "deny" for e in ev))
    update = next(e for e in events if e.verbs == ("UPDATE",))
    assert update.rows == 2 and update.decision == "allow" and update.tables == ("keep",)
    assert (
        "secret" not in update.statement
        and update.statement == "UPDATE keep SET v = ? WHERE id <= ?"
    )
    deny = next(e for e in events if e.decision == "deny")
    assert deny.rule == "guard/no-drop" and deny.error == "42501" and deny.verbs == ("DROP",)
    assert deny.app == "billing" and deny.service == "orders-db" and deny.policy_version == 1
    assert len({e.id for e in events}) == len(events)


def test_copy_both_directions(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        c.execute("CREATE TEMP TABLE t (a int, b text)")
        with c.cursor().copy("COPY t FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((i, f"row {i}"))
        assert c.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        out = bytearray()
        with c.cursor().copy("COPY t TO STDOUT") as copy:
            for chunk in copy:
                out += chunk
        assert out.count(b"\n") == 1000


def test_notices_and_notifications(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with (
        psycopg.connect(**sc.dsn(db), autocommit=True) as c,
        psycopg.connect(**sc.dsn(db), autocommit=True) as other,
    ):
        notices: list[str] = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        assert notices == ["hello from the server"]
        c.execute("LISTEN ch")
        other.execute("NOTIFY ch, 'payload'")
        got = next(c.notifies(timeout=5, stop_after=1))
        assert got.channel == "ch" and got.payload == "payload"


def test_cancel_request_reaches_the_right_backend(sidecar_process, db: str) -> None:
    # libpq's cancel blocks holding the GIL, so this sidecar runs as its own process (the CLI).
    sc = sidecar_process(POLICY)
    with (
        psycopg.connect(**sc.dsn(db), autocommit=True) as c,
        psycopg.connect(**sc.dsn(db), autocommit=True) as other,
    ):
        other.execute("SELECT 1")
        timer = threading.Timer(0.5, c.cancel)
        timer.start()
        start = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            c.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - start < 5
        assert c.execute("SELECT 1").fetchone() == (1,)
        assert other.execute("SELECT 2").fetchone() == (2,)
    output = sc.stop()
    assert "listening on 127.0.0.1" in output and "stopping" in output
    events = [json.loads(line) for line in sc.audit_log.read_text().splitlines()]
    assert any(e["error"] == "57014" and e["verbs"] == ["SELECT"] for e in events)  # query_canceled


def test_upstream_down_gives_08006_naming_it(start_sidecar, db: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", dead_port))
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(**sc.dsn(db), connect_timeout=10)
    assert time.monotonic() - start < 5
    assert f"cannot connect to upstream orders-db at 127.0.0.1:{dead_port}" in str(info.value)


def test_malformed_message_closes_only_that_connection(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as healthy:
        with socket.create_connection((sc.host, sc.port), timeout=5) as raw:
            params = b"user\0postgres\0database\0" + db.encode() + b"\0\0"
            raw.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
            greeting = b""
            while b"Z\x00\x00\x00\x05" not in greeting:
                chunk = raw.recv(65536)
                assert chunk
                greeting += chunk
            raw.sendall(b"Q" + struct.pack("!i", -5))  # a negative length
            reply = b""
            while chunk := raw.recv(65536):
                reply += chunk
            assert reply.startswith(b"E") and b"08P01" in reply and b"invalid length" in reply
        assert healthy.execute("SELECT 1").fetchone() == (1,)


def test_oversized_startup_packet_is_refused(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with socket.create_connection((sc.host, sc.port), timeout=5) as raw:
        raw.sendall(struct.pack("!ii", 1_000_000, 196608))
        reply = raw.recv(65536)
        assert b"08P01" in reply and b"invalid startup packet length" in reply


def test_policy_edit_applies_to_open_sessions(start_sidecar, db: str) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        c.execute("SELECT count(*) FROM keep")
        sc.write_policy(
            POLICY.replace("verbs: [DROP, TRUNCATE]", "verbs: [DROP, TRUNCATE, SELECT]")
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                c.execute("SELECT count(*) FROM keep")
            except errors.InsufficientPrivilege:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the edited policy never took effect")
        sc.write_policy("this: is: not: valid yaml: [")  # a bad edit keeps the last good set
        time.sleep(0.3)
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("SELECT count(*) FROM keep")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_the_sidecar(start_sidecar, db: str, mode: str) -> None:
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        pytest.skip("pgbench is not installed")
    sc = start_sidecar(POLICY)
    subprocess.run(
        [pgbench, "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", "postgres", db],
        check=True,
        capture_output=True,
        timeout=120,
    )
    proc = subprocess.run(
        [
            pgbench,
            "-h",
            sc.host,
            "-p",
            str(sc.port),
            "-U",
            "postgres",
            "-M",
            mode,
            "-c",
            "4",
            "-t",
            "50",
            "-n",
            db,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "number of transactions actually processed: 200/200" in proc.stdout
    assert "number of failed transactions: 0" in proc.stdout


def _raw_session(host: str, port: int, db: str) -> socket.socket:
    """A logged-in connection spoken to byte by byte, for what no client library sends."""
    raw = socket.create_connection((host, port), timeout=5)
    params = b"user\0postgres\0database\0" + db.encode() + b"\0\0"
    raw.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    _read_until_ready(raw, 1)
    return raw


def _read_until_ready(raw: socket.socket, count: int) -> bytes:
    data = b""
    while data.count(b"Z\x00\x00\x00\x05") < count:
        chunk = raw.recv(65536)
        assert chunk, data
        data += chunk
    return data


def _query(text: str) -> bytes:
    body = text.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def test_pipelined_setting_change_cannot_hide_a_statement(start_sidecar, db: str) -> None:
    # With standard_conforming_strings off, 'a\' , ' is one literal and DROP TABLE runs; the
    # sidecar decides the second query before the server has answered the first, so it must
    # not trust its reading of backslashes.
    sc = start_sidecar(POLICY)
    with _raw_session(sc.host, sc.port, db) as raw:
        raw.sendall(
            _query("SET standard_conforming_strings = off")
            + _query("SELECT 'a\\' , '; DROP TABLE keep; --'")
        )
        replies = _read_until_ready(raw, 2)
        assert b"42501" in replies
    assert keep_rows(db) == 5


DRY_LIMIT = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: trial}
    spec:
      destination: orders-db
      rules:
        - name: few-inserts
          sql: {verbs: [INSERT], tables: [limited]}
          action: limit
          limit: {rate: 2, per: 1s, burst: 2, scope: source-app}
          enforce: false
    """
)


def test_dry_run_limit_lets_everything_through_and_audits_the_excess(
    start_sidecar, db: str
) -> None:
    sc = start_sidecar(DRY_LIMIT)
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:
        for i in range(6):
            c.execute("INSERT INTO limited VALUES (%s)", (i,))
        assert c.execute("SELECT count(*) FROM limited").fetchone() == (6,)
    inserts = [
        e
        for e in sc.events(lambda ev: sum("INSERT" in e.verbs for e in ev) >= 6)
        if "INSERT" in e.verbs
    ]
    assert len(inserts) == 6
    assert {(e.decision, e.action, e.enforced) for e in inserts} == {("allow", "limit", False)}
    # Burst 2, then 2/s: the first two fit, most of the rest would have been rejected.
    assert [e.would for e in inserts[:2]] == [None, None]
    assert sum(e.would == "reject" for e in inserts[2:]) >= 3
    assert all(e.rule == "trial/few-inserts" for e in inserts)
    (select,) = [e for e in sc.events() if "SELECT" in e.verbs]
    assert select.would is None


NO_KEEP_READS = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: orders-db
      rules:
        - {name: no-keep-reads, sql: {verbs: [SELECT], tables: [keep]}, action: deny}
    """
)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def test_pipelined_setting_change_cannot_reuse_a_parse_decision(start_sidecar, db: str) -> None:
    # Read with standard_conforming_strings on, this text is two literals; off, the middle
    # is code that reads keep. Parsed once while settled (allowed), then again right behind
    # the SET: the remembered decision must not be reused before the server has answered.
    text = b"SELECT 'a\\' , ' , (SELECT v FROM keep WHERE id = 1) , ' --'"
    parse = _message(b"P", b"\0" + text + b"\0\0\0")
    run = _message(b"B", b"\0\0\0\0\0\0\0\0") + _message(b"E", b"\0\0\0\0\0")
    sync = _message(b"S", b"")
    sc = start_sidecar(NO_KEEP_READS)
    with _raw_session(sc.host, sc.port, db) as raw:
        raw.sendall(parse + run + sync)
        assert b"v1" not in _read_until_ready(raw, 1)
        raw.sendall(_query("SET standard_conforming_strings = off") + parse + run + sync)
        replies = _read_until_ready(raw, 2)
        assert b"42501" in replies and b"v1" not in replies

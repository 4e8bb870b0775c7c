"""sysbench (Debian's, its own MySQL driver: libmariadb) through the MySQL sidecar, against
the real MariaDB on 127.0.0.1:3306: server-side prepared statements and plain text, every
statement decided and audited, and a denial sysbench is told to ignore answered in a way
that keeps its connection usable (it restarts the transaction on the same connection)."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pymysql
import pytest

from tests.sidecar.conftest import GUARD_POLICY, RunningSidecar

pytestmark = pytest.mark.mariadb

HOST, PORT, USER = "127.0.0.1", 3306, "root"
TABLES, ROWS, THREADS, EVENTS = 2, 1000, 4, 120
# oltp_read_write's statements per transaction besides BEGIN/COMMIT (sysbench's defaults).
POINT_SELECTS, RANGE_SELECTS = 10, 4
DEADLOCKS = {"40001", "HY000"}  # 1213 deadlock; 1205 lock wait timeout
NO_DELETES_ON_SBTEST2 = GUARD_POLICY + (
    "    - name: keep-sbtest2\n"
    "      sql: {verbs: [DELETE], tables: [sbtest2]}\n"
    "      action: deny\n"
    "      message: sbtest2 is append-only\n"
)


def _sysbench() -> str:
    binary = shutil.which("sysbench")
    if binary is None:
        pytest.skip("sysbench is not installed (make install adds Debian's)")
    return binary


@pytest.fixture(scope="module")
def sbtest() -> Iterator[str]:
    """A scratch database with sysbench's tables, prepared directly on the server."""
    binary = _sysbench()
    try:
        pymysql.connect(host=HOST, port=PORT, user=USER, connect_timeout=3).close()
    except pymysql.MySQLError as exc:
        pytest.skip(f"MariaDB is not reachable on {HOST}:{PORT} ({exc})")
    name = f"sluice_sb_{secrets.token_hex(4)}"
    with pymysql.connect(host=HOST, port=PORT, user=USER) as c, c.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        subprocess.run(
            [*_argv(binary, "oltp_read_write", PORT, name), "prepare"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield name
    finally:
        with pymysql.connect(host=HOST, port=PORT, user=USER) as c, c.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def _argv(binary: str, script: str, port: int, db: str) -> list[str]:
    return [
        binary,
        script,
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        f"--mysql-port={port}",
        f"--mysql-user={USER}",
        f"--mysql-db={db}",
        f"--tables={TABLES}",
        f"--table-size={ROWS}",
    ]


@pytest.fixture
def start_mysql(start_sidecar: Callable[..., RunningSidecar]) -> Callable[[str], RunningSidecar]:
    """`start_sidecar` (conftest) with a MySQL route, in front of the MariaDB here."""
    return lambda policy: start_sidecar(policy, protocol="mysql", upstream=(HOST, PORT))


def _run(sc: RunningSidecar, db: str, script: str, *extra: str) -> dict[str, int]:
    """One bounded sysbench run through the sidecar: its transaction and error counts."""
    argv = [*_argv(_sysbench(), script, sc.port, db), f"--threads={THREADS}"]
    argv += [f"--events={EVENTS}", "--time=60", *extra, "run"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    counts = {}
    for key in ("transactions", "ignored errors", "reconnects"):
        found = re.search(rf"{key}:\s+(\d+)", done.stdout)
        assert found is not None, done.stdout
        counts[key] = int(found.group(1))
    return counts


def _rows(db: str, table: str) -> object:
    """The table's row count, read around the sidecar."""
    with pymysql.connect(host=HOST, port=PORT, user=USER, database=db) as c, c.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()


def _verbs(sc: RunningSidecar, verb: str, want: int) -> list[object]:
    """The audit events of one verb on sysbench's tables, once `want` of them are in."""

    def of(events: list) -> list:
        return [e for e in events if e.verbs == (verb,) and e.tables and "sbtest" in e.tables[0]]

    return of(sc.events(lambda es: len(of(es)) >= want, timeout=10))


@pytest.mark.parametrize("ps_mode", ["auto", "disable"])
def test_sysbench_read_write_through_the_sidecar(start_mysql, sbtest: str, ps_mode: str) -> None:
    sc = start_mysql(GUARD_POLICY)
    counts = _run(sc, sbtest, "oltp_read_write", f"--db-ps-mode={ps_mode}")
    assert counts["transactions"] == EVENTS and counts["reconnects"] == 0
    # sysbench ignores (and retries) deadlocks, which four threads on two tables meet now
    # and then: the server's, each in the audit trail with its SQLSTATE, and nothing else.
    retried = counts["ignored errors"]
    failed = [e for e in sc.events() if e.error is not None]
    assert len(failed) == retried and all(e.error in DEADLOCKS for e in failed), failed
    # Every statement of every transaction was decided and audited with the server's answer:
    # prepared statements at each execution, not once at prepare.
    deletes = _verbs(sc, "DELETE", EVENTS)
    selects = _verbs(sc, "SELECT", EVENTS * (POINT_SELECTS + RANGE_SELECTS))
    assert EVENTS <= len(deletes) <= EVENTS + retried
    assert (
        EVENTS * (POINT_SELECTS + RANGE_SELECTS)
        <= len(selects)
        <= (EVENTS + retried) * (POINT_SELECTS + RANGE_SELECTS)
    )
    assert all(e.decision == "allow" for e in deletes + selects)
    assert all(e.rows == 1 for e in selects if "WHERE id=?" in e.statement)


def test_sysbench_ignoring_a_denial_keeps_its_connections(start_mysql, sbtest: str) -> None:
    sc = start_mysql(NO_DELETES_ON_SBTEST2)
    before = _rows(sbtest, "sbtest2")
    # Text statements: each DELETE is decided as it comes. sysbench rolls back and restarts a
    # transaction on an error it is told to ignore, on the same connection.
    ignore = "--mysql-ignore-errors=1142,1213,1205"  # the denial, and deadlocks as before
    counts = _run(sc, sbtest, "oltp_write_only", "--db-ps-mode=disable", ignore)
    assert counts["transactions"] == EVENTS and counts["reconnects"] == 0
    denied = [e for e in _verbs(sc, "DELETE", 1) if e.decision == "deny"]
    deadlocks = [e for e in sc.events() if e.error in DEADLOCKS]
    assert counts["ignored errors"] == len(denied) + len(deadlocks) and denied
    assert {(e.rule, e.tables, e.error) for e in denied} == {
        ("guard/keep-sbtest2", ("sbtest2",), "42000")
    }
    # Its DELETE/INSERT pairs never ran on sbtest2 (each INSERT follows its DELETE).
    assert _rows(sbtest, "sbtest2") == before

"""`PgSession` replays byte streams captured from real clients, whole and one byte at a time.

Capture, two ways:
- through the real sidecar (in this process), with `PgSession.client_pass`/`server_pass`
  (what the driver calls) wrapped to record every call's input and its output: what it
  appended to `to_server`/`to_client`, or the input it passed on as it came;
  the policy denies some statements, so the injection (simple and extended protocol) and
  swallowing paths run;
- through a recording TCP relay straight to the server, with only allowed statements: a
  session must then be byte-transparent in both directions.
Replay: a fresh `PgSession` on a `RouteContext` built like server.py builds it (same
policies, a fixed clock), fed the recorded inputs in their original interleaving, (a) as
recorded, (b) one byte at a time, (c) in seeded random pieces. The outputs and the audit
events must be identical to each other and to what the live session produced.
Plus hand-built malformed inputs: a FATAL 08P01 and `closing`, never an exception.
"""

from __future__ import annotations

import asyncio
import os
import random
import selectors
import shutil
import socket
import struct
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.sql.inspect import POSTGRES
from sidecar import connection
from sidecar.audit import AuditEvent, MemorySink
from sidecar.limits import Limiter
from sidecar.pg_session import PgSession, RouteContext
from sidecar.policy_watch import PolicyWatcher
from sidecar.protocols import postgres as pg
from tests.sidecar.conftest import PG_HOST, PG_PORT, PG_USER
from tests.sidecar.splits import pieces

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: orders-db
      rules:
        - name: no-drop
          sql: {verbs: [DROP, TRUNCATE]}
          action: deny
          message: ask the DBA
        - name: bounded
          sql: {verbs: [DELETE, UPDATE], where: absent}
          action: deny
    """
)
NOW = 1_700_000_000.0  # the fixed clock of live and replayed sessions
TIMEOUT = 10.0
_PARAMS = b"user\0postgres\0database\0postgres\0\0"
STARTUP = struct.pack("!ii", 8 + len(_PARAMS), 196608) + _PARAMS
# Scenarios whose denials go through the extended protocol (ParseComplete swallowed).
EXTENDED_DENIALS = {"psycopg_extended", "psycopg_pipeline", "asyncpg_prepared"}

# Every case runs against the pure Python session and its Cython build (conftest.pg_build).
pytestmark = pytest.mark.usefixtures("pg_build")


@pytest.fixture
def db(scratch_db: str) -> str:
    with psycopg.connect(host=PG_HOST, user=PG_USER, dbname=scratch_db, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS keep")
        c.execute("CREATE TABLE keep (id int primary key, v text)")
        c.execute("INSERT INTO keep SELECT g, 'v' || g FROM generate_series(1, 5) g")
    return scratch_db


# -- the client scenarios ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    db: str
    denials: bool  # run the statements the policy denies (only through the sidecar)
    plaintext: bool  # no SSLRequest: the relay goes straight to the server

    def psycopg(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=PG_USER,
            dbname=self.db,
            autocommit=True,
            connect_timeout=int(TIMEOUT),
            sslmode="disable" if self.plaintext else "prefer",
        )


def psycopg_simple(t: Target) -> None:
    with t.psycopg() as c:
        assert c.execute(b"SELECT count(*) FROM keep").fetchone() == (5,)  # bytes: simple Query
        c.execute(b"UPDATE keep SET v = 'x' WHERE id = 1; SELECT 1; SELECT 2")
        if t.denials:
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(b"DROP TABLE keep")
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(b"UPDATE keep SET v = 'y' WHERE id = 2; TRUNCATE keep; SELECT 3")
            c.execute(b"BEGIN")
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(b"DELETE FROM keep")
            with pytest.raises(errors.InFailedSqlTransaction):
                c.execute(b"SELECT 1")
            c.execute(b"ROLLBACK")
        with pytest.raises(errors.DivisionByZero):
            c.execute(b"SELECT 1/0")
        assert c.execute(b"SELECT v FROM keep WHERE id = 2").fetchone() == ("v2",)


def psycopg_extended(t: Target) -> None:
    with t.psycopg() as c:
        assert c.execute("SELECT v FROM keep WHERE id = %s", (4,)).fetchone() == ("v4",)
        if t.denials:
            with pytest.raises(errors.InsufficientPrivilege):  # denied at Parse
                c.execute("TRUNCATE keep /* %s */", ("x",))
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute("DELETE FROM keep", prepare=True)
        with c.cursor() as cur:
            for low in (1, 3, 4):
                cur.execute("SELECT id FROM keep WHERE id > %s ORDER BY id", (low,), prepare=True)
                assert cur.fetchall() == [(i,) for i in range(low + 1, 6)]
        assert c.execute("UPDATE keep SET v = %s WHERE id = %s", ("e", 5)).rowcount == 1
        with pytest.raises(errors.UndefinedTable):
            c.execute("SELECT * FROM missing WHERE id = %s", (1,))
        assert c.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)


def psycopg_pipeline(t: Target) -> None:
    failing = "DROP TABLE keep" if t.denials else "SELECT 1/0"
    with t.psycopg() as c:
        with pytest.raises(psycopg.Error), c.pipeline() as p:
            c.execute("UPDATE keep SET v = %s WHERE id = 1", ("p1",))
            p.sync()
            c.execute("UPDATE keep SET v = %s WHERE id = 2", ("p2",))
            c.execute(failing)
            c.execute("UPDATE keep SET v = %s WHERE id = 3", ("p3",))
            p.sync()
            c.execute("UPDATE keep SET v = %s WHERE id = 4", ("p4",))
        rows = c.execute("SELECT v FROM keep WHERE id <= 4 ORDER BY id").fetchall()
        assert [r[0] for r in rows] == ["p1", "v2", "v3", "v4"]


def psycopg_copy(t: Target) -> None:
    with t.psycopg() as c:
        c.execute("CREATE TEMP TABLE t (a int, b text)")
        with c.cursor().copy("COPY t FROM STDIN") as copy:
            for i in range(300):
                copy.write_row((i, f"row {i}"))
        out = bytearray()
        with c.cursor().copy("COPY t TO STDOUT") as copy:
            for chunk in copy:
                out += chunk
        assert out.count(b"\n") == 300
        if t.denials:
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(b"COPY (DELETE FROM keep RETURNING *) TO STDOUT")
        assert c.execute("SELECT count(*) FROM t").fetchone() == (300,)


def asyncpg_prepared(t: Target) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(
            host=t.host,
            port=t.port,
            user=PG_USER,
            database=t.db,
            timeout=TIMEOUT,
            ssl=False if t.plaintext else "prefer",
        )
        try:
            stmt = await conn.prepare("SELECT id, v FROM keep WHERE id >= $1 ORDER BY id")
            assert len(await stmt.fetch(2)) == 4
            assert len(await stmt.fetch(4)) == 2
            await conn.execute("CREATE TEMP TABLE n (x int)")
            await conn.executemany("INSERT INTO n VALUES ($1)", [(i,) for i in range(20)])
            assert await conn.fetchval("SELECT sum(x) FROM n WHERE x < $1", 10) == 45
            if t.denials:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.prepare("TRUNCATE keep")  # Parse, Describe, Sync
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("DROP TABLE keep")  # simple Query
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("UPDATE keep SET v = $1", "z")  # no WHERE: at Parse
            async with conn.transaction():
                await conn.execute("UPDATE keep SET v = $1 WHERE id = $2", "a", 3)
            assert await conn.fetchval("SELECT v FROM keep WHERE id = 3") == "a"
        finally:
            await conn.close(timeout=TIMEOUT)

    asyncio.run(go())


def psql_script(t: Target) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    lines = ["SELECT 'before';", "SELECT id FROM keep WHERE id < 3 ORDER BY id;"]
    if t.denials:
        lines += ["DROP TABLE keep;", "BEGIN;", "TRUNCATE keep;", "ROLLBACK;"]
    lines += [r"\copy (SELECT id FROM keep ORDER BY id) TO STDOUT", "SELECT 'after';"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGSSLMODE"] = "disable" if t.plaintext else "prefer"
    env["PGCONNECT_TIMEOUT"] = str(int(TIMEOUT))
    proc = subprocess.run(
        [psql, "-h", t.host, "-p", str(t.port), "-U", PG_USER, "-d", t.db, "-X", "-q", "-At"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert proc.stdout.split() == ["before", "1", "2", "1", "2", "3", "4", "5", "after"]
    assert ("denied by policy guard" in proc.stderr) == t.denials


SCENARIOS: dict[str, Callable[[Target], None]] = {
    f.__name__: f
    for f in (
        psycopg_simple,
        psycopg_extended,
        psycopg_pipeline,
        psycopg_copy,
        asyncpg_prepared,
        psql_script,
    )
}


# -- capture through the sidecar ------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call the driver made: its input and its output in each direction."""

    side: str  # "c": client_pass, "s": server_pass
    data: bytes
    to_server: bytes
    to_client: bytes
    closing: str | None


@dataclass
class Recorder:
    sessions: dict[str, list[Call]] = field(default_factory=dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        live = connection.PG_SESSION  # the build the driver runs (compiled when built)
        for side, name in (("c", "client_pass"), ("s", "server_pass")):
            monkeypatch.setattr(live, name, self._wrap(side, getattr(live, name)))

    def _wrap(
        self, side: str, original: Callable[[PgSession, bytes], bytes | None]
    ) -> Callable[[PgSession, bytes], bytes | None]:
        def recorded(session: PgSession, data: bytes) -> bytes | None:
            s0, c0 = len(session.to_server), len(session.to_client)
            passed = original(session, data)  # what the driver writes as it came
            to_server, to_client = bytes(session.to_server[s0:]), bytes(session.to_client[c0:])
            if passed is not None:
                assert not (to_server if side == "c" else to_client), "passed with output before"
                to_server, to_client = (passed, to_client) if side == "c" else (to_server, passed)
            call = Call(side, bytes(data), to_server, to_client, session.closing)
            self.sessions.setdefault(session.session_id, []).append(call)
            return passed

        return recorded


@dataclass
class Replayed:
    to_server: bytes
    to_client: bytes
    closing: str | None
    events: list[tuple[object, ...]]


def event_key(e: AuditEvent) -> tuple[object, ...]:
    """What must not depend on chunking (ids, times and durations may)."""
    return (
        e.session,
        e.decision,
        e.action,
        e.rules,
        e.rule,
        e.verbs,
        e.tables,
        e.statement,
        e.rows,
        e.error,
        e.policy_version,
    )


def context_like(sc: Any) -> RouteContext:
    """A RouteContext built the way server.py builds it, from the same config and policy
    files, with the fixed clock and a sink of its own."""
    config = sc.sidecar.config
    (route,) = config.routes
    engine = PolicyWatcher(config.policies).engine
    peer = Peer(config.app, route.service, config.instance)
    return RouteContext(
        app=config.app,
        instance=config.instance,
        service=route.service,
        decider=SqlDecider(engine, peer, POSTGRES),
        limiter=Limiter(),
        sink=MemorySink(),
        record_all=config.audit.record == "all",
        full_statements=config.audit.full_statements,
        policy_version=lambda: 1,
        clock=lambda: NOW,
    )


def replay(
    ctx: RouteContext, session_id: str, inputs: list[tuple[str, bytes]], how: str
) -> Replayed:
    session = PgSession(ctx, session_id)
    to_server, to_client = bytearray(), bytearray()
    rng = random.Random(f"{session_id}-{how}")
    for side, data in inputs:
        feed = session.client_data if side == "c" else session.server_data
        for piece in pieces(data, how, rng, 64):
            feed(piece)  # any exception fails the test: a session never raises
            to_server += session.to_server
            to_client += session.to_client
            session.to_server.clear()
            session.to_client.clear()
    assert isinstance(ctx.sink, MemorySink)
    events = [event_key(e) for e in ctx.sink.events]
    return Replayed(bytes(to_server), bytes(to_client), session.closing, events)


def typed_kinds(stream: bytes) -> list[bytes]:
    """The type bytes of a typed-message stream (leading 'N' answers to SSLRequest skipped)."""
    pos, kinds = 0, []
    while pos < len(stream) and stream[pos : pos + 1] == b"N":
        pos += 1
    while pos + 5 <= len(stream):
        kinds.append(stream[pos : pos + 1])
        pos += 1 + struct.unpack_from("!i", stream, pos + 1)[0]
    assert pos == len(stream)
    return kinds


def wait_for_no_sessions(sc: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while sc.sidecar.routes[0].sessions and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.postgres
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sidecar_sessions_replay_identically(
    start_sidecar, monkeypatch: pytest.MonkeyPatch, db: str, scenario: str
) -> None:
    recorder = Recorder()
    with monkeypatch.context() as m:
        recorder.install(m)
        sc = start_sidecar(POLICY)
        sc.sidecar.routes[0].ctx.clock = lambda: NOW
        SCENARIOS[scenario](Target(sc.host, sc.port, db, denials=True, plaintext=False))
        wait_for_no_sessions(sc)
        sc.stop()
    assert len(recorder.sessions) == 1, list(recorder.sessions)
    ((session_id, calls),) = recorder.sessions.items()
    live = Replayed(
        b"".join(c.to_server for c in calls),
        b"".join(c.to_client for c in calls),
        calls[-1].closing,
        [event_key(e) for e in sc.sink.events if e.session == session_id],
    )
    # The paths this file is about did run: a denial raised by the server, and (extended
    # protocol) the ParseComplete/BindComplete of the raising statement swallowed.
    assert b"DO $sluice$" in live.to_server
    assert any(e[1] == "deny" and e[-2] == "42501" for e in live.events)
    server_input = b"".join(c.data for c in calls if c.side == "s")
    sent, shown = typed_kinds(server_input), typed_kinds(live.to_client)
    if scenario in EXTENDED_DENIALS:
        assert sent.count(b"1") + sent.count(b"2") > shown.count(b"1") + shown.count(b"2")

    inputs = [(c.side, c.data) for c in calls]
    for how in ("whole", "bytewise", "random"):
        again = replay(context_like(sc), session_id, inputs, how)
        assert again.to_server == live.to_server, how
        assert again.to_client == live.to_client, how
        assert again.closing == live.closing, how
        assert again.events == live.events, how


# -- capture through a recording relay --------------------------------------------------------


class RecordingRelay:
    """A TCP relay to the server that records each connection as (side, chunk) pairs."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.connections: list[list[tuple[str, bytes]]] = []
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record: list[tuple[str, bytes]] = []
            self.connections.append(record)
            pump = threading.Thread(target=self._pump, args=(client, record), daemon=True)
            self._pumps.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, record: list[tuple[str, bytes]]) -> None:
        try:
            with (
                client,
                socket.create_connection(self.upstream, timeout=TIMEOUT) as server,
                selectors.DefaultSelector() as sel,
            ):
                client.settimeout(TIMEOUT)
                sel.register(client, selectors.EVENT_READ, ("c", server))
                sel.register(server, selectors.EVENT_READ, ("s", client))
                while not self._stop.is_set():
                    for key, _ in sel.select(timeout=0.1):
                        side, peer = key.data
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        record.append((side, data))
                        peer.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        for pump in self._pumps:  # let connections end on their own first
            pump.join(TIMEOUT)
        self._stop.set()
        self._acceptor.join(TIMEOUT)
        self.listener.close()


@pytest.fixture
def relay() -> Iterator[RecordingRelay]:
    r = RecordingRelay((PG_HOST, PG_PORT))
    yield r
    r.close()


@pytest.mark.postgres
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_relayed_sessions_pass_through_byte_for_byte(
    offline_ctx: Callable[..., RouteContext], relay: RecordingRelay, db: str, scenario: str
) -> None:
    SCENARIOS[scenario](Target("127.0.0.1", relay.port, db, denials=False, plaintext=True))
    relay.close()
    assert len(relay.connections) == 1
    (inputs,) = relay.connections
    client_bytes = b"".join(d for side, d in inputs if side == "c")
    server_bytes = b"".join(d for side, d in inputs if side == "s")
    for how in ("whole", "bytewise", "random"):
        again = replay(offline_ctx(), "relay-1", inputs, how)
        assert again.to_server == client_bytes, how
        assert again.to_client == server_bytes, how
        assert again.closing == "client terminated", how
        assert all(e[1] == "allow" for e in again.events)


# -- hand-built inputs ------------------------------------------------------------------------


@pytest.fixture
def offline_ctx(tmp_path: Path) -> Callable[..., RouteContext]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    def make(max_message: int = pg.DEFAULT_MAX_MESSAGE) -> RouteContext:
        engine = PolicyWatcher([str(policy)]).engine
        peer = Peer("billing", "orders-db", "billing-1")
        return RouteContext(
            app="billing",
            instance="billing-1",
            service="orders-db",
            decider=SqlDecider(engine, peer, POSTGRES),
            limiter=Limiter(),
            sink=MemorySink(),
            max_message=max_message,
            clock=lambda: NOW,
        )

    return make


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", 4 + len(body)) + body


READY = msg(b"R", b"\0\0\0\0") + msg(b"Z", b"I")
MALFORMED = {
    "garbage before startup": ("c", b"GET / HTTP/1.1\r\nHost: db\r\n\r\n", "startup packet length"),
    "startup too short": ("c", struct.pack("!ii", 4, 196608), "invalid startup packet length 4"),
    "unsupported protocol": (
        "c",
        struct.pack("!ii", 8, 2 << 16),
        "unsupported frontend protocol 2.0",
    ),
    "negative length": ("c", STARTUP + b"Q" + struct.pack("!i", -5), "invalid length -5"),
    "length beyond max_message": (
        "c",
        STARTUP + msg(b"Q", b"x" * 2000 + b"\0"),
        "invalid length 2005",
    ),
    "unterminated string in Parse": ("c", STARTUP + msg(b"P", b"\0SELECT 1"), "not NUL-terminated"),
    "unterminated name in Bind": ("c", STARTUP + msg(b"B", b"portal"), "not NUL-terminated"),
    "Close too short": ("c", STARTUP + msg(b"C", b""), "Close message too short"),
    "good messages, then a bad one": (
        "c",
        STARTUP + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"S", b"") + b"Q" + struct.pack("!i", 2),
        "invalid length 2",
    ),
    "server: negative length": ("s", READY + b"D" + struct.pack("!i", -1), "invalid length -1"),
    "server: length beyond max_message": (
        "s",
        READY + msg(b"D", b"x" * 2000),
        "invalid length 2004",
    ),
}


def last_error(stream: bytes) -> dict[str, str]:
    """The fields of the last message of `stream`, which must be an ErrorResponse."""
    pos = 0
    while stream[pos : pos + 1] == b"N":
        pos += 1
    last = pos
    while pos + 5 <= len(stream):
        last = pos
        pos += 1 + struct.unpack_from("!i", stream, pos + 1)[0]
    assert pos == len(stream) and stream[last : last + 1] == b"E"
    body = stream[last + 5 : -1]
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_malformed_input_is_a_fatal_08P01_never_an_exception(
    offline_ctx: Callable[..., RouteContext], case: str, how: str
) -> None:
    side, data, reason = MALFORMED[case]
    inputs = [("c", STARTUP), (side, data)] if side == "s" else [(side, data)]
    # Trailing bytes after the bad message must change nothing.
    inputs.append((side, b"Q\0\0\0\x0dSELECT 1\0"))
    got = replay(offline_ctx(max_message=1024), "bad-1", inputs, how)
    fields = last_error(got.to_client)
    assert fields["S"] == "FATAL" and fields["C"] == "08P01", fields
    assert fields["M"].startswith("sluice: ") and reason in fields["M"]
    assert got.closing is not None and reason in got.closing
    assert got.to_client.count(b"08P01") == 1  # one error, however the bytes arrive
    whole = replay(offline_ctx(max_message=1024), "bad-1", inputs, "whole")
    assert (got.to_server, got.to_client) == (whole.to_server, whole.to_client)


def test_channel_binding_mechanisms_are_not_offered_to_the_plaintext_app(
    offline_ctx: Callable[..., RouteContext],
) -> None:
    def sasl(*names: bytes) -> bytes:
        return msg(b"R", struct.pack("!i", 10) + b"".join(n + b"\0" for n in names) + b"\0")

    offered = sasl(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256")
    for how in ("whole", "bytewise"):
        got = replay(offline_ctx(), "sasl-1", [("c", STARTUP), ("s", offered)], how)
        assert got.to_client == sasl(b"SCRAM-SHA-256") and got.to_server == STARTUP
        plain = replay(
            offline_ctx(), "sasl-2", [("c", STARTUP), ("s", sasl(b"SCRAM-SHA-256"))], how
        )
        assert plain.to_client == sasl(b"SCRAM-SHA-256")

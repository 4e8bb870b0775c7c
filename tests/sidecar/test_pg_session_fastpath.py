"""The framing loops' shortcuts (reused Parse and Execute decisions) decide as the slow path
would: byte-transparent for repeated transactions however the input is split, never past a
policy reload, a time window, an unsettled reading of backslashes, or a re-Parse."""

from __future__ import annotations

import random
import struct
import textwrap
from collections.abc import Callable

import pytest

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.sql.inspect import POSTGRES
from sidecar.audit import MemorySink
from sidecar.limits import Limiter
from sidecar.pg_session import PgSession, RouteContext
from sidecar.protocols import postgres as pg
from tests.sidecar.splits import HOWS, pieces

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: db
      timezone: UTC
      rules:
        - {name: no-drop, sql: {verbs: [DROP]}, action: deny}
        - {name: watch-deletes, sql: {verbs: [DELETE]}, action: audit}
        - {name: night, sql: {verbs: [SELECT], tables: [nightly]}, when: {time: '01:00-02:00'}, action: deny}
    """
)
NO_SELECT = POLICY + "    - {name: no-select, sql: {verbs: [SELECT], tables: [t]}, action: deny}\n"
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00 UTC

# Every case runs against the pure Python session and its Cython build (conftest.pg_build).
pytestmark = pytest.mark.usefixtures("pg_build")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def engine(text: str = POLICY) -> Engine:
    return Engine(load_texts([("p.yaml", text)]))


def context(clock: Clock | None = None, record_all: bool = False) -> RouteContext:
    return RouteContext(
        app="app",
        instance="app-1",
        service="db",
        decider=SqlDecider(engine(), Peer("app", "db"), POSTGRES),
        limiter=Limiter(),
        sink=MemorySink(),
        record_all=record_all,
        clock=clock or Clock(MIDNIGHT + 12 * 3600),
    )


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def bind(portal: bytes, statement: bytes, value: bytes) -> bytes:
    # One text parameter, text results: what pgbench and libpq send.
    params = struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0)
    return msg(b"B", portal + b"\0" + statement + b"\0" + params)


def execute(portal: bytes = b"") -> bytes:
    return msg(b"E", portal + b"\0" + b"\0\0\0\0")


DESCRIBE = msg(b"D", b"P\0")
SYNC = msg(b"S", b"")
PARSED, BOUND = msg(b"1", b""), msg(b"2", b"")
ROW = msg(b"T", b"\0\x01a\0" + bytes(18)) + msg(b"D", b"\0\x01\0\0\0\x015")


def done(tag: bytes) -> bytes:
    return msg(b"C", tag + b"\0")


READY = msg(b"Z", b"I")


def ready_session(ctx: RouteContext) -> PgSession:
    session = PgSession(ctx, "s1")
    params = b"user\0u\0database\0d\0\0"
    session.client_data(struct.pack("!ii", 8 + len(params), 196608) + params)
    session.server_data(msg(b"R", struct.pack("!i", 0)) + READY)
    session.to_server.clear()
    session.to_client.clear()
    return session


def exchange(session: PgSession, client: bytes, server: bytes = b"") -> tuple[bytes, bytes]:
    session.client_data(client)
    if server:
        session.server_data(server)
    sent, shown = bytes(session.to_server), bytes(session.to_client)
    session.to_server.clear()
    session.to_client.clear()
    return sent, shown


def pgbench_like() -> list[tuple[str, bytes]]:
    """Transactions as pgbench -S sends them with -M extended (re-Parse of the unnamed
    statement each time) and -M prepared (Parse once, then Bind by name)."""
    text = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    script: list[tuple[str, bytes]] = []
    for i in range(4):
        parse = msg(b"P", b"\0" + text + b"\0\0\0")
        script.append(("c", parse + bind(b"", b"", b"%d" % i) + DESCRIBE + execute() + SYNC))
        script.append(("s", PARSED + BOUND + ROW + done(b"SELECT 1") + READY))
    script.append(("c", msg(b"P", b"P0_1\0" + text + b"\0\0\0") + SYNC))
    script.append(("s", PARSED + READY))
    for i in range(4):
        script.append(("c", bind(b"", b"P0_1", b"%d" % i) + DESCRIBE + execute() + SYNC))
        script.append(("s", BOUND + ROW + done(b"SELECT 1") + READY))
    return script


@pytest.mark.parametrize("how", HOWS)
def test_repeated_transactions_pass_through_byte_for_byte(how: str) -> None:
    script = pgbench_like()
    ctx = context()
    session = ready_session(ctx)
    rng = random.Random(how)
    sent, shown = bytearray(), bytearray()
    for side, data in script:
        feed = session.client_data if side == "c" else session.server_data
        for piece in pieces(data, how, rng, 16):
            feed(piece)
            sent += session.to_server
            shown += session.to_client
            session.to_server.clear()
            session.to_client.clear()
    assert bytes(sent) == b"".join(d for side, d in script if side == "c")
    assert bytes(shown) == b"".join(d for side, d in script if side == "s")
    assert not session._pending
    assert isinstance(ctx.sink, MemorySink) and ctx.sink.events == []


@pytest.mark.parametrize("how", HOWS)
def test_the_driver_gets_unchanged_reads_back_as_they_came(how: str) -> None:
    # client_pass/server_pass (what the driver calls) give the same bytes as client_data/
    # server_data; a read that goes on unchanged comes back itself, to be written uncopied.
    script = pgbench_like()
    session = ready_session(context())
    rng = random.Random(how)
    sent, shown = bytearray(), bytearray()
    returned = 0
    for side, data in script:
        feed = session.client_pass if side == "c" else session.server_pass
        out = session.to_server if side == "c" else session.to_client
        for piece in pieces(data, how, rng, 16):
            passed = feed(piece)
            if passed is not None:
                assert not out, "passed with output waiting before it"
                assert how != "whole" or passed is piece
                returned += 1
            (sent if side == "c" else shown).extend(out if passed is None else passed)
            out.clear()
            assert not session.to_server and not session.to_client
    assert bytes(sent) == b"".join(d for side, d in script if side == "c")
    assert bytes(shown) == b"".join(d for side, d in script if side == "s")
    if how == "whole":
        assert returned == len(script)
    else:
        assert returned > 0  # the pieces that end on a message boundary


def test_what_is_changed_held_or_waited_for_is_not_passed() -> None:
    ctx = context()
    session = ready_session(ctx)
    run = pg.query(b"SELECT 1")
    # Denied: the statement is replaced by one that raises.
    assert session.client_pass(pg.query(b"DROP TABLE t")) is None
    assert b"RAISE EXCEPTION" in session.to_server
    session.to_server.clear()
    # Output already waiting goes first: the read is appended after it.
    session.to_server += b"waiting"
    assert session.client_pass(run) is None and session.to_server == b"waiting" + run
    session.to_server.clear()
    # An incomplete message waits for the rest, then the whole of it is passed.
    assert session.client_pass(run[:7]) is None and not session.to_server
    assert session.client_pass(run[7:]) == run
    # What the app has waiting for it (an answer of the sidecar's own) goes out with it.
    session.to_client += b"answer"
    assert session.client_pass(run) is None and session.to_server == run
    session.to_server.clear()
    assert session.server_pass(READY) is None and session.to_client == b"answer" + READY
    session.to_client.clear()
    # Terminate: the session closes once its output is written, so the driver pumps.
    assert session.client_pass(msg(b"X", b"")) is None and session.closing == "client terminated"
    assert session.to_server == msg(b"X", b"")


def test_the_opening_of_a_session_is_never_passed() -> None:
    # Until the server's first ReadyForQuery the driver has more to take from the session
    # (the backend key for CancelRequest routing), so server reads go through to_client.
    session = PgSession(context(), "s1")
    params = b"user\0u\0database\0d\0\0"
    assert session.client_pass(struct.pack("!ii", 8 + len(params), 196608) + params) is None
    opening = msg(b"R", struct.pack("!i", 0)) + msg(b"K", struct.pack("!ii", 7, 42)) + READY
    assert session.server_pass(opening) is None
    assert session.to_client == opening and session.backend_key == struct.pack("!ii", 7, 42)
    session.to_client.clear()
    assert session.server_pass(READY) == READY


@pytest.mark.parametrize("name", [b"", b"again"], ids=["same message", "same text"])
def test_a_remembered_parse_is_not_trusted_while_a_setting_may_change(name: bytes) -> None:
    # With standard_conforming_strings off the server reads this text differently; the
    # decision remembered from when it was on must not be reused before the SET is answered.
    session = ready_session(context())
    text = b"SELECT 'a\\' , ' x '"
    first = msg(b"P", b"\0" + text + b"\0\0\0")
    sent, _ = exchange(session, first + SYNC, PARSED + READY)
    assert sent == first + SYNC
    again = msg(b"P", name + b"\0" + text + b"\0\0\0")
    setting = pg.query(b"SET standard_conforming_strings = off")
    sent, _ = exchange(session, setting + again + bind(b"", name, b"1") + execute() + SYNC)
    assert sent.startswith(setting)
    assert again not in sent and b"RAISE EXCEPTION" in sent


def test_an_execute_runs_what_its_portal_was_bound_to() -> None:
    # The server keeps a portal's statement when the unnamed statement is parsed again: an
    # Execute of that portal is decided (and audited) as the statement it was bound to.
    ctx = context()
    session = ready_session(ctx)
    delete = msg(b"P", b"\0DELETE FROM t WHERE id = $1\0\0\0")
    select = msg(b"P", b"\0SELECT 1\0\0\0")
    client = delete + bind(b"p", b"", b"1") + select + bind(b"", b"", b"1")
    client += execute(b"p") + execute() + SYNC
    server = PARSED + BOUND + PARSED + BOUND + done(b"DELETE 1") + done(b"SELECT 1") + READY
    sent, shown = exchange(session, client, server)
    assert (sent, shown) == (client, server)
    assert isinstance(ctx.sink, MemorySink)
    (event,) = ctx.sink.events
    assert (event.verbs, event.rows, event.rules) == (("DELETE",), 1, ("guard/watch-deletes",))


def test_a_policy_reload_reaches_prepared_statements() -> None:
    ctx = context()
    session = ready_session(ctx)
    prepare = msg(b"P", b"s\0SELECT v FROM t WHERE id = $1\0\0\0")
    run = bind(b"", b"s", b"1") + execute() + SYNC
    answer = BOUND + ROW + done(b"SELECT 1") + READY
    assert exchange(session, prepare + SYNC, PARSED + READY)[0] == prepare + SYNC
    for _ in range(2):
        assert exchange(session, run, answer) == (run, answer)
    ctx.decider.use(engine(NO_SELECT))
    sent, _ = exchange(session, run)
    assert b"RAISE EXCEPTION" in sent and b"no-select" in sent


def test_a_time_window_reaches_prepared_statements() -> None:
    clock = Clock(MIDNIGHT + 3600 - 30)  # 00:59:30, the window opens at 01:00
    ctx = context(clock)
    session = ready_session(ctx)
    prepare = msg(b"P", b"s\0SELECT v FROM nightly WHERE id = $1\0\0\0")
    run = bind(b"", b"s", b"1") + execute() + SYNC
    answer = BOUND + ROW + done(b"SELECT 1") + READY
    assert exchange(session, prepare + SYNC, PARSED + READY)[0] == prepare + SYNC
    assert exchange(session, run, answer) == (run, answer)
    clock.now += 40
    sent, _ = exchange(session, run)
    assert b"RAISE EXCEPTION" in sent and b"night" in sent


def test_audit_all_records_every_execution() -> None:
    ctx = context(record_all=True)
    session = ready_session(ctx)
    prepare = msg(b"P", b"s\0SELECT v FROM t WHERE id = $1\0\0\0")
    run = bind(b"", b"s", b"1") + execute() + SYNC
    answer = BOUND + ROW + done(b"SELECT 1") + READY
    exchange(session, prepare + SYNC, PARSED + READY)
    for _ in range(3):
        assert exchange(session, run, answer) == (run, answer)
    assert isinstance(ctx.sink, MemorySink)
    assert [(e.decision, e.verbs, e.rows) for e in ctx.sink.events] == [
        ("allow", ("SELECT",), 1)
    ] * 3


def test_a_new_minute_costs_one_decision_then_the_shortcuts_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a time window in the policy set, decisions hold for their minute: the first
    # transaction of the next minute decides again, the following ones reuse that.
    calls: list[str] = []

    def counting(name: str) -> Callable[..., object]:
        slow = getattr(PgSession, name)

        def counted(self: PgSession, *args: object) -> object:
            calls.append(name)
            return slow(self, *args)

        return counted

    for name in ("_parse", "_execute"):
        monkeypatch.setattr(PgSession, name, counting(name))
    clock = Clock(MIDNIGHT + 12 * 3600)
    session = ready_session(context(clock))
    text = b"SELECT v FROM t WHERE id = $1"
    client = msg(b"P", b"\0" + text + b"\0\0\0") + bind(b"", b"", b"1") + execute() + SYNC
    server = PARSED + BOUND + ROW + done(b"SELECT 1") + READY
    for minute in range(2):
        clock.now += 60 * minute
        calls.clear()
        for _ in range(3):
            assert exchange(session, client, server) == (client, server)
        assert calls == ["_parse"]


def test_sessions_that_read_text_alike_share_one_state() -> None:
    # The decision caches are keyed by (state, text): sessions reading text alike must hand
    # them the same state object, or each cache hit calls the state's generated __eq__.
    ctx = context()
    states = []
    for value in (b"on", b"off", b"on", b"off"):
        session = ready_session(ctx)
        session.server_data(msg(b"S", b"standard_conforming_strings\0" + value + b"\0"))
        states.append(session.state)
    assert states[0] is states[2] is POSTGRES
    assert states[1] is states[3] and not states[1].standard_conforming_strings

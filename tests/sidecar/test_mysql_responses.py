"""The server-to-app path of `MySqlSession` (`mysql_responses`): hand-built responses of the
shapes MariaDB sends (text and binary result sets, with and without CLIENT_DEPRECATE_EOF,
several results of one string, cursors, a 0xFFFFFF row, errors), fed whole, one byte at a
time and in random pieces. The bytes must come out as they went in, with the row counts and
errors in the audit events; results nobody audits are followed by the fast path and must
leave the same state. `skip_rows` is checked against a packet-by-packet walk. No server."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.engine import Engine
from policies.loader import load_texts
from sidecar.audit import MemorySink
from sidecar.mysql_session import MySqlSession
from sidecar.protocols import mysql as my
from tests.sidecar.splits import HOWS, pieces
from tests.sidecar.test_mysql_replay import capture, context

# Every case runs against the pure Python session and the one over the compiled response
# FIFO (conftest.mysql_build).
pytestmark = pytest.mark.usefixtures("mysql_build")

COLUMN = b"\x03def\x00\x00\x00\x01c\x00\x0c\x3f\x00\x78\x00\x00\x00\xfe\x00\x00\x00\x00"
OK_STATUS = 0x0002  # SERVER_STATUS_AUTOCOMMIT
NBE = my.SERVER_STATUS_NO_BACKSLASH_ESCAPES
MORE = my.SERVER_MORE_RESULTS_EXISTS


# --- building the server's packets --------------------------------------------------------


def ok(affected: int = 0, status: int = OK_STATUS, header: int = 0x00) -> bytes:
    return bytes([header, affected, 0]) + status.to_bytes(2, "little") + b"\0\0"


def eof(status: int, deprecate_eof: bool) -> bytes:
    """What ends a result set: an EOF packet, or with CLIENT_DEPRECATE_EOF an OK (0xFE)."""
    return ok(0, status, 0xFE) if deprecate_eof else b"\xfe\0\0" + status.to_bytes(2, "little")


def binary_row(text: bytes) -> bytes:
    return b"\x00\x00" + my_lenenc(len(text)) + text


def my_lenenc(n: int) -> bytes:
    return bytes([n]) if n < 0xFB else b"\xfc" + n.to_bytes(2, "little")


def result_set(
    rows: list[bytes],
    deprecate_eof: bool,
    status: int = OK_STATUS,
    columns: int = 1,
    seq: int = 1,
) -> tuple[bytes, int]:
    """A result set's packets from sequence id `seq`, and the sequence id after them."""
    payloads = [bytes([columns])] + [COLUMN] * columns
    payloads += [] if deprecate_eof else [eof(OK_STATUS, False)]
    payloads += [*rows, eof(status, deprecate_eof)]
    out = bytearray()
    for p in payloads:
        out += my.packets(p, seq)
        seq += 1 + len(p) // my.MAX_PACKET
    return bytes(out), seq


def query(sql: str) -> bytes:
    return my.packets(b"\x03" + sql.encode(), 0)


def execute(stmt_id: int, cursor: bool = False) -> bytes:
    flags = b"\x01" if cursor else b"\x00"
    return my.packets(b"\x17" + stmt_id.to_bytes(4, "little") + flags + b"\x01\0\0\0", 0)


def prepare_ok(stmt_id: int, deprecate_eof: bool) -> bytes:
    """STMT_PREPARE_OK for one column and one parameter, with their definitions."""
    head = b"\x00" + stmt_id.to_bytes(4, "little") + b"\x01\x00\x01\x00\x00\x00\x00"
    payloads = [head, COLUMN] + ([] if deprecate_eof else [eof(OK_STATUS, False)])
    payloads += [COLUMN] + ([] if deprecate_eof else [eof(OK_STATUS, False)])
    return b"".join(my.packets(p, i + 1) for i, p in enumerate(payloads))


# --- a session past authentication ----------------------------------------------------------


def session(deprecate_eof: bool, record_all: bool = True) -> MySqlSession:
    ctx = context()
    ctx.record_all = record_all
    s = MySqlSession(ctx, "t-1")
    events = capture()
    s.server_data(events[0][1])
    s.client_data(events[1][1])
    s.server_data(events[2][1])  # OK: authenticated
    s.deprecate_eof = deprecate_eof
    s.to_client.clear()
    s.to_server.clear()
    return s


def play(
    s: MySqlSession, script: list[tuple[str, bytes]], how: str, seed: int = 7
) -> tuple[bytes, bytes]:
    """Feed the script's reads in the given pieces; what the app and the server got."""
    rng = random.Random(seed)
    to_client, to_server = bytearray(), bytearray()
    for direction, data in script:
        for piece in pieces(data, how, rng, 40):
            (s.client_data if direction == "c" else s.server_data)(piece)
            to_client += s.to_client
            to_server += s.to_server
            s.to_client.clear()
            s.to_server.clear()
    return bytes(to_client), bytes(to_server)


def audit(s: MySqlSession) -> list[tuple[int | None, str | None]]:
    assert isinstance(s.ctx.sink, MemorySink)
    return [(e.rows, e.error) for e in s.ctx.sink.events]


# --- the conversation ---------------------------------------------------------------------


def conversation(
    deprecate_eof: bool, big: bool = True
) -> tuple[list[tuple[str, bytes]], list[object]]:
    """Commands and responses as a server sends them; the (rows, error) each statement gets."""
    script: list[tuple[str, bytes]] = []
    expected: list[object] = []

    def say(command: bytes, response: bytes, *outcomes: object) -> None:
        script.append(("c", command))
        script.append(("s", response))
        expected.extend(outcomes)

    say(my.packets(b"\x16SELECT c FROM t WHERE id = ?", 0), prepare_ok(7, deprecate_eof))
    uniform = [binary_row(b"%03d-" % i + b"x" * 115) for i in range(100)]
    say(execute(7), result_set(uniform, deprecate_eof)[0], (100, None))
    say(execute(7), result_set(uniform[:1], deprecate_eof)[0], (1, None))
    say(execute(7), result_set([], deprecate_eof)[0], (0, None))
    # Text rows of mixed lengths, a run of equal ones broken by a longer row (second length
    # byte), NULLs (0xFB) and a 2-byte length (0xFC) first.
    mixed = [b"\x01" + bytes([48 + i % 10]) * (1 + i % 3) for i in range(30)]
    mixed += [b"\x05hello"] * 20 + [b"\xfc\x05\x01" + b"y" * 261] + [b"\x05hello"] * 5
    mixed += [b"\xfb\x011", b"\xfc\x00\x01" + b"z" * 256]
    say(query("SELECT a FROM t"), result_set(mixed, deprecate_eof, columns=2)[0], (58, None))
    say(query("UPDATE t SET a = 1 WHERE id = 2"), my.packets(ok(3), 1), (3, None))
    first, seq = result_set(uniform[:10], deprecate_eof, OK_STATUS | MORE)
    second, _ = result_set(uniform[:2], deprecate_eof, seq=seq)
    say(query("SELECT 1; SELECT 2"), first + second, (10, None), (2, None))
    err = my.err_packet(1, 1146, "42S02", "Table 'x' doesn't exist")
    say(query("SELECT * FROM x"), err, (None, "42S02"))
    rows_then_err, after = result_set(uniform[:5], deprecate_eof)
    cut = rows_then_err.rindex(my.packets(eof(OK_STATUS, deprecate_eof), after - 1))
    killed = my.err_packet(after - 1, 1317, "70100", "Query execution was interrupted")
    say(execute(7), rows_then_err[:cut] + killed, (None, "70100"))
    if big:  # a row of 0xFFFFFF bytes and more is continued by the packet after it
        n = my.MAX_PACKET + 5
        row = b"\x00\x00\xfe" + n.to_bytes(8, "little") + b"b" * n
        say(execute(7), result_set([uniform[0], row, uniform[1]], deprecate_eof)[0], (3, None))
        # A text row that long starts with 0xFE (its length), like the OK that ends a result
        # with CLIENT_DEPRECATE_EOF: its length (0xFFFFFF) says it is a row.
        text = b"\xfe" + n.to_bytes(8, "little") + b"t" * n
        say(query("SELECT t FROM big"), result_set([text, b"\x011"], deprecate_eof)[0], (2, None))
    say(my.packets(b"\x0e", 0), my.packets(ok(), 1))  # COM_PING: no statement, no event
    return script, expected


@pytest.mark.parametrize("deprecate_eof", [False, True])
@pytest.mark.parametrize("how", ["whole", "random"])
@pytest.mark.parametrize("record_all", [True, False])
def test_responses_pass_unchanged_with_rows_and_errors_audited(
    deprecate_eof: bool, how: str, record_all: bool
) -> None:
    script, expected = conversation(deprecate_eof)
    s = session(deprecate_eof, record_all)
    to_client, to_server = play(s, script, how)
    assert to_server == b"".join(d for direction, d in script if direction == "c")
    assert to_client == b"".join(d for direction, d in script if direction == "s")
    assert not s.pending and s.closing is None
    assert audit(s) == (expected if record_all else [])


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_one_byte_at_a_time(deprecate_eof: bool) -> None:
    script, expected = conversation(deprecate_eof, big=False)
    s = session(deprecate_eof)
    to_client, _ = play(s, script, "bytewise")
    assert to_client == b"".join(d for direction, d in script if direction == "s")
    assert audit(s) == expected and not s.pending


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_unaudited_results_still_track_no_backslash_escapes(deprecate_eof: bool) -> None:
    s = session(deprecate_eof, record_all=False)
    play(
        s,
        [("c", my.packets(b"\x16SELECT c FROM t", 0)), ("s", prepare_ok(1, deprecate_eof))],
        "whole",
    )
    assert not s.state.no_backslash_escapes
    rows = [binary_row(b"abc")] * 3
    play(
        s, [("c", execute(1)), ("s", result_set(rows, deprecate_eof, OK_STATUS | NBE)[0])], "whole"
    )
    assert s.state.no_backslash_escapes
    play(s, [("c", query("SET sql_mode = ''")), ("s", my.packets(ok(), 1))], "whole")
    assert not s.state.no_backslash_escapes
    play(s, [("c", query("SET sql_mode = 'x'")), ("s", my.packets(ok(0, NBE), 1))], "whole")
    assert s.state.no_backslash_escapes and not s.pending


# OK packets as servers send them after INSERT or UPDATE (affected rows and last insert id
# are length-encoded: 1, 3, 4 or 9 bytes), and malformed ones: (payload, NO_BACKSLASH_ESCAPES
# read from its status, the session fails on it).
STATUS_NBE = (OK_STATUS | NBE).to_bytes(2, "little")
OK_PAYLOADS = {
    "one-byte": (b"\x00\x01\x00" + STATUS_NBE + b"\0\0", True, False),
    "insert-id-2": (b"\x00\x01\xfc\x75\x13" + STATUS_NBE + b"\0\0", True, False),
    "rows-3-id-8": (b"\x00\xfd\x01\x02\x03\xfe" + b"\x09" * 8 + STATUS_NBE, True, False),
    "rows-8": (b"\x00\xfe" + b"\x01" * 8 + b"\x00" + STATUS_NBE, True, False),
    "info": (b"\x00\xfc\x00\x01\x00" + STATUS_NBE + b"\0\0Rows matched: 1", True, False),
    "no-status": (b"\x00\x01\x00", False, False),
    "half-status": (b"\x00\x01\x00\x02", False, False),
    "status-cut-by-id": (b"\x00\x01\xfc\x75\x13\x02", False, False),
    "rows-past-the-end": (b"\x00\xfe\x01\x02\x03\x04", False, True),
    "id-past-the-end": (b"\x00\x01\xfd\x02\x00", False, True),
    "rows-0xfb": (b"\x00\xfb\x00\x02\x00", False, True),
    "id-0xff": (b"\x00\x01\xff\x02\x00", False, True),
}


@pytest.mark.parametrize("name", sorted(OK_PAYLOADS))
@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_an_unaudited_ok_is_read_as_an_audited_one(name: str, how: str) -> None:
    """The fast path's reading of the OK that ends a result nobody audits (its status flags,
    its malformations) is `_packet`'s, which reads it when the statement is audited."""
    payload, nbe, fails = OK_PAYLOADS[name]
    script = [("c", query("UPDATE t SET a = 1 WHERE id = 2")), ("s", my.packets(payload, 1))]
    script += [("c", query("UPDATE t SET a = 2 WHERE id = 3")), ("s", my.packets(ok(1), 1))]
    outcomes = []
    for record_all in (True, False):
        s = session(False, record_all)
        first = play(s, script[:2], how)
        state = s.state.no_backslash_escapes, s.closing is not None
        outcomes.append((first, state, play(s, script[2:], how), s.closing, len(s.pending)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == (nbe, fails)


def test_cursor_execution_then_fetch() -> None:
    s = session(False)
    script = [("c", my.packets(b"\x16SELECT c FROM t", 0)), ("s", prepare_ok(1, False))]
    # With a cursor the column definitions end with CURSOR_EXISTS and no rows follow.
    cursor_eof = eof(OK_STATUS | my.SERVER_STATUS_CURSOR_EXISTS, False)
    opened = b"".join(my.packets(p, i + 1) for i, p in enumerate([b"\x01", COLUMN, cursor_eof]))
    script += [("c", execute(1, cursor=True)), ("s", opened)]
    fetched = [binary_row(b"r%d" % i) for i in range(4)] + [eof(OK_STATUS | 0x80, False)]
    fetch = my.packets(b"\x1c" + (1).to_bytes(4, "little") + (10).to_bytes(4, "little"), 0)
    script += [("c", fetch), ("s", b"".join(my.packets(p, i + 1) for i, p in enumerate(fetched)))]
    script += [("c", query("SELECT 1")), ("s", result_set([b"\x011"], False)[0])]
    to_client, _ = play(s, script, "random")
    assert to_client == b"".join(d for direction, d in script if direction == "s")
    assert audit(s) == [(None, None), (1, None)] and not s.pending


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_denial_waits_behind_an_unaudited_multi_result(deprecate_eof: bool) -> None:
    s = session(deprecate_eof, record_all=False)
    s.client_data(query("SELECT 1; SELECT 2") + query("DROP TABLE t"))
    assert s.to_server == query("SELECT 1; SELECT 2") and s.to_client == b""
    first, seq = result_set([b"\x011"], deprecate_eof, OK_STATUS | MORE)
    second, _ = result_set([b"\x012"], deprecate_eof, seq=seq)
    s.server_data(first + second)
    out = bytes(s.to_client)
    assert out[: len(first + second)] == first + second
    err = out[len(first + second) :]
    assert err[3] == 1 and my.err_fields(err[4:]).code == my.ER_TABLEACCESS_DENIED
    assert not s.pending


def test_a_cached_plain_execution_is_decided_again_when_the_policy_changes() -> None:
    s = session(False, record_all=False)
    play(s, [("c", my.packets(b"\x16SELECT c FROM t", 0)), ("s", prepare_ok(1, False))], "whole")
    response = result_set([binary_row(b"abc")], False)[0]
    for _ in range(2):  # decided, then forwarded on the cached plain decision
        to_client, to_server = play(s, [("c", execute(1)), ("s", response)], "whole")
        assert to_server == execute(1) and to_client == response
    deny_select = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: guard}
spec:
  destination: orders-db
  rules:
    - {name: no-select, sql: {verbs: [SELECT]}, action: deny}
"""
    s.ctx.decider.use(Engine(load_texts([("p.yaml", deny_select)])))
    s.client_data(execute(1))
    assert s.to_server == b""
    assert my.err_fields(bytes(s.to_client[4:])).code == my.ER_TABLEACCESS_DENIED
    assert isinstance(s.ctx.sink, MemorySink)
    assert [e.decision for e in s.ctx.sink.events] == ["deny"]


# --- what the driver writes as it came (client_pass, server_pass) ----------------------------

INSERT_OK = my.packets(b"\x00\x01\xfc\x75\x13" + OK_STATUS.to_bytes(2, "little") + b"\0\0", 1)
PACED = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: guard}
spec:
  destination: orders-db
  rules:
    - {name: no-drop, sql: {verbs: [DROP]}, action: deny}
    - name: paced
      sql: {verbs: [INSERT], tables: [paced]}
      action: limit
      limit: {rate: 1, per: 1s, burst: 1, scope: source-app}
      on_exceed: delay
      max_delay: 2s
"""


def sysbench_like(deprecate_eof: bool) -> list[tuple[str, bytes]]:
    """Transactions as sysbench sends them with server-side prepared statements: BEGIN and
    COMMIT as queries, executions of statements prepared once (rows; an INSERT's OK with an
    insert id)."""
    select = my.packets(b"\x16SELECT c FROM sbtest1 WHERE id=?", 0)
    insert = my.packets(b"\x16INSERT INTO sbtest1 (id, k, c, pad) VALUES (?, ?, ?, ?)", 0)
    script = [("c", select), ("s", prepare_ok(1, deprecate_eof))]
    script += [("c", insert), ("s", prepare_ok(2, deprecate_eof))]
    row = binary_row(b"x" * 119)
    for _ in range(4):
        script += [("c", query("BEGIN")), ("s", my.packets(ok(), 1))]
        script += [("c", execute(1)), ("s", result_set([row], deprecate_eof)[0])]
        script += [("c", execute(2)), ("s", INSERT_OK)]
        script += [("c", query("COMMIT")), ("s", my.packets(ok(), 1))]
    return script


@pytest.mark.parametrize("deprecate_eof", [False, True])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("record_all", [True, False])
def test_the_driver_gets_unchanged_reads_back_as_they_came(
    how: str, deprecate_eof: bool, record_all: bool
) -> None:
    # client_pass/server_pass (what the driver calls) give the same bytes and audit events
    # as client_data/server_data; a read that goes on unchanged comes back itself, to be
    # written uncopied. (record_all: executions decided each time, or forwarded on their
    # cached plain decision by `_execute_again`.)
    script = conversation(deprecate_eof, big=how == "whole")[0] + sysbench_like(deprecate_eof)
    s = session(deprecate_eof, record_all)
    rng = random.Random(how)
    sent, shown = bytearray(), bytearray()
    returned = 0
    for side, data in script:
        feed = s.client_pass if side == "c" else s.server_pass
        for piece in pieces(data, how, rng, 40):
            passed = feed(piece)
            if passed is not None:
                assert not s.to_server and not s.to_client, "passed with output waiting"
                assert how != "whole" or passed is piece
                (sent if side == "c" else shown).extend(passed)
                returned += 1
            sent += s.to_server
            shown += s.to_client
            s.to_server.clear()
            s.to_client.clear()
    assert bytes(sent) == b"".join(d for side, d in script if side == "c")
    assert bytes(shown) == b"".join(d for side, d in script if side == "s")
    assert not s.pending and s.closing is None
    buffered = session(deprecate_eof, record_all)
    play(buffered, script, how, seed=0)
    assert audit(s) == audit(buffered)
    if how == "whole":
        assert returned == len(script)
    else:
        assert returned > 0  # the reads that end a packet the app's command or the server's


def test_what_is_changed_held_or_waited_for_is_not_passed() -> None:
    s = session(False, record_all=False)
    select, rows, done = query("SELECT c FROM t"), result_set([b"\x011"], False)[0], ok()

    def taken() -> tuple[bytes, bytes]:
        """(to the server, to the app) since the last call."""
        out = bytes(s.to_server), bytes(s.to_client)
        s.to_server.clear()
        s.to_client.clear()
        return out

    # Denied: the sidecar's ERR (its sequence id after the command's) goes back.
    assert s.client_pass(query("DROP TABLE t")) is None
    up, down = taken()
    assert up == b"" and down[3] == 1
    assert my.err_fields(down[4:]).code == my.ER_TABLEACCESS_DENIED
    # Cut before its denied statement: the prefix goes rewritten, and the end of its result
    # is flagged (more results follow) before the sidecar's ERR.
    assert s.client_pass(query("SELECT 1; DROP TABLE t")) is None
    assert taken() == (query("SELECT 1; "), b"")
    assert s.server_pass(rows) is None
    down = taken()[1]
    assert down[: len(rows)] != rows and len(down) > len(rows)
    assert my.err_fields(down[len(rows) + 4 :]).code == my.ER_TABLEACCESS_DENIED
    # Output already waiting goes first: the read is appended after it.
    s.to_server += b"waiting"
    assert s.client_pass(select) is None and taken() == (b"waiting" + select, b"")
    s.to_client += b"waiting"
    assert s.server_pass(rows) is None and taken() == (b"", b"waiting" + rows)
    # The same for an execution forwarded on its cached plain decision (`_execute_again`),
    # and what the app has waiting for it (an answer of the sidecar's own) goes out with it.
    prepare = my.packets(b"\x16SELECT c FROM t WHERE id = ?", 0)
    assert s.client_pass(prepare) == prepare
    assert s.server_pass(prepare_ok(1, False)) == prepare_ok(1, False)
    assert s.client_pass(execute(1)) == execute(1) and s.decisions[1][4]  # now cached
    assert s.server_pass(rows) == rows
    s.to_client += b"answer"
    assert s.client_pass(execute(1)) is None and taken() == (execute(1), b"answer")
    assert s.server_pass(rows) == rows
    s.to_server += b"waiting"
    assert s.client_pass(execute(1)) is None and taken() == (b"waiting" + execute(1), b"")
    assert s.server_pass(rows) == rows
    # An incomplete packet waits for the rest: the server's is then passed whole, the app's
    # goes through the input buffer; so do two commands in one read.
    assert s.client_pass(select[:3]) is None and s.client_pass(select[3:]) is None
    assert taken() == (select, b"")
    assert s.server_pass(rows[:3]) is None and not s.to_client
    assert s.server_pass(rows[3:]) == rows
    assert s.client_pass(select + select) is None and taken() == (select + select, b"")
    assert s.server_pass(rows + rows) == rows + rows
    # A statement never prepared: answered here.
    assert s.client_pass(execute(9)) is None
    up, down = taken()
    assert up == b"" and my.err_fields(down[4:]).code == my.ER_UNKNOWN_STMT_HANDLER
    # Delayed by a limit: held until released; what the server says meanwhile goes on.
    s.ctx.decider.use(Engine(load_texts([("p.yaml", PACED)])))
    insert = query("INSERT INTO paced VALUES (1)")
    assert s.client_pass(insert) == insert  # the burst
    assert s.client_pass(insert) is None and s.wait > 0 and taken() == (b"", b"")
    assert s.server_pass(my.packets(done, 1)) == my.packets(done, 1)
    s.release()
    assert taken() == (insert, b"")
    assert s.server_pass(my.packets(done, 1)) == my.packets(done, 1)
    # COM_CHANGE_USER starts an authentication exchange: it and the server's answers go
    # through the driver's pump; commands after it are passed again.
    change = my.packets(b"\x11other\0\0", 0)
    assert s.client_pass(change) is None and taken() == (change, b"")
    assert s.server_pass(my.packets(done, 1)) is None and taken() == (b"", my.packets(done, 1))
    assert s.client_pass(select) == select and s.server_pass(rows) == rows
    # A malformed answer: the session closes with an ERR to the app, and nothing more goes.
    assert s.client_pass(select) == select
    assert s.server_pass(my.packets(b"\x00\xfe\x01\x02\x03\x04", 1)) is None
    assert s.closing is not None and my.err_fields(taken()[1][4:]).code
    assert s.client_pass(select) is None and s.server_pass(rows) is None
    # COM_QUIT: the session closes once its output is written, so the driver pumps.
    s = session(False)
    quit_ = my.packets(b"\x01", 0)
    assert s.client_pass(quit_) is None and s.closing == "client quit"
    assert s.to_server == quit_


# --- skip_rows ------------------------------------------------------------------------------


def walk(buf: bytes, pos: int, size: int) -> tuple[int, int]:
    """What `skip_rows` must return: complete row packets, one at a time."""
    rows = 0
    while size - pos > 4:
        length = int.from_bytes(buf[pos : pos + 3], "little")
        end = pos + 4 + length
        if end > size or not length or length == my.MAX_PACKET or buf[pos + 4] >= 0xFE:
            break
        rows += 1
        pos = end
    return pos, rows


packet_specs = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 5, 122, 122, 122, 255, 256, 378, 65536 + 122]),
        st.sampled_from([0x00, 0x00, 0x00, 0x05, 0xFB, 0xFC, 0xFE, 0xFF]),
    ),
    max_size=60,
)


@given(packet_specs, st.integers(0, 130), st.integers(0, 3))
def test_skip_rows_matches_a_packet_by_packet_walk(
    specs: list[tuple[int, int]], cut: int, start: int
) -> None:
    buf = b"".join(
        my.packets((bytes([first]) + b"r" * length)[:length], i)
        for i, (length, first) in enumerate(specs)
    )
    size = max(0, len(buf) - cut)  # the last packet may be incomplete
    pos = min(start, size)
    assert my.skip_rows(buf, pos, size) == walk(buf, pos, size)
    assert my.skip_rows(bytearray(buf), pos, size) == walk(buf, pos, size)


def test_skip_rows_stops_where_a_run_of_equal_rows_breaks() -> None:
    row = my.packets(b"\x00" + b"x" * 121, 0)
    for odd, rows in (
        (my.packets(b"\x00" + b"x" * 377, 0), 54),  # the same low length byte: a row
        (my.packets(b"\xfe" + b"x" * 121, 0), 50),  # the same length, but it may end it
        (my.packets(b"\xff" + b"x" * 121, 0), 50),
        (row[:-1], 50),  # incomplete
    ):
        buf = row * 50 + odd + row * 3
        size = len(row) * 50 + len(odd) if rows == 50 and odd[4] < 0xFE else len(buf)
        assert my.skip_rows(buf, 0, size) == walk(buf, 0, size)
        assert my.skip_rows(buf, 0, size)[1] == rows


@pytest.mark.parametrize("record_all", [True, False])
def test_a_long_text_row_starting_like_the_ok_that_ends_a_result_is_a_row(
    record_all: bool,
) -> None:
    """With CLIENT_DEPRECATE_EOF a result ends with an OK whose header is 0xFE; a text row
    whose first value is 16 MiB or longer starts with 0xFE too, but is 0xFFFFFF long."""
    s = session(True, record_all)
    s.client_data(query("SELECT t FROM big") + query("DROP TABLE t"))
    n = my.MAX_PACKET + 5
    response, _ = result_set([b"\xfe" + n.to_bytes(8, "little") + b"t" * n, b"\x011"], True)
    s.server_data(response)
    out = bytes(s.to_client)
    assert out[: len(response)] == response  # our ERR after the whole result, not inside
    assert my.err_fields(out[len(response) + 4 :]).code == my.ER_TABLEACCESS_DENIED
    assert not s.pending
    assert audit(s) == [(None, "42000")] + ([(2, None)] if record_all else [])  # deny first

"""`MySqlSession` replays a byte stream captured from PyMySQL against MariaDB 10.11 (through a
recording relay: captures/mysql_pymysql.json), whole, one byte at a time and in random
pieces; plus hand-built packets for what a capture cannot show (pipelined denials,
multi-packet payloads, malformed input). No server needed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.sql.inspect import MYSQL
from sidecar.audit import MemorySink
from sidecar.limits import Limiter
from sidecar.mysql_session import MySqlSession
from sidecar.pg_session import RouteContext
from sidecar.protocols import mysql as my
from tests.sidecar.splits import HOWS, pieces

CAPTURE = Path(__file__).parent / "captures" / "mysql_pymysql.json"

# Every case runs against the pure Python session and the one over the compiled response
# FIFO (conftest.mysql_build).
pytestmark = pytest.mark.usefixtures("mysql_build")
POLICY = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: guard}
spec:
  destination: orders-db
  rules:
    - name: no-drop
      sql: {verbs: [DROP]}
      action: deny
"""


def context() -> RouteContext:
    engine = Engine(load_texts([("p.yaml", POLICY)]))
    peer = Peer("billing", "orders-db", "billing-1")
    return RouteContext(
        app="billing",
        instance="billing-1",
        service="orders-db",
        decider=SqlDecider(engine, peer, MYSQL),
        limiter=Limiter(),
        sink=MemorySink(),
        clock=lambda: 1_700_000_000.0,
    )


def capture() -> list[tuple[str, bytes]]:
    return [(d, bytes.fromhex(h)) for d, h in json.loads(CAPTURE.read_text())]


def replay(how: str) -> tuple[bytes, bytes, MySqlSession]:
    s = MySqlSession(context(), "t-1")
    rng = random.Random(7)
    to_server, to_client = bytearray(), bytearray()
    for direction, data in capture():
        for piece in pieces(data, how, rng, 40):
            if direction == "c":
                s.client_data(piece)
            else:
                s.server_data(piece)
            to_server += s.to_server
            to_client += s.to_client
            s.to_server.clear()
            s.to_client.clear()
    return bytes(to_server), bytes(to_client), s


@pytest.mark.parametrize("how", HOWS)
def test_capture_replays_unchanged_but_for_the_greeting(how: str) -> None:
    to_server, to_client, s = replay(how)
    events = capture()
    client = b"".join(d for direction, d in events if direction == "c")
    server = b"".join(d for direction, d in events if direction == "s")
    assert to_server == client
    assert len(to_client) == len(server)
    greeting_len = 4 + int.from_bytes(server[:3], "little")
    assert to_client[greeting_len:] == server[greeting_len:]
    g = my.parse_greeting(to_client[4:greeting_len])
    assert not g.capabilities & (my.CLIENT_SSL | my.CLIENT_COMPRESS)
    assert g.mariadb and g.version >= 101100
    assert s.state.server_version == g.version and not s.pending
    assert s.closing == "client quit"
    assert isinstance(s.ctx.sink, MemorySink)
    events_ = [(e.statement, e.rows, e.error) for e in s.ctx.sink.events]
    assert events_ == [
        ("SET NAMES utf8mb4", 0, None),
        ("SELECT ? AS one, ? AS two", 1, None),
        ("SELECT ?", 1, None),
        ("SELECT ?, ?", 1, None),
        ("DO ?", 0, None),
        ("SELECT seq, CONCAT(?, seq) FROM seq_1_to_50", 50, None),
        ("SELECT * FROM no_such_db.no_such_table", None, "42S02"),
    ]


def _session() -> MySqlSession:
    """A session past authentication, fed the captured greeting and handshake."""
    s = MySqlSession(context(), "t-1")
    events = capture()
    s.server_data(events[0][1])
    s.client_data(events[1][1])
    s.server_data(events[2][1])  # OK: authenticated
    s.to_client.clear()
    s.to_server.clear()
    return s


def query(sql: str) -> bytes:
    return my.packets(b"\x03" + sql.encode(), 0)


OK_PACKET = my.packets(b"\x00\x00\x00\x02\x00\x00\x00", 1)


def test_denial_behind_a_pending_response_waits_its_turn() -> None:
    s = _session()
    s.client_data(query("UPDATE t SET a = 1 WHERE id = 2") + query("DROP TABLE t"))
    assert s.to_server == query("UPDATE t SET a = 1 WHERE id = 2")
    assert s.to_client == b""  # the server has not answered the UPDATE yet
    for b in OK_PACKET:
        s.server_data(bytes([b]))
    err = bytes(s.to_client[len(OK_PACKET) :])
    assert s.to_client[: len(OK_PACKET)] == OK_PACKET
    assert err[3] == 1 and err[4] == 0xFF
    assert my.err_fields(err[4:]).code == my.ER_TABLEACCESS_DENIED
    assert not s.pending


def test_multi_packet_query_is_reassembled_and_its_allowed_prefix_runs() -> None:
    s = _session()
    assert s.multi_statements  # the captured PyMySQL handshake asks for them
    head = "SELECT '" + "x" * my.MAX_PACKET + "'; "
    s.client_data(query(head + "DROP TABLE t"))
    assert s.to_server == query(head)  # two packets still: sequence ids 0 and 1
    assert s.to_client == b""
    ok = my.packets(b"\x00\x00\x00\x02\x00\x00\x00", 2)  # no more results
    s.server_data(ok)
    out = bytes(s.to_client)
    assert out[: len(ok)] == my.packets(b"\x00\x00\x00\x0a\x00\x00\x00", 2)  # now: more
    err = out[len(ok) :]
    assert err[3] == 3  # after the server's last packet
    assert my.err_fields(err[4:]).code == my.ER_TABLEACCESS_DENIED
    assert not s.pending


def test_server_error_inside_the_prefix_drops_the_sidecars_error() -> None:
    s = _session()
    s.client_data(query("SELECT * FROM nope; DROP TABLE t; SELECT 1"))
    assert s.to_server == query("SELECT * FROM nope; ")
    server_err = my.err_packet(1, 1146, "42S02", "Table 'nope' doesn't exist")
    s.server_data(server_err)
    assert s.to_client == server_err and not s.pending
    assert isinstance(s.ctx.sink, MemorySink)
    assert [(e.decision, e.error) for e in s.ctx.sink.events] == [
        ("allow", "42S02"),
        ("deny", "skipped"),
    ]


def test_denied_first_statement_or_no_multi_statements_refuses_the_whole_text() -> None:
    s = _session()
    s.client_data(query("DROP TABLE t; SELECT 1"))
    assert s.to_server == b""
    assert my.err_fields(bytes(s.to_client[4:])).code == my.ER_TABLEACCESS_DENIED
    s.to_client.clear()
    s.client_data(my.packets(b"\x1b\x01\x00", 0))  # COM_SET_OPTION: multi-statements off
    s.server_data(my.packets(b"\xfe\x00\x00\x02\x00", 1))
    s.to_client.clear()
    s.to_server.clear()
    s.client_data(query("SELECT 1; DROP TABLE t"))
    assert s.to_server == b""
    assert my.err_fields(bytes(s.to_client[4:])).code == my.ER_TABLEACCESS_DENIED


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00\x00\x00\x00",  # an empty command
        b"\x01\x00\x00\x03\x0e",  # a command with sequence id 3
    ],
)
def test_malformed_commands_close_the_session_with_an_error(packet: bytes) -> None:
    s = _session()
    s.client_data(packet)
    assert s.closing is not None
    assert my.err_fields(bytes(s.to_client[4:])).code == my.ER_NET_PACKETS_OUT_OF_ORDER
    assert s.to_server == b""


def test_unknown_command_is_refused_and_the_session_goes_on() -> None:
    s = _session()
    s.client_data(my.packets(b"\x12binlog", 0))  # COM_BINLOG_DUMP
    assert my.err_fields(bytes(s.to_client[4:])).code == my.ER_UNKNOWN_COM
    assert s.closing is None and s.to_server == b""
    s.to_client.clear()
    s.client_data(query("SELECT 1"))
    assert s.to_server == query("SELECT 1")


def test_ansi_quotes_reading_is_checked_too() -> None:
    s = _session()
    # Without ANSI_QUOTES "...\" ..." is one string; with it, the backslash is plain and the
    # DROP is a statement. The stricter reading wins.
    s.client_data(query('SELECT "a\\"; DROP TABLE t; -- "'))
    assert s.to_server == b""
    assert my.err_fields(bytes(s.to_client[4:])).code == my.ER_TABLEACCESS_DENIED


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_prefix_ending_in_a_result_set_flags_its_terminator(deprecate_eof: bool) -> None:
    s = _session()
    s.deprecate_eof = deprecate_eof
    s.client_data(query("SELECT 1; DROP TABLE t"))
    assert s.to_server == query("SELECT 1; ")
    column = b"\x03def\x00\x00\x00\x011\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x81\x00\x00\x00\x00"
    eof = b"\xfe\x00\x00\x02\x00" if not deprecate_eof else b"\xfe\x00\x00\x02\x00\x00\x00"
    parts = [b"\x01", column] + ([] if deprecate_eof else [b"\xfe\x00\x00\x02\x00"])
    parts += [b"\x011", eof]
    response = b"".join(my.packets(p, i + 1) for i, p in enumerate(parts))
    for b in response:
        s.server_data(bytes([b]))
    out = bytes(s.to_client)
    flagged = bytearray(response)
    flagged[-2 if not deprecate_eof else -4] |= my.SERVER_MORE_RESULTS_EXISTS
    assert out[: len(response)] == flagged
    err = out[len(response) :]
    assert err[3] == len(parts) + 1
    assert my.err_fields(err[4:]).code == my.ER_TABLEACCESS_DENIED
    assert not s.pending

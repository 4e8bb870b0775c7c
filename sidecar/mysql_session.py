"""One MySQL/MariaDB session through the sidecar: the sans-I/O state machine.

The driver (`sidecar/connection.py`) feeds bytes from the app to `client_pass` and bytes from the
server to `server_pass`, writes a read they return as it came, and else writes out
`to_server` and `to_client` (the same interface as `PgSession`; `client_data`/`server_data`
always leave the output in those buffers). The server speaks first, so `startup_sent` is
true from the start: the driver connects upstream as soon as the app connects.

- Connection phase (`sidecar/mysql_handshake.py`): the server's greeting loses TLS,
  compression and formats we do not parse from its capability flags (docs/decisions/0006);
  the client's HandshakeResponse is read for its capabilities and character set; TLS to the
  server starts there when the route asks for it; authentication (native password, ed25519,
  caching_sha2...) passes through until the server's OK or ERR. COM_CHANGE_USER re-enters it.
- COM_QUERY: every statement is decided; if one is denied, the statements before it are
  forwarded (cut at its span) and the sidecar's ERR 1142 / 42000 follows their results, as
  the server's own error would; when the first is denied, the whole string is answered by
  the sidecar and not forwarded (MySQL does not abort a transaction on an error, so a local
  ERR leaves the server where the server's own error would). docs/decisions/0006, item 5.
  A rate-limit rejection is ERR 1226 / 42000; a delay holds the command.
- COM_STMT_PREPARE is decided (deny only); the server's STMT_PREPARE_OK gives the statement
  id; every COM_STMT_EXECUTE of it is decided again (time windows, limits).
- SQL-level PREPARE/EXECUTE/DEALLOCATE are tracked per session as in `PgSession`.

Responses are matched to commands with a FIFO (`mysql_responses.Responses`), which also
yields each statement's rows, duration and error for its audit event, and places the
sidecar's own answers in order when the app has pipelined commands. That module also holds
the driver's entry points (`client_pass`, `server_pass`) with the common case of each: an
execution whose cached decision is a plain allow, and the responses once authenticated;
this class supplies the rest (`_client_data`, `_connection_data`). It has a compiled build
(Cython); `session_class()` gives the driver a session over it when it is current
(docs/decisions/0013-compiled-pg-session.md).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable

from policies.engine import Decision
from policies.spec import Action
from policies.sql.inspect import SessionState, session_state
from policies.sql.model import StatementInfo, parse_error
from sidecar import builds
from sidecar import mysql_responses as rs
from sidecar.mysql_handshake import COMMAND, GREETING, Handshake
from sidecar.protocols import mysql as my
from sidecar.session_common import RouteContext, Run, SessionAudit, deny_text, limit_text

DENIED_STATE = "42000"
_OPAQUE_EXECUTE = StatementInfo(verb="EXECUTE", verbs=frozenset({"EXECUTE"}), opaque=True)
# Commands answered by one packet (OK, ERR, EOF or a string) and passed through.
_SIMPLE_COMMANDS = frozenset(
    {my.COM_INIT_DB, my.COM_PING, my.COM_STMT_RESET, my.COM_SET_OPTION, my.COM_STATISTICS}
    | {my.COM_REFRESH, my.COM_PROCESS_KILL, my.COM_DEBUG, my.COM_SHUTDOWN}
    | {my.COM_RESET_CONNECTION}
)
_SET_NAMES = re.compile(r"\bSET\s+(?:NAMES|CHARACTER\s+SET|CHARSET)\s+([`'\"]?\w+)", re.I)
_CHARSET_WORDS = re.compile(r"\b(?:NAMES|CHARACTER\s+SET|CHARSET|character_set_client)\b", re.I)
_UNDECODABLE = (
    "the connection's character set is not one the sidecar reads (only ASCII text is "
    "inspected in it)"
)
_SEVERITY = {Action.DENY: 2, Action.LIMIT: 1}


def _state(version: int, mariadb: bool, ansi: bool, nbe: bool) -> SessionState:
    """The session state of a MySQL/MariaDB server (interned: it keys the decider's cache)."""
    return session_state("mysql", True, version, mariadb, ansi, nbe)


class MySqlSession(SessionAudit, Handshake):
    """The protocol state machine of one app connection and its server connection.

    `tls_mode` is the route's (TLS to the server); `upstream` names the server in errors;
    `start_tls` is the driver's, called when the connection to the server must turn TLS
    (it then calls `tls_started` or `tls_failed`)."""

    protocol = "mysql"
    deallocate_all = None  # MySQL has no DEALLOCATE ALL

    def __init__(
        self,
        ctx: RouteContext,
        session_id: str,
        tls_mode: str = "disable",
        upstream: str = "",
        start_tls: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(tls_mode, upstream or ctx.service, start_tls)
        self.ctx = ctx
        self.session_id = session_id
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.closing: str | None = None
        self.startup_sent = True  # the server speaks first: connect at once
        self.cancel_packet: bytes | None = None  # KILL QUERY is plain SQL in MySQL
        self.backend_key: bytes | None = None
        self.wait = 0.0
        self.deprecate_eof = False
        self.encoding: str | None = "utf-8"
        self.state: SessionState = _state(101100, True, False, False)
        self._held: bytes | None = None
        self._cin = bytearray()
        self._cseq = 0
        self._sql_prepared: dict[str, StatementInfo] = {}
        self.multi_statements = False  # CLIENT_MULTI_STATEMENTS, or COM_SET_OPTION's
        self._rewritten: bytes | None = None  # what goes upstream in place of the command

    # -- app -> server ----------------------------------------------------------------------

    def _client_data(self, data: bytes) -> bytes | None:
        """`client_pass` (mysql_responses) for all but the executions it forwards itself:
        `data` itself when it goes on whole and unchanged with nothing else waiting, else
        None (the output is in `to_server` and `to_client`)."""
        try:
            size = len(data) - 4
            if (  # the common case: one whole command (one packet) in one read
                0 < size < my.MAX_PACKET
                and data[3] == 0
                and (data[0] | data[1] << 8 | data[2] << 16) == size
                and not self._cin
                and self._phase == COMMAND
                and self.wait == 0.0
                and self.closing is None
                and not self.infile
                and size <= self.ctx.max_message
            ):
                return self._one_command(data)
            # Pieces of packets, several packets, or the connection phase: through the
            # input buffer, and the output always in `to_server` (never passed: the
            # greeting, TLS and authentication must reach the driver's pump).
            self._cin += data
            self._client_packets()
        except my.ProtocolError as exc:
            self._fail(f"invalid packet from the client: {exc}")
        return None

    def _one_command(self, packet: bytes) -> bytes | None:
        """`_client_packets` for a read that holds one whole command packet (sequence id 0):
        the read itself goes upstream (unless rewritten, held or answered), with no copy
        into the input buffer and back out. Returns it when the driver may write it as it
        came: unchanged, and nothing else to do (nothing waiting in either buffer, no
        wait, not closing, still in the command phase: COM_CHANGE_USER starts an
        authentication exchange, whose packets go through the driver's pump)."""
        self._cseq = 0
        forward = self._command(packet[4:], 0)
        rewritten, self._rewritten = self._rewritten, None
        if not forward:
            return None  # answered here (in `to_client`)
        if rewritten is None:
            if (
                not self.wait
                and self.closing is None
                and self._phase == COMMAND
                and not self.to_server
                and not self.to_client
            ):
                return packet if type(packet) is bytes else bytes(packet)
        else:
            packet = rewritten
        if self.wait:
            self._held = packet
        else:
            self.to_server += packet
        return None

    def release(self) -> None:
        """The delay of a limited command is over: send it and go on."""
        held, self._held, self.wait = self._held, None, 0.0
        if held:
            self.to_server += held
        self.client_data(b"")

    def _client_packets(self) -> None:
        buf = self._cin
        pos = fwd = 0
        out = self.to_server
        try:
            while self.wait == 0.0 and self.closing is None and self._phase != GREETING:
                end, payload, seq = self._command_at(buf, pos)
                if end < 0:
                    break
                if self._phase != COMMAND:  # handshake and authentication: mysql_handshake
                    if self._waits(seq):
                        break  # TLS is starting, or a command came before authentication ended
                    self._cseq = seq
                    out += buf[fwd:pos]
                    fwd = pos
                    self._connection_packet(payload, seq, bytes(buf[pos:end]))
                    pos = fwd = end
                    continue
                self._cseq = seq
                if not self.infile:
                    if not payload:
                        raise my.ProtocolError("empty command packet")
                    if buf[pos + 3] != 0:
                        raise my.ProtocolError(f"command starts with sequence id {buf[pos + 3]}")
                    forward = self._command(payload, seq)  # False: answered here
                    packet, self._rewritten = self._rewritten, None
                    if not forward or self.wait or packet is not None:
                        out += buf[fwd:pos]
                        fwd = end
                        if forward:
                            packet = bytes(buf[pos:end]) if packet is None else packet
                            if self.wait:
                                self._held = packet
                            else:
                                out += packet
                elif not payload:  # the empty packet ends the file (LOCAL INFILE)
                    self.infile = False
                pos = end
        finally:
            out += buf[fwd:pos]
            del buf[:pos]

    def _command_at(self, buf: bytearray, pos: int) -> tuple[int, bytes, int]:
        """(end, payload, last sequence id) of the logical packet at `pos`, or end -1."""
        size = len(buf)
        if size - pos >= 4:  # the common case: one packet (shorter than 0xFFFFFF)
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            end = pos + 4 + length
            if length < my.MAX_PACKET and end <= size and length <= self.ctx.max_message:
                return end, bytes(buf[pos + 4 : end]), buf[pos + 3]
        at = pos
        chunks: list[bytes] = []
        total = 0
        while True:
            if size - at < 4:
                return -1, b"", 0
            length, seq = my.packet_header(buf, at)
            if at + 4 + length > size:
                return -1, b"", 0
            total += length
            if total > self.ctx.max_message:
                raise my.ProtocolError(f"packet of more than {self.ctx.max_message} bytes")
            chunks.append(bytes(buf[at + 4 : at + 4 + length]))
            at += 4 + length
            if length < my.MAX_PACKET:
                return at, chunks[0] if len(chunks) == 1 else b"".join(chunks), seq

    def _command(self, payload: bytes, seq: int) -> bool:
        """Handle one command; False when the sidecar answered it (nothing forwarded)."""
        com = payload[0]
        if com == my.COM_QUERY:
            return self._query(payload[1:], seq)
        if com == my.COM_STMT_PREPARE:
            return self._prepare(payload[1:], seq)
        if com == my.COM_STMT_EXECUTE:
            return self._execute(payload, seq)
        if com in (my.COM_STMT_CLOSE, my.COM_STMT_SEND_LONG_DATA):  # no response
            if com == my.COM_STMT_CLOSE and len(payload) >= 5:
                self.forget(int.from_bytes(payload[1:5], "little"))
            return True
        if com == my.COM_STMT_FETCH:
            self.expect(rs.FETCH)
        elif com == my.COM_FIELD_LIST:
            self.expect(rs.FIELDS)
        elif com == my.COM_PROCESS_INFO:
            self.expect(rs.RESULT)
        elif com in _SIMPLE_COMMANDS:
            if com == my.COM_RESET_CONNECTION:
                self._reset_statements()
            elif com == my.COM_SET_OPTION and len(payload) >= 3:
                option = payload[1] | payload[2] << 8
                self.multi_statements = option == my.MYSQL_OPTION_MULTI_STATEMENTS_ON
            self.expect(rs.SIMPLE)
        elif com == my.COM_CHANGE_USER:
            self._reset_statements()
            self.change_user(payload)
        elif com == my.COM_QUIT:
            self.closing = "client quit"
        else:
            text = f"sluice: command {com:#04x} is not supported through the sidecar"
            self.answer(my.err_packet(seq + 1, my.ER_UNKNOWN_COM, "08S01", text))
            return False
        return True

    def _query(self, raw: bytes, seq: int) -> bool:
        ctx = self.ctx
        now = ctx.clock()
        sql, statements, decision = self._decide_text(raw, now)
        tail: rs.Tail | None = None
        if decision.applied is Action.DENY:
            cut = self._before_denial(raw, sql, statements, now, seq)
            # The prefix is a text of its own, decided as one (in every reading).
            first = self._decide_text(cut[0], now) if cut is not None else None
            if cut is None or first is None or first[2].applied is Action.DENY:
                self._deny(sql, statements, decision, now, seq)
                return False
            (sql, statements, decision), tail = first, cut[1]
            self._rewritten = my.packets(bytes([my.COM_QUERY]) + cut[0], 0)
        outcome = self._limit(sql, statements, decision, now, seq)
        if outcome is None:
            return False
        self._remember_sql_prepared(statements)
        self._watch_charset(sql, statements)
        if len(statements) > 1:
            runs = self._each_statement(sql, statements, decision, now, outcome)
        else:
            info = statements[0] if statements else None
            shape = ctx.decider.last_shape
            runs = [self._run(sql, info, decision, now, outcome, shape=shape)]
        self.expect(rs.RESULT, runs, tail=tail)
        return True

    def _before_denial(
        self, raw: bytes, sql: str, statements: tuple[StatementInfo, ...], now: float, seq: int
    ) -> tuple[bytes, rs.Tail] | None:
        """The text before the first denied statement and that statement's ERR, when the
        server would run that prefix (docs/decisions/0006, item 5); None: refuse whole."""
        if len(statements) < 2 or not self.multi_statements:
            return None  # without multi-statements the server refuses the whole text
        engine, peer = self.ctx.decider.engine, self.ctx.peer
        k = 0
        for info in statements:
            d = engine.decide(peer, info, now)
            if d.applied is Action.DENY or info.span is None:
                break
            k += 1
        else:
            return None  # only the statements together are denied
        if k == 0 or info.span is None or d.applied is not Action.DENY:
            return None
        start, stop = info.span
        prefix = self._prefix_bytes(raw, sql, start)
        if (1 + len(prefix)) // my.MAX_PACKET != seq:
            return None  # fewer packets: the server's sequence ids would not be the app's
        text = sql.encode()[start:stop].decode()
        run = Run(now, time.monotonic(), text, info, d, "deny")
        err = my.err_payload(my.ER_TABLEACCESS_DENIED, DENIED_STATE, deny_text(d, info))
        return prefix, (run, err)

    def _prefix_bytes(self, raw: bytes, sql: str, utf8_offset: int) -> bytes:
        """The bytes of `raw` before the statement at `utf8_offset` (a span start)."""
        if self.encoding == "utf-8" or sql.isascii():
            return raw[:utf8_offset]
        # The other codecs read here (cp1252, latin-1) map one byte to one character.
        return raw[: len(sql.encode()[:utf8_offset].decode())]

    def _prepare(self, raw: bytes, seq: int) -> bool:
        now = self.ctx.clock()
        sql, statements, decision = self._decide_text(raw, now)
        if decision.applied is Action.DENY:
            self._deny(sql, statements, decision, now, seq)
            return False
        self.expect(rs.PREPARE, prepared=(sql, statements))
        return True

    def _execute(self, payload: bytes, seq: int) -> bool:
        if len(payload) < 5:
            raise my.ProtocolError("COM_STMT_EXECUTE too short")
        now = self.ctx.clock()
        stmt_id = int.from_bytes(payload[1:5], "little")
        if stmt_id not in self.prepared:
            self._unknown_statement(stmt_id, now, seq)
            return False
        sql, statements, decision = self._decide_prepared(stmt_id, now)
        if decision.applied is Action.DENY:
            self._deny(sql, statements, decision, now, seq)
            return False
        outcome = self._limit(sql, statements, decision, now, seq)
        if outcome is None:
            return False
        self._remember_sql_prepared(statements)
        info = statements[0] if statements else None
        self.expect(rs.RESULT, [self._run(sql, info, decision, now, outcome)])
        return True

    def _unknown_statement(self, stmt_id: int, now: float, seq: int) -> None:
        """An execution of a statement id this session never saw prepared, or closed, or
        lost to a reset: the server does not know it either (its ids are the ones the
        sidecar saw it give). Answered as the server answers it, ER_UNKNOWN_STMT_HANDLER,
        and never forwarded: the sidecar cannot say what it would run. Audited as a denial
        of an opaque EXECUTE with that error."""
        ctx = self.ctx
        decision = ctx.decider.engine.decide(ctx.peer, _OPAQUE_EXECUTE, now)
        run = Run(now, time.monotonic(), "", _OPAQUE_EXECUTE, decision, "deny")
        self.record(run, None, my.UNKNOWN_STMT_STATE)
        text = f"Unknown prepared statement handler ({stmt_id}) given to mysqld_stmt_execute"
        self.answer(my.err_packet(seq + 1, my.ER_UNKNOWN_STMT_HANDLER, my.UNKNOWN_STMT_STATE, text))

    def _decide_prepared(
        self, stmt_id: int, now: float
    ) -> tuple[str, tuple[StatementInfo, ...], Decision]:
        """Decide an execution; repeated ones reuse the decision while the policy set and,
        with time windows, the minute are the same."""
        ctx = self.ctx
        engine = ctx.decider.engine
        sql, statements, state = self.prepared[stmt_id]  # known: `_execute` checked
        minute = int(now // 60)
        cached = self.decisions.get(stmt_id)
        if cached is not None and cached[0] is engine and (cached[1] < 0 or cached[1] == minute):
            return sql, cached[2], cached[3]
        statements, decision = ctx.decider.decide(sql, now, state)
        resolved, decision = self._resolve(statements, decision, now)
        if resolved is statements:
            valid = -1 if engine.view(ctx.peer).timeless else minute
            plain = self._plain(statements, decision)
            self.decisions[stmt_id] = (engine, valid, statements, decision, plain)
        return sql, resolved, decision

    def _plain(self, statements: tuple[StatementInfo, ...], decision: Decision) -> bool:
        """Whether an execution with this decision needs nothing but forwarding: allowed,
        no limit (dry-run ones included), no audit event, no SQL-level PREPARE/DEALLOCATE
        to follow (`client_data` then forwards its executions as they come, without `_execute`)."""
        return (
            decision.applied is Action.ALLOW
            and not decision.limits
            and not decision.dry_limits
            and not self._wants(decision)
            and all(s.prepare_name is None and s.deallocate_name is None for s in statements)
        )

    def remember_prepared(
        self, stmt_id: int, sql: str, statements: tuple[StatementInfo, ...]
    ) -> None:
        """The server's STMT_PREPARE_OK named a statement we let through."""
        self.prepared[stmt_id] = (sql, statements, self.state)
        self.decisions.pop(stmt_id, None)

    def _limit(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        seq: int,
    ) -> str | None:
        """Take tokens: the outcome ("allow" or "delay"), or None when rejected (answered)."""
        if not decision.limits:
            return "allow"
        granted = self.ctx.limiter.take(decision.limits, now)
        if not granted.granted:
            assert granted.exceeded is not None
            text = limit_text(granted.exceeded)
            info = statements[0] if statements else None
            self.record(Run(now, time.monotonic(), sql, info, decision, "reject"), None, "42000")
            self.answer(my.err_packet(seq + 1, my.ER_USER_LIMIT_REACHED, DENIED_STATE, text))
            return None
        if granted.delay > 0:
            self.wait = granted.delay
            return "delay"
        return "allow"

    def _deny(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        seq: int,
    ) -> None:
        engine, peer = self.ctx.decider.engine, self.ctx.peer
        info = next(
            (s for s in statements if engine.decide(peer, s, now).applied is Action.DENY),
            statements[0] if statements else None,
        )
        self.record(Run(now, time.monotonic(), sql, info, decision, "deny"), None, DENIED_STATE)
        text = deny_text(decision, info)
        self.answer(my.err_packet(seq + 1, my.ER_TABLEACCESS_DENIED, DENIED_STATE, text))

    # -- deciding ---------------------------------------------------------------------------

    def _decide_text(
        self, raw: bytes, now: float
    ) -> tuple[str, tuple[StatementInfo, ...], Decision]:
        ctx = self.ctx
        try:
            if self.encoding is None and not raw.isascii():
                raise UnicodeError(_UNDECODABLE)
            sql = raw.decode(self.encoding or "ascii")
        except UnicodeError as exc:
            bad = (parse_error(f"cannot decode the statement: {exc}"),)
            return raw.decode("latin-1"), bad, ctx.decider.engine.decide_all(ctx.peer, bad, now)
        statements, decision = ctx.decider.decide(sql, now, self.state)
        if '"' not in sql and "\\" not in sql:  # read one way only (`_other_readings`)
            return (sql, *self._resolve(statements, decision, now))
        for state in self._other_readings(sql, statements):
            other, d = ctx.decider.decide(sql, now, state)
            if _SEVERITY.get(d.applied, 0) > _SEVERITY.get(decision.applied, 0):
                statements, decision = other, d
        return (sql, *self._resolve(statements, decision, now))

    def _other_readings(
        self, sql: str, statements: tuple[StatementInfo, ...]
    ) -> list[SessionState]:
        """Session states the server might read `sql` in besides the one we track.

        ANSI_QUOTES is not reported by the server, so a text with a double quote is read
        both ways. NO_BACKSLASH_ESCAPES is (in every OK and EOF), but a statement earlier in
        the same string, or one still unanswered, may change it: then a text with a
        backslash is read both ways too. The stricter decision wins (docs/decisions/0006).
        """
        st = self.state
        ansi = (st.ansi_quotes, not st.ansi_quotes) if '"' in sql else (st.ansi_quotes,)
        unsettled = "\\" in sql and (self.pending or len(statements) > 1)
        nbe = (st.no_backslash_escapes, not st.no_backslash_escapes) if unsettled else None
        out = [
            _state(st.server_version, st.mariadb, a, n)
            for a in ansi
            for n in (nbe or (st.no_backslash_escapes,))
        ]
        return [s for s in out if s is not st]

    def _watch_charset(self, sql: str, statements: tuple[StatementInfo, ...]) -> None:
        """SET NAMES x: decode later statements as x; any other character-set change we
        cannot follow: inspect only ASCII texts from now on (fail closed)."""
        if not any("SET" in s.verbs for s in statements) or not _CHARSET_WORDS.search(sql):
            return
        names = _SET_NAMES.findall(sql)
        codecs = {my.charset_codec(n) for n in names}
        if len(statements) == 1 and len(names) == 1 and None not in codecs:
            self.encoding = codecs.pop()
        else:
            self.encoding = None

    def _reset_statements(self) -> None:
        self.prepared.clear()
        self.decisions.clear()
        self._sql_prepared.clear()

    # -- server -> app (see mysql_responses) ---------------------------------------------------

    def _connection_data(self, data: bytes) -> None:
        """`server_data` (mysql_responses) before the command phase: the greeting, and
        authentication renumbered after the sidecar's SSLRequest, before the responses."""
        if self._phase == GREETING:
            data = self._greeting(data)
            if self._phase == GREETING:
                return
        if self._shift:  # authentication after the sidecar's SSLRequest: renumbered
            data = self._renumbered(data)
        self.responses(data)

    def greeted(self, greeting: my.Greeting, no_backslash_escapes: bool) -> None:
        g, nbe = greeting, no_backslash_escapes
        self.state = _state(g.version or 101100, g.mariadb, False, nbe)
        self._nbe = my.SERVER_STATUS_NO_BACKSLASH_ESCAPES if nbe else 0

    def server_status(self, status: int) -> None:
        nbe = bool(status & my.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
        st = self.state
        if nbe != st.no_backslash_escapes:
            self.state = _state(st.server_version, st.mariadb, st.ansi_quotes, nbe)

    def _fail(self, reason: str) -> None:
        self._close_with(self._cseq, my.ER_NET_PACKETS_OUT_OF_ORDER, "08S01", reason)


def session_class() -> type[MySqlSession]:
    """The MySqlSession class the driver uses: over the compiled response FIFO
    (`sidecar._mysql_responses_c`) when that build is current, else this one."""
    module = builds.current(rs.__file__, rs.COMPILED_MODULE)
    if module is None:
        return MySqlSession
    return over_responses(module.Responses)


@functools.cache
def over_responses(compiled: type) -> type[MySqlSession]:
    """MySqlSession with the methods it takes from `mysql_responses.Responses` taken from
    `compiled`, that class's compiled build instead: the same code, and nothing else
    changes (the session's and the handshake's own methods, their hooks included, stay)."""
    pure = vars(rs.Responses)
    methods = {
        name: method
        for name, method in vars(compiled).items()
        if callable(method)
        and not name.startswith("__")
        and name in pure
        and getattr(MySqlSession, name) is pure[name]
    }
    namespace = {"__module__": compiled.__module__, "__doc__": MySqlSession.__doc__, **methods}
    return type("MySqlSession", (MySqlSession,), namespace)

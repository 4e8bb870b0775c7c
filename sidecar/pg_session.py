"""One PostgreSQL session through the sidecar: the sans-I/O state machine.

The driver (`sidecar/server.py`) feeds bytes from the app to `client_data` and bytes from the
server to `server_data`, then writes out `to_server` and `to_client`. In between, every
statement is decided:

- each statement of a simple Query; the first one denied is replaced, from its first byte
  to the end of the string, by a statement that makes the server raise 42501 (so the
  statements before it run, the rest do not, and an explicit transaction is aborted: all as
  if the server itself had refused it);
- every Parse (deny only: limits count executions), and every Execute, again, against the
  statement its portal was bound to (a time window may have opened since Parse). A denied
  Parse or Execute is replaced by Parse/Bind/Execute of the raising statement; the
  ParseComplete and BindComplete those produce are swallowed, and the app's messages are
  dropped until Sync, as the server drops them after an error;
- SQL-level PREPARE/EXECUTE: the prepared statement is remembered per session and EXECUTE
  is decided as the statement it runs;
- a fast-path FunctionCall is an opaque CALL.

Responses are matched to requests with one FIFO of tracked messages (Parse, Bind, Execute or
simple-query statement, Sync), which also yields each statement's duration, rows and error
code for its audit event.
"""

from __future__ import annotations

import time
from collections import deque

from policies.engine import Decision
from policies.spec import Action
from policies.sql.inspect import POSTGRES, SessionState
from policies.sql.model import StatementInfo, parse_error
from sidecar.protocols import postgres as pg
from sidecar.session_common import RouteContext, Run, SessionAudit, deny_text, limit_text

__all__ = ["DENIED", "LIMITED", "PROTOCOL_VIOLATION", "PgSession", "RouteContext"]

DENIED = "42501"  # insufficient_privilege: what the server says for a missing GRANT
LIMITED = "53400"  # configuration_limit_exceeded
PROTOCOL_VIOLATION = "08P01"

# Tracked requests, in the order the server answers them.
_PARSE, _PARSE_SWALLOW, _BIND, _BIND_SWALLOW, _EXEC, _SYNC = range(6)

_STARTUP, _AUTH, _READY = range(3)
_OPAQUE_CALL = StatementInfo(verb="CALL", verbs=frozenset({"CALL"}), opaque=True)
_UNKNOWN_PORTAL = StatementInfo(verb="EXECUTE", verbs=frozenset({"EXECUTE"}), opaque=True)
_PARSE_MEMO_SIZE = 256
_UNSETTLED = (
    "contains a backslash and was sent before the server answered earlier statements that "
    "may change how it reads backslashes (standard_conforming_strings, client_encoding)"
)
# PostgreSQL client encodings -> Python codecs. SQL_ASCII passes bytes through unchanged,
# which latin-1 reproduces one to one. An encoding missing here is not guessed at: its
# statements are treated as unparseable (see _decide_text).
_PG_ENCODINGS = {
    "UTF8": "utf-8",
    "SQL_ASCII": "latin-1",
    **{
        f"LATIN{n}": f"iso8859_{p}"
        for n, p in zip(range(1, 11), (1, 2, 3, 4, 9, 10, 13, 14, 15, 16), strict=True)
    },
    **{f"ISO_8859_{n}": f"iso8859_{n}" for n in (5, 6, 7, 8)},
    **{
        f"WIN{n}": f"cp{n}"
        for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258)
    },
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "EUC_JP": "euc_jp",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "EUC_JIS_2004": "euc_jis_2004",
    "SJIS": "shift_jis",
    "SHIFT_JIS_2004": "shift_jis_2004",
    "BIG5": "big5",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "UHC": "cp949",
    "JOHAB": "johab",
}
_UNKNOWN_ENCODING = "unknown"


class PgSession(SessionAudit):
    """The protocol state machine of one app connection and its server connection."""

    protocol = "postgres"
    deallocate_all = "*"  # DEALLOCATE ALL

    def __init__(self, ctx: RouteContext, session_id: str) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.closing: str | None = None  # set: close both sides once output is flushed
        self.startup_sent = False  # the StartupMessage is in to_server: connect upstream
        self.cancel_packet: bytes | None = None  # a CancelRequest for the driver to route
        self.backend_key: bytes | None = None  # BackendKeyData body: pid and secret key
        self.params: dict[str, str] = {}
        self.wait = 0.0  # > 0: the driver holds client input this long, then release()
        self.transaction = b"I"
        self._held: bytes | None = None
        self._cin = bytearray()
        self._sin = bytearray()
        self._phase = _STARTUP
        self._pending: deque[tuple[int, Run | None]] = deque()
        self._discarding = False  # after a denied Parse/Execute: drop until Sync
        self._statements: dict[bytes, tuple[str, tuple[StatementInfo, ...]]] = {}
        # Per Parse text: (engine, minute or -1, sql, statements, decision), reset when the
        # session's reading of text changes (standard_conforming_strings, client_encoding).
        self._parsed: dict[bytes, tuple[object, int, str, tuple[StatementInfo, ...], Decision]] = {}
        # Per prepared statement: (engine, minute or -1, statements, decision) last decided.
        self._decisions: dict[bytes, tuple[object, int, tuple[StatementInfo, ...], Decision]] = {}
        self._portals: dict[bytes, bytes] = {}
        self._sql_prepared: dict[str, StatementInfo] = {}
        self.state: SessionState = POSTGRES
        self.encoding = "utf-8"

    # -- app -> server ----------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self._cin += data
        try:
            if self._phase == _STARTUP:
                self._startup()
            if self._phase != _STARTUP:
                self._client_messages()
        except pg.ProtocolError as exc:
            self._fail(f"invalid message from the client: {exc}")

    def release(self) -> None:
        """The delay of a limited statement is over: send it and go on."""
        held, self._held, self.wait = self._held, None, 0.0
        if held:
            self.to_server += held
        self.client_data(b"")

    def _startup(self) -> None:
        buf = self._cin
        while self._phase == _STARTUP and self.closing is None:
            length = pg.startup_length(buf)
            if length is None or len(buf) < length:
                return
            packet = bytes(buf[:length])
            del buf[:length]
            code = pg.startup_code(packet)
            if code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST):
                self.to_client += b"N"  # the app talks plaintext to its local sidecar
            elif code == pg.CANCEL_REQUEST:
                self.cancel_packet = packet
                self.closing = "cancel request"
            elif code >> 16 == pg.PROTOCOL_MAJOR_3:
                self.params = pg.startup_params(packet)
                self.to_server += packet
                self.startup_sent = True
                self._phase = _AUTH
            else:
                major, minor = code >> 16, code & 0xFFFF
                self._fail(f"unsupported frontend protocol {major}.{minor}")

    def _client_messages(self) -> None:
        buf = self._cin
        pos = fwd = 0
        out = self.to_server
        limit = self.ctx.max_message
        # On a malformed message, what came before it is still forwarded, as it would
        # have been had it arrived in an earlier read: the output must not depend on how
        # the input was split.
        try:
            size = len(buf)
            unpack = pg.unpack_int32
            while self.wait == 0.0 and self.closing is None:
                if size - pos < 5:
                    break
                kind = buf[pos]
                length = unpack(buf, pos + 1)[0]
                if length < 4 or length > limit:
                    raise pg.bad_length(kind, length)
                end = pos + 1 + length
                if end > size:
                    break
                if self._discarding:
                    out += buf[fwd:pos]
                    fwd = end
                    if kind == 0x53:  # Sync ends the error state
                        self._discarding = False
                        out += buf[pos:end]
                        self._pending.append((_SYNC, None))
                elif kind == 0x51:  # Q
                    out += buf[fwd:pos]
                    fwd = end
                    self._query(bytes(buf[pos:end]))
                elif kind == 0x50:  # Parse
                    replacement = self._parse(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                elif kind == 0x42:  # Bind
                    portal, statement = pg.bind_fields(buf, pos + 5, end)
                    self._portals[portal] = statement
                    self._pending.append((_BIND, None))
                elif kind == 0x45:  # Execute
                    out += buf[fwd:pos]
                    fwd = end
                    self._execute(buf, pos, end)
                elif kind == 0x53:  # Sync
                    self._pending.append((_SYNC, None))
                elif kind == 0x43:  # Close
                    self._close(buf, pos, end)
                elif kind == 0x46:  # FunctionCall
                    out += buf[fwd:pos]
                    fwd = end
                    self._function_call(bytes(buf[pos:end]))
                elif kind == 0x58:  # Terminate
                    self.closing = "client terminated"
                pos = end
        finally:
            out += buf[fwd:pos]
            del buf[:pos]

    def _query(self, message: bytes) -> None:
        raw = message[5:-1]
        ctx = self.ctx
        now = ctx.clock()
        sql, statements, decision = self._decide_text(raw, now)
        if decision.applied is Action.DENY:
            self._deny_query(raw, sql, statements, now)
            return
        outcome = "allow"
        if decision.limits:
            granted = ctx.limiter.take(decision.limits, now)
            if not granted.granted:
                assert granted.exceeded is not None
                self._reject(sql, statements, decision, now, limit_text(granted.exceeded))
                return
            if granted.delay > 0:
                outcome = "delay"
                self.wait = granted.delay
        self._remember_sql_prepared(statements)
        self._track_statements(sql, statements, decision, now, outcome)
        self._pending.append((_SYNC, None))
        if self.wait:
            self._held = message
        else:
            self.to_server += message

    def _deny_query(
        self, raw: bytes, sql: str, statements: tuple[StatementInfo, ...], now: float
    ) -> None:
        """Run the statements before the first denied one, then make the server raise."""
        engine, peer = self.ctx.decider.engine, self.ctx.peer
        prefix = b""
        cut = 0
        denied_decision: Decision | None = None
        for i, info in enumerate(statements):
            d = engine.decide(peer, info, now)
            if d.applied is Action.DENY or info.span is None:
                denied_decision, cut = d, i
                break
        if denied_decision is None or denied_decision.applied is not Action.DENY:
            denied_decision = engine.decide_all(peer, statements, now)
            cut = 0
        if cut > 0:
            span = statements[cut].span
            assert span is not None
            prefix = self._prefix_bytes(raw, sql, span[0])
            allowed = statements[:cut]
            self._track_statements(
                sql, allowed, engine.decide_all(peer, allowed, now), now, "allow"
            )
        text = deny_text(denied_decision, statements[cut] if statements else None)
        raiser = pg.raise_statement(DENIED, text, detail=denied_decision.reason)
        run = Run(
            now,
            time.monotonic(),
            sql,
            statements[cut] if statements else None,
            denied_decision,
            "deny",
        )
        self._pending.append((_EXEC, run))
        self._pending.append((_SYNC, None))
        self.to_server += pg.query(prefix + self._encode(raiser))

    def _reject(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        text: str,
    ) -> None:
        run = Run(
            now, time.monotonic(), sql, statements[0] if statements else None, decision, "reject"
        )
        self._pending.append((_EXEC, run))
        self._pending.append((_SYNC, None))
        self.to_server += pg.query(self._encode(pg.raise_statement(LIMITED, text)))

    def _parse(self, buf: bytearray, pos: int, end: int) -> bytes | None:
        name, raw = pg.parse_fields(buf, pos + 5, end)
        now = self.ctx.clock()
        engine = self.ctx.decider.engine
        minute = int(now // 60)
        memo = self._parsed.get(raw)
        if memo is not None and memo[0] is engine and (memo[1] < 0 or memo[1] == minute):
            # Apps re-Parse the same text (unnamed statements): skip decoding and the cache.
            _, _, sql, statements, decision = memo
        else:
            sql, statements, decision = self._decide_text(raw, now)
            unsettled = bool(self._pending) and b"\\" in raw
            if not unsettled and not any(s.execute_name for s in statements):
                if len(self._parsed) >= _PARSE_MEMO_SIZE:
                    self._parsed.clear()
                timeless = engine.view(self.ctx.peer).timeless
                self._parsed[raw] = (engine, -1 if timeless else minute, sql, statements, decision)
        if decision.applied is Action.DENY:
            self._statements.pop(name, None)
            self._decisions.pop(name, None)
            info = statements[0] if statements else None
            run = Run(now, time.monotonic(), sql, info, decision, "deny")
            return self._inject(deny_text(decision, info), DENIED, run, decision.reason)
        self._statements[name] = (sql, statements)
        memo = self._parsed.get(raw)
        if memo is None:  # depends on the session's PREPAREs, or text not settled
            self._decisions.pop(name, None)
        else:  # the Execute that usually follows reuses this decision (same engine, minute)
            self._decisions[name] = (engine, memo[1], statements, decision)
        self._pending.append((_PARSE, None))
        return None

    def _execute(self, buf: bytearray, pos: int, end: int) -> None:
        nul = buf.find(b"\0", pos + 5, end)
        if nul < 0:
            raise pg.ProtocolError("string field is not NUL-terminated")
        ctx = self.ctx
        now = ctx.clock()
        name = self._portals.get(bytes(buf[pos + 5 : nul]))
        sql, statements, decision = self._decide_statement(name, now)
        info = statements[0] if statements else None
        if decision.applied is Action.DENY:
            run = Run(now, time.monotonic(), sql, info, decision, "deny")
            self.to_server += self._inject(deny_text(decision, info), DENIED, run, decision.reason)
            return
        outcome = "allow"
        if decision.limits:
            granted = ctx.limiter.take(decision.limits, now)
            if not granted.granted:
                assert granted.exceeded is not None
                run = Run(now, time.monotonic(), sql, info, decision, "reject")
                text = limit_text(granted.exceeded)
                self.to_server += self._inject(text, LIMITED, run, None)
                return
            if granted.delay > 0:
                outcome = "delay"
                self.wait = granted.delay
        if info is not None and (info.prepare_name is not None or info.deallocate_name is not None):
            self._remember_sql_prepared(statements)
        self._pending.append((_EXEC, self._run(sql, info, decision, now, outcome, shape=None)))
        if self.wait:
            self._held = bytes(buf[pos:end])
        else:
            self.to_server += buf[pos:end]

    def _decide_statement(
        self, name: bytes | None, now: float
    ) -> tuple[str, tuple[StatementInfo, ...], Decision]:
        """Decide what a portal runs. Repeated executions of one prepared statement reuse
        the decision while the policy set is the same and, with time windows, the minute."""
        ctx = self.ctx
        known = self._statements.get(name) if name is not None else None
        if name is None or known is None:  # a portal we did not see bound: decide it opaque
            return "", (_UNKNOWN_PORTAL,), ctx.decider.engine.decide(ctx.peer, _UNKNOWN_PORTAL, now)
        sql, statements = known
        engine = ctx.decider.engine
        minute = int(now // 60)
        cached = self._decisions.get(name)
        if cached is not None and cached[0] is engine and (cached[1] < 0 or cached[1] == minute):
            return sql, cached[2], cached[3]
        _, decision = ctx.decider.decide(sql, now, self.state)
        resolved, decision = self._resolve(statements, decision, now)
        if resolved is statements:  # not an EXECUTE of a session-prepared statement
            timeless = engine.view(ctx.peer).timeless
            self._decisions[name] = (engine, -1 if timeless else minute, statements, decision)
        return sql, resolved, decision

    def _inject(self, text: str, code: str, run: Run, detail: str | None) -> bytes:
        """Parse/Bind/Execute of a raising statement in place of the app's message; the app's
        following messages are dropped until its Sync, as the server would drop them."""
        self._discarding = True
        self._pending.append((_PARSE_SWALLOW, None))
        self._pending.append((_BIND_SWALLOW, None))
        self._pending.append((_EXEC, run))
        raiser = self._encode(pg.raise_statement(code, text, detail=detail))
        return pg.parse(b"", raiser) + pg.bind(b"", b"") + pg.execute(b"")

    def _close(self, buf: bytearray, pos: int, end: int) -> None:
        if end - pos < 7:
            raise pg.ProtocolError("Close message too short")
        name, _ = pg.cstring(buf, pos + 6, end)
        if buf[pos + 5] == 0x53:  # 'S'tatement
            self._statements.pop(name, None)
            self._decisions.pop(name, None)
        else:
            self._portals.pop(name, None)

    def _function_call(self, message: bytes) -> None:
        now = self.ctx.clock()
        decision = self.ctx.decider.engine.decide(self.ctx.peer, _OPAQUE_CALL, now)
        if decision.applied is Action.DENY:
            self._deny_query(b"", "<function call>", (_OPAQUE_CALL,), now)
            return
        self._pending.append(
            (_EXEC, self._run("<function call>", _OPAQUE_CALL, decision, now, "allow"))
        )
        self._pending.append((_SYNC, None))
        self.to_server += message

    # -- deciding ---------------------------------------------------------------------------

    def _decide_text(
        self, raw: bytes, now: float
    ) -> tuple[str, tuple[StatementInfo, ...], Decision]:
        ctx = self.ctx
        try:
            sql = raw.decode(self.encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            bad = (parse_error(f"cannot decode the statement as {self.encoding}: {exc}"),)
            return raw.decode("latin-1"), bad, ctx.decider.engine.decide_all(ctx.peer, bad, now)
        if self._pending and b"\\" in raw:
            # Earlier statements are still unanswered and may change how the server reads
            # backslashes (standard_conforming_strings, client_encoding): fail closed.
            unsure = (parse_error(_UNSETTLED),)
            return sql, unsure, ctx.decider.engine.decide_all(ctx.peer, unsure, now)
        statements, decision = ctx.decider.decide(sql, now, self.state)
        statements, decision = self._resolve(statements, decision, now)
        return sql, statements, decision

    # -- server -> app ----------------------------------------------------------------------

    def server_data(self, data: bytes) -> None:
        buf = self._sin
        buf += data
        pos = fwd = 0
        out = self.to_client
        pending = self._pending
        limit = self.ctx.max_message
        try:
            size = len(buf)
            unpack = pg.unpack_int32
            while self.closing is None:  # closing: nothing more goes to the app
                if size - pos < 5:
                    break
                kind = buf[pos]
                length = unpack(buf, pos + 1)[0]
                if length < 4 or length > limit:
                    raise pg.bad_length(kind, length)
                end = pos + 1 + length
                if end > size:
                    break
                if kind == 0x44:  # DataRow: the bulk of a result, nothing to track
                    pos = end
                    continue
                if kind == 0x31 or kind == 0x32:  # ParseComplete, BindComplete
                    if pending:
                        tracked = pending[0][0]
                        if tracked in (_PARSE_SWALLOW, _BIND_SWALLOW):
                            out += buf[fwd:pos]
                            fwd = end
                            pending.popleft()
                        elif tracked in (_PARSE, _BIND):
                            pending.popleft()
                elif kind == 0x43 or kind == 0x49 or kind == 0x73:  # Complete, Empty, Suspended
                    if pending and pending[0][0] == _EXEC:
                        run = pending.popleft()[1]
                        if run is not None:
                            rows = (
                                pg.command_rows(bytes(buf[pos + 5 : end - 1]))
                                if kind == 0x43
                                else None
                            )
                            self.record(run, rows, None)
                elif kind == 0x45:  # ErrorResponse
                    replacement = self._server_error(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                elif kind == 0x5A:  # ReadyForQuery
                    self.transaction = bytes(buf[pos + 5 : pos + 6])
                    self._ready()
                elif kind == 0x53:  # ParameterStatus
                    self._parameter(buf, pos, end)
                elif kind == 0x4B:  # BackendKeyData
                    self.backend_key = bytes(buf[pos + 5 : end])
                elif kind == 0x52 and self._phase == _AUTH:  # Authentication*
                    replacement = _without_channel_binding(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                pos = end
        except pg.ProtocolError as exc:
            out += buf[fwd:pos]
            self._fail(f"invalid message from the server: {exc}")
            return
        out += buf[fwd:pos]
        del buf[:pos]

    def _server_error(self, buf: bytearray, pos: int, end: int) -> bytes | None:
        """Account for an error; returns a replacement for our own raised errors, which
        drop the server's CONTEXT line (it would point at the raising statement)."""
        pending = self._pending
        if not pending:
            return None
        fields = pg.error_fields(buf, pos + 5, end)
        replacement = None
        if pending[0][0] == _EXEC:
            run = pending.popleft()[1]
            if run is not None:
                self.record(run, None, fields.get("C"))
                if run.outcome in ("deny", "reject") and "W" in fields:
                    replacement = pg.error_message({k: v for k, v in fields.items() if k != "W"})
        # The server skips everything up to the next Sync (or ends the simple query).
        while pending and pending[0][0] != _SYNC:
            pending.popleft()
        return replacement

    def _ready(self) -> None:
        if self._phase == _AUTH:
            self._phase = _READY
        pending = self._pending
        while pending:
            kind, run = pending.popleft()
            if kind == _SYNC:
                break
            if run is not None:  # answered by nothing: it did not run
                self.record(run, None, "skipped")

    def _parameter(self, buf: bytearray, pos: int, end: int) -> None:
        name, at = pg.cstring(buf, pos + 5, end)
        value, _ = pg.cstring(buf, at, end)
        key, val = name.decode("ascii", "replace"), value.decode("utf-8", "replace")
        self.params[key] = val
        if key == "standard_conforming_strings":
            self.state = SessionState(standard_conforming_strings=val == "on")
            self._parsed.clear()
        elif key == "client_encoding":
            self.encoding = _python_encoding(val)
            self._parsed.clear()

    # -- audit ------------------------------------------------------------------------------

    def _track_statements(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        outcome: str,
    ) -> None:
        if not statements:
            return
        if len(statements) == 1:
            shape = self.ctx.decider.last_shape
            run = self._run(sql, statements[0], decision, now, outcome, shape=shape)
            self._pending.append((_EXEC, run))
            return
        for run in self._each_statement(sql, statements, decision, now, outcome):
            self._pending.append((_EXEC, run))

    # -- helpers ----------------------------------------------------------------------------

    def _encode(self, text: str) -> bytes:
        try:
            return text.encode(self.encoding, "replace")
        except LookupError:  # unknown client encoding: our own texts are ASCII-safe
            return text.encode("ascii", "replace")

    def _prefix_bytes(self, raw: bytes, sql: str, utf8_offset: int) -> bytes:
        """The bytes of `raw` before the statement at `utf8_offset` (a span start)."""
        if self.encoding == "utf-8":
            return raw[:utf8_offset]
        chars = len(sql.encode()[:utf8_offset].decode("utf-8", "ignore"))
        return self._encode(sql[:chars])

    def _fail(self, reason: str) -> None:
        self.to_client += pg.error_response(
            PROTOCOL_VIOLATION, f"sluice: {reason}", severity="FATAL"
        )
        self.closing = reason


def _without_channel_binding(buf: bytearray, pos: int, end: int) -> bytes | None:
    """An AuthenticationSASL without the -PLUS mechanisms, when it offers any. They bind
    SCRAM to the server's TLS session, which the app (plaintext to its sidecar) is not in;
    and libpq refuses a server that offers one over a non-SSL connection."""
    if pg.auth_code(buf, pos + 5, end) != pg.AUTH_SASL:
        return None
    offered = pg.sasl_mechanisms(buf, pos + 9, end)
    kept = [m for m in offered if not m.endswith(b"-PLUS")]
    if not kept or len(kept) == len(offered):
        return None
    return pg.authentication_sasl(kept)


def _python_encoding(name: str) -> str:
    """The Python codec for a PostgreSQL client_encoding, or a name no codec has (every
    decode then fails, and statements are treated as unparseable: never a guess)."""
    return _PG_ENCODINGS.get(name.upper().replace("-", "_"), _UNKNOWN_ENCODING)

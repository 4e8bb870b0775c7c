"""One PostgreSQL session through the sidecar: the sans-I/O state machine.

The driver (`sidecar/connection.py`) feeds bytes from the app to `client_pass` and bytes from
the server to `server_pass`; a read they return goes on as it came, else it writes out
`to_server` and `to_client` (`client_data`/`server_data` always leave the output there, for
the sans-I/O callers). In between, every
statement is decided (the deciding methods live in `sidecar/pg_deciding.py`; this module
frames both directions, matches answers to requests and keeps the session's state):

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

Both framing loops run for every message of every transaction, so they are written for the
common case: a message that passes unchanged costs its header and a table lookup (Bind and
the server's answers a dict or deque operation more), and runs of them are forwarded as one
slice. A Parse of a text already decided in this session costs one comparison (the same
message as the last one) or one dict lookup, and an Execute of a statement whose last
decision was a plain allow (nothing to limit, audit or count) a lookup of its portal; both
then check that the decision still holds (same policy set and, with time windows, the same
minute; for a text with a backslash, no answer outstanding). Everything else leaves the
loop for a method of `PgDeciding`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from policies.spec import Action
from policies.sql.inspect import POSTGRES, SessionState, session_state
from policies.sql.model import StatementInfo
from sidecar import builds
from sidecar.pg_deciding import (
    BIND,
    BIND_SWALLOW,
    BOUND,
    DENIED,
    EXEC,
    EXECUTED,
    LIMITED,
    PARSE,
    PARSE_SWALLOW,
    PARSED,
    SYNC,
    SYNCED,
    PgDeciding,
    Prepared,
    Tracked,
)
from sidecar.protocols import postgres as pg
from sidecar.session_common import RouteContext, Run

_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)

try:  # compiled by Cython (setup.py): the annotations below give C types; else inert
    import cython

    _COMPILED: bool = cython.compiled
except ModuleNotFoundError:  # Cython is a build dependency: without it, its decorators are inert
    _COMPILED = False

    class cython:  # type: ignore[no-redef]
        """The decorators this module takes from Cython's pure-Python mode, as no-ops."""

        compiled = False

        @staticmethod
        def cfunc(function: _F) -> _F:
            return function

        @staticmethod
        def cclass(cls: _C) -> _C:
            return cls

        @staticmethod
        def declare(*_type: object, **_visibility: object) -> None:
            return None

        double = float
        Py_ssize_t = int
        bint = bool


__all__ = [
    "DENIED",
    "LIMITED",
    "PROTOCOL_VIOLATION",
    "PgSession",
    "RouteContext",
    "session_class",
]

PROTOCOL_VIOLATION = "08P01"


def _kinds(codes: dict[bytes, int]) -> bytes:
    """Message type byte -> what a framing loop does with it; 0: pass it on unchanged."""
    table = bytearray(256)
    for kind, code in codes.items():
        table[kind[0]] = code
    return bytes(table)


_C_BIND, _C_EXECUTE, _C_SYNC, _C_PARSE, _C_QUERY, _C_CLOSE, _C_CALL, _C_TERMINATE = range(1, 9)
_CLIENT_KINDS = _kinds(
    {
        b"B": _C_BIND,
        b"E": _C_EXECUTE,
        b"S": _C_SYNC,
        b"P": _C_PARSE,
        b"Q": _C_QUERY,
        b"C": _C_CLOSE,
        b"F": _C_CALL,  # FunctionCall
        b"X": _C_TERMINATE,
    }
)
_S_DONE, _S_READY, _S_PARSED, _S_ERROR, _S_PARAMETER, _S_KEY, _S_AUTH = range(1, 8)
_SERVER_KINDS = _kinds(
    {
        b"C": _S_DONE,  # CommandComplete
        b"I": _S_DONE,  # EmptyQueryResponse
        b"s": _S_DONE,  # PortalSuspended
        b"Z": _S_READY,
        b"1": _S_PARSED,  # ParseComplete
        b"2": _S_PARSED,  # BindComplete
        b"E": _S_ERROR,
        b"S": _S_PARAMETER,
        b"K": _S_KEY,  # BackendKeyData
        b"R": _S_AUTH,
    }
)
_BYTES = tuple(bytes((k,)) for k in range(256))  # one-byte values without allocating


@cython.cfunc  # compiled: a C loop, called without Python's call protocol
def _nul(buf: bytes, at: cython.Py_ssize_t, end: cython.Py_ssize_t) -> cython.Py_ssize_t:
    """Where the first NUL byte of `buf[at:end]` is; -1: none. (Compiled, a loop over the
    bytes: cheaper than `bytes.find`'s argument parsing for the short names of Bind and
    Execute. `end` is never past the buffer: a framing loop checked the message's length.)"""
    if not cython.compiled:
        return buf.find(0, at, end)
    while at < end:
        if not buf[at]:
            return at
        at += 1
    return -1


_STARTUP, _AUTH, _READY = range(3)


@cython.cclass
class _PgWire:
    """What the framing loops read and write per message, and the loops themselves. Compiled,
    this is an extension type: its fields are C struct members (a read costs a few
    instructions, where an attribute of a Python object costs about 250) and its methods
    reach them directly. `PgSession` (a Python class over it and `PgDeciding`) holds the
    rest of the state and the methods the loops leave for; in pure Python both are plain
    classes. The fields are public: the deciding half, the driver and the tests read them."""

    ctx = cython.declare(object, visibility="public")
    to_client = cython.declare(bytearray, visibility="public")
    to_server = cython.declare(bytearray, visibility="public")
    closing = cython.declare(object, visibility="public")  # str | None
    wait = cython.declare(cython.double, visibility="public")
    transaction = cython.declare(object, visibility="public")  # bytes
    _cin = cython.declare(bytearray, visibility="public")
    _sin = cython.declare(bytearray, visibility="public")
    _phase = cython.declare(cython.Py_ssize_t, visibility="public")
    _pending = cython.declare(object, visibility="public")  # deque[Tracked]
    _discarding = cython.declare(cython.bint, visibility="public")
    _statements = cython.declare(dict, visibility="public")
    _portals = cython.declare(dict, visibility="public")
    _parsed = cython.declare(dict, visibility="public")
    backend_key = cython.declare(object, visibility="public")  # bytes | None
    _last_parse = cython.declare(object, visibility="public")

    # -- app -> server ----------------------------------------------------------------------

    def client_data(self, data: bytes | bytearray) -> None:
        """Frame and decide `data` from the app; what goes on to the server is then in
        `to_server`, what goes back to the app in `to_client`."""
        passed = self.client_pass(data)
        if passed is not None:
            self.to_server += passed

    def client_pass(self, data: bytes | bytearray) -> bytes | None:
        """`client_data` for the driver: when all of `data` goes on to the server unchanged
        and nothing else is waiting to go either way, returns it (as `bytes`) instead of
        copying it into `to_server`, and the driver writes it straight to the server; else
        None, and the output is in `to_server` and `to_client` as after `client_data`."""
        cin = self._cin
        if self._phase == _STARTUP:
            cin += data
            data = b""
            try:
                self._startup()
            except pg.ProtocolError as exc:
                self._fail(f"invalid message from the client: {exc}")
            if self._phase == _STARTUP or self.closing is not None:
                return None
        buf: bytes
        if cin:  # the rest of a message that came in pieces
            joined = pg.joined(cin, data, self.ctx.max_message)
            if joined is None:
                return None
            buf = joined
        else:  # the usual case: frame the read itself, keep only an incomplete tail
            buf = data if type(data) is bytes else bytes(data)
        size: cython.Py_ssize_t = len(buf)
        pos: cython.Py_ssize_t = 0  # bytes before `fwd` are dealt with; fwd..pos go on
        fwd: cython.Py_ssize_t = 0  # unchanged
        end: cython.Py_ssize_t
        kind: cython.Py_ssize_t
        length: cython.Py_ssize_t
        code: cython.Py_ssize_t
        nul: cython.Py_ssize_t
        at: cython.Py_ssize_t
        limit: cython.Py_ssize_t
        minute: cython.Py_ssize_t = -1  # read from the clock once, when a timed decision
        now: cython.double  # is reused
        kinds: bytes = _CLIENT_KINDS
        portals: dict[bytes, Prepared | None] = self._portals
        statements: dict[bytes, Prepared] = self._statements
        compiled = _COMPILED
        done = False  # the loop ended without an exception
        out = self.to_server
        ctx = self.ctx
        # On a malformed message, what came before it is still forwarded, as it would
        # have been had it arrived in an earlier read: the output must not depend on how
        # the input was split.
        try:
            if self.wait or self.closing is not None:
                return None
            limit = ctx.max_message
            header = pg.unpack_header
            pending = self._pending
            engine = ctx.decider.engine
            runless = not ctx.record_all  # a plain allow then needs no audit run
            discarding = self._discarding
            while size - pos >= 5:
                if compiled:
                    kind = buf[pos]
                    length = buf[pos + 1] << 24 | buf[pos + 2] << 16 | buf[pos + 3] << 8
                    length |= buf[pos + 4]
                    if length > 0x7FFFFFFF:  # the field is signed
                        length -= 0x100000000
                else:
                    kind, length = header(buf, pos)
                if length < 4 or length > limit:
                    raise pg.bad_length(kind, length)
                end = pos + 1 + length
                if end > size:
                    break
                if discarding:
                    out += buf[fwd:pos]
                    fwd = end
                    if kind == 0x53:  # Sync ends the error state
                        discarding = self._discarding = False
                        out += buf[pos:end]
                        pending.append(SYNCED)
                    pos = end
                    continue
                code = kinds[kind]
                if not code:  # Describe, Flush, CopyData/Done/Fail, password messages
                    pass
                elif code == _C_BIND:
                    # Unnamed portals and statements are the rule: test a byte before
                    # searching for the NUL.
                    nul = _nul(buf, pos + 5, end)
                    at = _nul(buf, nul + 1, end) if nul >= 0 else -1
                    if at < 0:
                        raise pg.ProtocolError(pg.UNTERMINATED)
                    name = b"" if at == nul + 1 else buf[nul + 1 : at]
                    portal = b"" if nul == pos + 5 else buf[pos + 5 : nul]
                    portals[portal] = statements.get(name)
                    pending.append(BOUND)
                elif code == _C_EXECUTE:
                    nul = _nul(buf, pos + 5, end)
                    if nul < 0:
                        raise pg.ProtocolError(pg.UNTERMINATED)
                    bound = portals.get(b"" if nul == pos + 5 else buf[pos + 5 : nul])
                    if bound is not None and bound.plain is engine and runless:
                        if minute < 0 <= bound.minute:
                            now = ctx.clock()
                            minute = int(now // 60)
                        if bound.minute < 0 or bound.minute == minute:
                            pending.append(EXECUTED)
                            pos = end
                            continue
                    replacement = self._execute(buf, pos, end, bound)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                    discarding = self._discarding
                    if self.wait:
                        pos = end
                        break
                elif code == _C_SYNC:
                    pending.append(SYNCED)
                elif code == _C_PARSE:
                    # Apps re-Parse the same texts (unnamed statements), most often the
                    # very message they sent last: then one comparison finds its decision.
                    last = self._last_parse
                    known: Prepared | None
                    if last is not None and buf.startswith(last[0], pos):
                        name, known, new = last[1], last[2], False
                    else:
                        nul = buf.find(0, pos + 5, end)
                        at = buf.find(0, nul + 1, end) if nul >= 0 else -1
                        if at < 0:
                            raise pg.ProtocolError(pg.UNTERMINATED)
                        known = self._parsed.get(bytes(buf[nul + 1 : at]))
                        name = b"" if nul == pos + 5 else bytes(buf[pos + 5 : nul])
                        new = True
                    if (
                        known is not None
                        and known.engine is engine
                        and known.decision.applied is not Action.DENY
                        and not (known.slash and pending)
                    ):
                        if minute < 0 <= known.minute:
                            now = ctx.clock()
                            minute = int(now // 60)
                        if known.minute < 0 or known.minute == minute:
                            if new:
                                self._last_parse = (bytes(buf[pos:end]), name, known)
                            statements[name] = known
                            pending.append(PARSED)
                            pos = end
                            continue
                    replacement = self._parse(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                    discarding = self._discarding
                elif code == _C_QUERY:
                    replacement = self._query(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                    if self.wait:
                        pos = end
                        break
                elif code == _C_CLOSE:
                    self._close(buf, pos, end)
                elif code == _C_CALL:
                    replacement = self._function_call(bytes(buf[pos:end]))
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                else:  # Terminate
                    self.closing = "client terminated"
                    pos = end
                    break
                pos = end
            done = True
        except pg.ProtocolError as exc:
            self._fail(f"invalid message from the client: {exc}")
        finally:
            if fwd < pos:
                # All of it unchanged, nothing before it, nothing else to do: the driver
                # writes it as it came.
                done = done and fwd == 0 and pos == size and not out
                if not (done and self.closing is None and not self.wait and not self.to_client):
                    out += buf[fwd:pos]
                    done = False
            else:
                done = False
            if pos < size:
                cin += buf[pos:]
        return buf if done else None

    # -- server -> app ----------------------------------------------------------------------

    def server_data(self, data: bytes | bytearray) -> None:
        """Frame `data` from the server; what goes on to the app is then in `to_client`."""
        passed = self.server_pass(data)
        if passed is not None:
            self.to_client += passed

    def server_pass(self, data: bytes | bytearray) -> bytes | None:
        """`server_data` for the driver: when the session is under way and all of `data`
        goes on to the app unchanged, with nothing waiting in `to_client` before it, returns
        it (as `bytes`) for the driver to write straight to the app; else None, and the
        output is in `to_client` as after `server_data`."""
        sin = self._sin
        buf: bytes
        if sin:  # the rest of a message that came in pieces
            joined = pg.joined(sin, data, self.ctx.max_message)
            if joined is None:
                return None
            buf = joined
        else:
            buf = data if type(data) is bytes else bytes(data)
        size: cython.Py_ssize_t = len(buf)
        pos: cython.Py_ssize_t = 0  # bytes before `fwd` are dealt with; fwd..pos go on
        fwd: cython.Py_ssize_t = 0  # unchanged
        end: cython.Py_ssize_t
        kind: cython.Py_ssize_t
        length: cython.Py_ssize_t
        code: cython.Py_ssize_t
        limit: cython.Py_ssize_t
        kinds: bytes = _SERVER_KINDS
        compiled = _COMPILED
        # Under way (not authenticating: the driver then has the backend key to take).
        ready = self._phase == _READY
        if self.closing is not None:  # nothing more goes to the app
            pos = size
            fwd = size
        out = self.to_client
        pending = self._pending
        limit = self.ctx.max_message
        header = pg.unpack_header
        try:
            while size - pos >= 5:
                if compiled:
                    kind = buf[pos]
                    length = buf[pos + 1] << 24 | buf[pos + 2] << 16 | buf[pos + 3] << 8
                    length |= buf[pos + 4]
                    if length > 0x7FFFFFFF:  # the field is signed
                        length -= 0x100000000
                else:
                    kind, length = header(buf, pos)
                if length < 4 or length > limit:
                    raise pg.bad_length(kind, length)
                end = pos + 1 + length
                if end > size:
                    break
                code = kinds[kind]
                if not code:  # DataRow, RowDescription, notices, COPY data: the bulk
                    pass
                elif code == _S_DONE:  # CommandComplete, EmptyQueryResponse, PortalSuspended
                    if pending:
                        head = pending[0]
                        if head is EXECUTED:
                            pending.popleft()
                        elif head[0] == EXEC:
                            pending.popleft()
                            run = head[1]
                            if run is not None:
                                tag = bytes(buf[pos + 5 : end - 1])
                                self.record(
                                    run, pg.command_rows(tag) if kind == 0x43 else None, None
                                )
                elif code == _S_READY:
                    status = _BYTES[buf[pos + 5]] if length > 4 else b""
                    if status is not self.transaction:  # a read costs less than a store
                        self.transaction = status
                    if not ready and self._phase == _AUTH:
                        self._phase = _READY
                    while pending:  # everything up to the Sync it answers
                        tracked, run = pending.popleft()
                        if tracked == SYNC:
                            break
                        if run is not None:  # answered by nothing: it did not run
                            self.record(run, None, "skipped")
                elif code == _S_PARSED:  # ParseComplete, BindComplete
                    if pending:
                        tracked = pending[0][0]
                        if tracked in (PARSE_SWALLOW, BIND_SWALLOW):
                            out += buf[fwd:pos]
                            fwd = end
                            pending.popleft()
                        elif tracked in (PARSE, BIND):
                            pending.popleft()
                elif code == _S_ERROR:
                    replacement = self._server_error(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                elif code == _S_PARAMETER:
                    self._parameter(buf, pos, end)
                elif code == _S_KEY:
                    self.backend_key = bytes(buf[pos + 5 : end])
                elif self._phase == _AUTH:  # Authentication*
                    replacement = pg.without_channel_binding(buf, pos, end)
                    if replacement is not None:
                        out += buf[fwd:pos]
                        out += replacement
                        fwd = end
                pos = end
        except pg.ProtocolError as exc:
            out += buf[fwd:pos]
            self._fail(f"invalid message from the server: {exc}")
            pos = fwd = size
        if fwd < pos:
            if ready and fwd == 0 and pos == size and not out and self.closing is None:
                return buf  # all of it unchanged, nothing before it: written as it came
            out += buf[fwd:pos]
        if pos < size:
            sin += buf[pos:]
        return None

    # What the loops call on `PgSession` (its own methods and `PgDeciding`'s, which come
    # first in its method order): declared here for the type checker only.

    def _startup(self) -> None:
        raise NotImplementedError

    def _fail(self, reason: str) -> None:
        raise NotImplementedError

    def _close(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        raise NotImplementedError

    def _execute(
        self, buf: bytes | bytearray, pos: int, end: int, bound: Prepared | None
    ) -> bytes | None:
        raise NotImplementedError

    def _parse(self, buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
        raise NotImplementedError

    def _query(self, buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
        raise NotImplementedError

    def _function_call(self, message: bytes) -> bytes | None:
        raise NotImplementedError

    def _server_error(self, buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
        raise NotImplementedError

    def _parameter(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        raise NotImplementedError

    def record(self, run: Run, rows: int | None, error: str | None) -> None:
        raise NotImplementedError


class PgSession(PgDeciding, _PgWire):
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
        self._cin = bytearray()  # an incomplete message from the app, until the rest comes
        self._sin = bytearray()  # the same from the server
        self._phase = _STARTUP
        self._pending: deque[Tracked] = deque()
        self._discarding = False  # after a denied Parse/Execute: drop until Sync
        self._statements: dict[bytes, Prepared] = {}  # by statement name
        self._portals: dict[bytes, Prepared | None] = {}  # what each portal was bound to
        # Per Parse text, reset when the session's reading of text changes
        # (standard_conforming_strings, client_encoding): apps re-Parse the same texts.
        self._parsed: dict[bytes, Prepared] = {}
        # The last Parse message found in `_parsed`: (message, statement name, statement).
        self._last_parse: tuple[bytes, bytes, Prepared] | None = None
        self._sql_prepared: dict[str, StatementInfo] = {}
        self.state: SessionState = POSTGRES
        self.encoding = "utf-8"

    # -- app -> server ----------------------------------------------------------------------

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

    def _close(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        if end - pos < 7:
            raise pg.ProtocolError("Close message too short")
        name, _ = pg.cstring(buf, pos + 6, end)
        if buf[pos + 5] == 0x53:  # 'S'tatement
            self._statements.pop(name, None)
        else:
            self._portals.pop(name, None)

    # -- server -> app ----------------------------------------------------------------------

    def _server_error(self, buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
        """Account for an error; returns a replacement for our own raised errors, which
        drop the server's CONTEXT line (it would point at the raising statement)."""
        pending = self._pending
        if not pending:
            return None
        fields = pg.error_fields(buf, pos + 5, end)
        replacement = None
        if pending[0][0] == EXEC:
            run = pending.popleft()[1]
            if run is not None:
                self.record(run, None, fields.get("C"))
                if run.outcome in ("deny", "reject") and "W" in fields:
                    replacement = pg.error_message({k: v for k, v in fields.items() if k != "W"})
        # The server skips everything up to the next Sync (or ends the simple query).
        while pending and pending[0][0] != SYNC:
            pending.popleft()
        return replacement

    def _parameter(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        name, at = pg.cstring(buf, pos + 5, end)
        value, _ = pg.cstring(buf, at, end)
        key, val = name.decode("ascii", "replace"), value.decode("utf-8", "replace")
        self.params[key] = val
        if key == "standard_conforming_strings":
            self.state = session_state("postgres", val == "on")  # one object per reading
            self._forget_parsed()
        elif key == "client_encoding":
            self.encoding = pg.python_codec(val)
            self._forget_parsed()

    def _fail(self, reason: str) -> None:
        self.to_client += pg.error_response(
            PROTOCOL_VIOLATION, f"sluice: {reason}", severity="FATAL"
        )
        self.closing = reason


# The same source compiled by Cython (setup.py builds it as `sidecar._pg_session_c` at
# install): the framing loops with C integers and direct byte access, about half the
# instructions per transaction. Used only when built from this very text (its SHA-256,
# sidecar/builds.py), so an edit never runs stale code: pure Python until `make install`.
COMPILED_MODULE = "sidecar._pg_session_c"


def session_class() -> type[PgSession]:
    """The PgSession class the driver uses: the compiled build when it is current."""
    if _COMPILED:
        return PgSession
    module = builds.current(__file__, COMPILED_MODULE)
    if module is None:
        return PgSession
    compiled: type[PgSession] = module.PgSession
    return compiled

"""Matching the server's responses to the app's commands in a MySQL session (sans-I/O).

The session (`sidecar/mysql_session.py`) says what each forwarded command expects
(`expect`); this part frames the server's packets, follows each response to its end (OK,
ERR, result sets with or without EOF packets, several results of a multi-statement string,
a LOCAL INFILE request, a prepare's metadata), records each statement's outcome, and places
the sidecar's own answers (`answer`) between the server's in the order the app asked.

Bytes are forwarded as they came, with one exception: when the session forwarded only the
statements before a denied one of a multi-statement string, the last result of that prefix
gets SERVER_MORE_RESULTS_EXISTS set and the sidecar's ERR follows it (the entry's `tail`;
docs/decisions/0006, item 5). A server error inside the prefix ends the response there and
the tail is dropped, as the server would have stopped there too.

Cost (bench/README.md, MySQL): this runs for every packet the server sends, so the common
shapes are followed inside one loop on local variables: a result set's column count,
definitions and rows (walked in bulk by `protocols.mysql.skip_rows`), and the OK/EOF that
ends a result nobody audits (`PLAIN_RESULT`: only its status flags are read). A read that
ends on a packet boundary is forwarded in one piece, without copying it into a buffer first.
The driver's two entry points are here too, so that the commonest command and its answer
never leave this module: `server_pass` goes straight to that loop once authenticated, and
`client_pass` forwards an execution of a prepared statement whose cached decision is a
plain allow (`_execute_again`); the session (`sidecar/mysql_session.py`) has the rest. When
all of a read goes on unchanged and nothing else waits, they return the read itself, which
the driver writes as it came (`bytes`: uvloop writes them without a copy or a memoryview;
`PassingClientSide`/`PassingServerSide` in sidecar/connection.py); `client_data`/`server_data` are
the same with the output always in `to_server`/`to_client`, for the sans-I/O callers.

Cython compiles this same file into `sidecar._mysql_responses_c` (setup.py;
docs/decisions/0013-compiled-pg-session.md): the loop's offsets, lengths and states are
annotated `cython.Py_ssize_t` and it reads a `bytes` object, so the compiled build does its
integer arithmetic and byte reads in C (and walks rows packet by packet there instead of
calling `skip_rows`). Its helpers are module functions taking the session as their first
argument, which the compiled build calls as C functions (`cython.cfunc`); the wire constants
are this module's globals, as a module attribute costs the compiled build a generic lookup.
Attribute access on the session stays Python's (and costs the compiled build more than it
costs the interpreter), so the loop reads each attribute once and writes back only those
that changed. `mysql_session.session_class()` gives the driver a session over that build's
methods when it is current.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from policies.engine import Decision
from policies.sql.inspect import SessionState
from policies.sql.model import StatementInfo
from sidecar.protocols import mysql as my
from sidecar.session_common import RouteContext, Run

_F = TypeVar("_F", bound=Callable[..., Any])

try:  # compiled by Cython (setup.py): the annotations below give C types; else inert
    import cython

    _COMPILED: bool = cython.compiled
except ModuleNotFoundError:  # Cython is a build dependency: without it, its decorators are inert
    _COMPILED = False

    class cython:  # type: ignore[no-redef]
        """The decorators this module takes from Cython's pure-Python mode, as no-ops."""

        @staticmethod
        def cfunc(function: _F) -> _F:
            return function


# What a command expects.
RESULT, PREPARE, FETCH, FIELDS, SIMPLE, AUTH, LOCAL = range(7)
# The session's phase once authenticated (`mysql_handshake.COMMAND`).
COMMAND_PHASE = 3
# Where in a response we are.
_FIRST, _COLUMNS, _COLUMNS_EOF, _ROWS, _SKIP = range(5)
# The wire constants `responses` reads per call, as globals of this module.
_MAX_PACKET, _OK, _EOF, _LOCAL_INFILE = my.MAX_PACKET, my.OK, my.EOF, my.LOCAL_INFILE
_COM_STMT_EXECUTE = my.COM_STMT_EXECUTE
_MORE_RESULTS = my.SERVER_MORE_RESULTS_EXISTS
_NO_BACKSLASH_ESCAPES = my.SERVER_STATUS_NO_BACKSLASH_ESCAPES
_CURSOR_EXISTS = my.SERVER_STATUS_CURSOR_EXISTS
# The size of a length-encoded integer by its first byte; 0xFB and 0xFF start none: a size
# past any packet sends it to the slow path.
_LENENC_SIZE = (1,) * 0xFB + (_MAX_PACKET + 5, 3, 4, 9, _MAX_PACKET + 5)

Prepared = tuple[str, tuple[StatementInfo, ...]]
# The denied statement after a forwarded prefix: its run and the ERR payload it gets.
Tail = tuple[Run, bytes]


@dataclass(slots=True)
class Expected:
    kind: int
    runs: deque[Run | None] = field(default_factory=deque)
    local: bytes = b""
    prepared: Prepared | None = None
    tail: Tail | None = None


# A result nobody audits (no runs, no tail): one shared entry, as nothing changes an entry
# without runs or a tail. `responses` follows such results without leaving its loop.
PLAIN_RESULT = Expected(RESULT)
if _COMPILED:  # the session (pure Python) appends the pure module's entry: it is the same one
    PLAIN_RESULT = importlib.import_module("sidecar.mysql_responses").PLAIN_RESULT

# The compiled build of this file (setup.py), used when built from this very text.
COMPILED_MODULE = "sidecar._mysql_responses_c"


@cython.cfunc  # compiled: a C function, called without Python's call protocol
def _ok_status(buf: bytes, at: cython.Py_ssize_t, end: cython.Py_ssize_t) -> cython.Py_ssize_t:
    """The status flags of the OK packet whose affected rows start at `buf[at]` and whose
    payload ends at `end`, or -1 when `_packet` must read it (`my.ok_info`: no status, or
    length-encoded integers that are malformed or run past the packet)."""
    at += _LENENC_SIZE[buf[at]]  # affected rows
    if at < end:
        at += _LENENC_SIZE[buf[at]]  # last insert id
        if at + 2 <= end:
            return buf[at] | buf[at + 1] << 8
    return -1


class Responses:
    """The response side of a MySQL session; `MySqlSession` supplies the hooks."""

    ctx: RouteContext
    to_client: bytearray
    closing: str | None
    deprecate_eof: bool
    to_server: bytearray
    wait: float
    _cin: bytearray
    _cseq: int
    _phase: int  # the connection phase's (sidecar/mysql_handshake.py)
    _resume: bool

    def __init__(self) -> None:
        self.pending: deque[Expected] = deque()
        self.infile = False  # the server asked for a local file: the app's packets follow
        # Statement id -> (text, inspection, session state at prepare).
        self.prepared: dict[int, tuple[str, tuple[StatementInfo, ...], SessionState]] = {}
        # Statement id -> (engine, minute or -1, statements, decision, plain) last decided;
        # plain: an allow with nothing to audit, limit or remember (the session's `_plain`).
        self.decisions: dict[
            int, tuple[object, int, tuple[StatementInfo, ...], Decision, bool]
        ] = {}
        self._sin = bytearray()
        self._where = _FIRST
        self._count = 0
        self._rows = 0
        self._continued = False  # the last packet was 0xFFFFFF long: this one continues it
        self._flip = -1  # where the status byte to flag SERVER_MORE_RESULTS_EXISTS in is
        # The NO_BACKSLASH_ESCAPES bit of the last status flags seen (the session sets it
        # from the greeting): `server_status` is called when it changes.
        self._nbe = 0

    # hooks the session implements
    def record(self, run: Run, rows: int | None, error: str | None) -> None: ...
    def server_status(self, status: int) -> None: ...
    def auth_more(self, buf: bytes | bytearray, start: int, end: int) -> None: ...
    def auth_done(self, ok: bool) -> None: ...
    def remember_prepared(
        self, stmt_id: int, sql: str, statements: tuple[StatementInfo, ...]
    ) -> None: ...
    def _fail(self, reason: str) -> None: ...
    def _client_data(self, data: bytes) -> bytes | None: ...
    def _connection_data(self, data: bytes) -> None: ...

    # the session's side

    def expect(
        self,
        kind: int,
        runs: list[Run | None] | None = None,
        prepared: Prepared | None = None,
        tail: Tail | None = None,
    ) -> None:
        if runs is not None and all(run is None for run in runs):
            runs = None  # statements without audit events: nothing to record per result
        if kind == RESULT and runs is None and tail is None:
            self.pending.append(PLAIN_RESULT)
        else:
            self.pending.append(Expected(kind, deque(runs or ()), prepared=prepared, tail=tail))

    def answer(self, packet: bytes) -> None:
        """Our own answer to a command: now, or after the responses the app waits for."""
        if self.pending:
            self.pending.append(Expected(LOCAL, local=packet))
        else:
            self.to_client += packet

    def forget(self, stmt_id: int) -> None:
        self.prepared.pop(stmt_id, None)
        self.decisions.pop(stmt_id, None)

    # the driver's entry points

    def client_data(self, data: bytes) -> None:
        """The app's bytes (`client_pass`); what goes on to the server is then in
        `to_server`, what goes back to the app in `to_client`. For the sans-I/O callers
        (tests, the session's own resumes after a wait, TLS or authentication)."""
        passed = self.client_pass(data)
        if passed is not None:
            self.to_server += passed

    def client_pass(self, data: bytes) -> bytes | None:
        """The app's bytes, from the driver. When all of `data` goes on to the server
        unchanged, in the command phase, and nothing else is waiting (both output buffers
        empty, no wait, not closing), returns it, and the driver writes it to the server as
        it came; else None, and the output is in `to_server` and `to_client` as after
        `client_data`. The commonest command goes on here (compiled: without a Python
        call): an execution whose decision holds (`_execute_again`); the session handles
        the rest (`_client_data`)."""
        forwarded = _execute_again(self, data)
        if forwarded:
            return data if forwarded == _AS_IT_CAME else None
        return self._client_data(data)

    def server_data(self, data: bytes) -> None:
        """The server's bytes (`server_pass`); what goes on to the app is then in
        `to_client`. For the sans-I/O callers (tests)."""
        passed = self.server_pass(data)
        if passed is not None:
            self.to_client += passed

    def server_pass(self, data: bytes) -> bytes | None:
        """The server's bytes, from the driver: once authenticated, straight to the response
        loop (compiled: without a Python call in between); before that, the connection
        phase's (`_connection_data`). When the session was in the command phase as the read
        began and all of `data` goes on to the app unchanged, with nothing waiting in
        `to_client` before it, returns it, and the driver writes it to the app as it came;
        else None, and the output is in `to_client` as after `server_data`. The greeting
        (rewritten), the authentication exchange (renumbered after the sidecar's
        SSLRequest, or answered here) and what follows it in the same read always come
        back None: the driver then pumps, which the TLS upgrade and the commands waiting
        for the end of authentication need."""
        passed: bytes | None = None
        if self._phase != COMMAND_PHASE:
            self._connection_data(data)
        else:
            passed = _responses(self, data, True)
        if self._resume:  # commands the app sent before authentication ended
            self._resume = False
            # (Authentication ends in a read begun before the command phase, never passed;
            # were it otherwise, that read would still go to the app first.)
            if passed is not None:
                self.to_client += passed
                passed = None
            self.client_data(b"")
        return passed

    def responses(self, data: bytes | bytearray) -> None:
        """Follow the server's packets and forward them into `to_client` (`_responses`)."""
        _responses(self, data, False)

    def _packet(self, buf: bytes | bytearray, start: int, end: int) -> bool:
        """Follow one packet of the response at the head; True when that response ended."""
        head = self.pending[0]
        kind = head.kind
        first = buf[start] if end > start else -1
        where = self._where
        if kind in (RESULT, FETCH, FIELDS):
            if where == _ROWS or kind != RESULT:
                if first == my.ERR:
                    return self._error(head, buf, start, end)
                if first == my.EOF and end - start < (my.MAX_PACKET if self.deprecate_eof else 9):
                    status = self._terminator(buf, start, end)
                    rows = self._rows if kind in (RESULT, FETCH) else None
                    return self._result_done(head, rows, status, buf, start, end)
                self._rows += 1
                return False
            if where == _FIRST:
                if first == my.OK:
                    rows, status = my.ok_info(buf[start:end])
                    self._status(status)
                    return self._result_done(head, rows, status, buf, start, end)
                if first == my.ERR:
                    return self._error(head, buf, start, end)
                if first == my.LOCAL_INFILE:
                    self.infile = True
                    return False
                count, _ = my.lenenc_int(buf, start, end)
                self._where, self._count, self._rows = _COLUMNS, count, 0
                return False
            if where == _COLUMNS:
                self._count -= 1
                if self._count <= 0:
                    self._where = _ROWS if self.deprecate_eof else _COLUMNS_EOF
                return False
            # _COLUMNS_EOF
            status = my.eof_status(buf[start:end])
            if status & my.SERVER_STATUS_CURSOR_EXISTS:  # rows come with COM_STMT_FETCH
                status &= ~my.SERVER_MORE_RESULTS_EXISTS
                return self._result_done(head, None, status, buf, start, end)
            self._where = _ROWS
            return False
        if kind == PREPARE:
            return self._prepare_ok(head, buf, start, end, first)
        if kind == AUTH:  # the connection phase's (sidecar/mysql_handshake.py)
            if first == my.OK or first == my.ERR:
                self.auth_done(first == my.OK)
                return self._done()
            self.auth_more(buf, start, end)  # a plugin switch or more data: go on
            return False
        if first == my.OK:  # SIMPLE
            self._status(my.ok_info(buf[start:end])[1])
        return self._done()

    def _status(self, status: int) -> None:
        nbe = status & my.SERVER_STATUS_NO_BACKSLASH_ESCAPES
        if nbe != self._nbe:
            self._nbe = nbe
            self.server_status(status)

    def _prepare_ok(
        self, head: Expected, buf: bytes | bytearray, start: int, end: int, first: int
    ) -> bool:
        if self._where == _SKIP:
            self._count -= 1
            return self._count <= 0 and self._done()
        assert head.prepared is not None
        sql, statements = head.prepared
        if first == my.ERR:
            return self._done()
        if first != my.OK or end - start < 12:
            raise my.ProtocolError("malformed COM_STMT_PREPARE response")
        stmt_id = int.from_bytes(buf[start + 1 : start + 5], "little")
        columns = buf[start + 5] | buf[start + 6] << 8
        params = buf[start + 7] | buf[start + 8] << 8
        self.remember_prepared(stmt_id, sql, statements)
        eofs = 0 if self.deprecate_eof else (columns > 0) + (params > 0)
        self._count = columns + params + eofs
        if self._count == 0:
            return self._done()
        self._where = _SKIP
        return False

    def _terminator(self, buf: bytes | bytearray, start: int, end: int) -> int:
        if self.deprecate_eof:
            status = my.ok_info(buf[start:end])[1]
        else:
            status = my.eof_status(buf[start:end])
        self._status(status)
        return status

    def _result_done(
        self,
        head: Expected,
        rows: int | None,
        status: int,
        buf: bytes | bytearray,
        start: int,
        end: int,
    ) -> bool:
        """A result ended with the OK/EOF packet `buf[start:end]` (status `status`)."""
        if head.runs:
            run = head.runs.popleft()
            if run is not None:
                self.record(run, rows, None)
        if status & my.SERVER_MORE_RESULTS_EXISTS and head.kind == RESULT:
            self._where = _FIRST
            return False
        if head.tail is not None:
            self._then_deny(head, head.tail, buf, start, end)
        return self._done()

    def _then_deny(
        self, head: Expected, tail: Tail, buf: bytes | bytearray, start: int, end: int
    ) -> None:
        """The forwarded prefix ran to its end: say more results follow, then our ERR."""
        run, err = tail
        head.tail = None
        eof = buf[start] == my.EOF and not self.deprecate_eof
        at = my.status_offset(buf, start, end, eof)
        if at < 0:  # protocol 4.1 always sends the status; without it the ERR cannot follow
            raise my.ProtocolError("result ends without status flags")
        self._flip = at  # `responses` sets the flag (a low-byte one) as it forwards the byte
        self.record(run, None, my.err_fields(err).sqlstate)
        seq = buf[start - 1]  # the header of the packet whose payload starts at `start`
        self.pending.insert(1, Expected(LOCAL, local=my.packets(err, (seq + 1) & 0xFF)))

    def _error(self, head: Expected, buf: bytes | bytearray, start: int, end: int) -> bool:
        err = my.err_fields(buf[start:end])
        code = err.sqlstate or str(err.code)
        if head.runs:
            run = head.runs.popleft()
            if run is not None:
                self.record(run, None, code)
        return self._done()

    def _done(self) -> bool:
        """The response at the head is complete: statements it did not answer never ran."""
        head = self.pending.popleft()
        for run in head.runs:
            if run is not None:
                self.record(run, None, "skipped")
        if head.tail is not None:  # the server failed inside the prefix: no ERR of ours
            self.record(head.tail[0], None, "skipped")
        self._where = _FIRST
        self._count = self._rows = 0
        return True


# What `_execute_again` did with a read: not an execution it forwards (the session decides
# it); forwarded into `to_server`; forwarded as it came (nothing else waits: the driver
# writes the read itself).
_NOT_MINE, _BUFFERED, _AS_IT_CAME = range(3)


@cython.cfunc  # compiled: called from `client_pass` without Python's call protocol
def _execute_again(session: Responses, data: object) -> cython.Py_ssize_t:
    """Forward `data` when it is one whole COM_STMT_EXECUTE (one packet in one read, in the
    command phase, nothing held) of a statement whose cached decision is a plain allow
    (nothing to audit, limit or remember) that still holds: the same policy set and, with
    time windows, the same minute (`MySqlSession._decide_prepared`). Its response is a
    PLAIN_RESULT. Returns _AS_IT_CAME when both output buffers are empty (the driver writes
    `data` itself; nothing is copied), _BUFFERED when `data` went into `to_server` after
    what waits there (or for what waits in `to_client`, which the driver's pump writes),
    _NOT_MINE when the session decides it (`_client_data`)."""
    if type(data) is not bytes:
        return _NOT_MINE
    buf: bytes = data
    size: cython.Py_ssize_t = len(buf) - 4
    if not (
        5 <= size < _MAX_PACKET
        and buf[4] == _COM_STMT_EXECUTE
        and buf[3] == 0
        and (buf[0] | buf[1] << 8 | buf[2] << 16) == size
    ):
        return _NOT_MINE
    if (
        session._cin
        or session._phase != COMMAND_PHASE
        or session.wait != 0.0
        or session.closing is not None
        or session.infile
    ):
        return _NOT_MINE
    ctx = session.ctx
    if size > ctx.max_message:
        return _NOT_MINE
    decisions: dict[int, tuple[object, int, tuple[StatementInfo, ...], Decision, bool]]
    decisions = session.decisions
    cached = decisions.get(buf[5] | buf[6] << 8 | buf[7] << 16 | buf[8] << 24)
    if cached is None or not cached[4] or cached[0] is not ctx.decider.engine:
        return _NOT_MINE
    if cached[1] >= 0:  # a timed decision: for its minute (a C double, compiled)
        now: cython.double = ctx.clock()
        minute: cython.Py_ssize_t = int(now // 60)
        if cached[1] != minute:
            return _NOT_MINE
    session._cseq = 0
    session.pending.append(PLAIN_RESULT)
    out = session.to_server
    if out or session.to_client:  # something waits: in order, through the driver's pump
        out += buf
        return _BUFFERED
    return _AS_IT_CAME


@cython.cfunc  # compiled: called from `server_pass` without Python's call protocol
def _responses(session: Responses, data: bytes | bytearray, whole: cython.bint) -> bytes | None:
    """Follow the server's packets and forward them; runs of bytes that need no change go
    out as they came, in one piece (the read itself when it ends on a packet boundary, as it
    nearly always does). `session` is the session (`Responses.responses`). With `whole`
    (`server_pass`), a read that goes on all of it unchanged with nothing in `to_client`
    before it is returned instead of appended; else None."""
    if session.closing is not None:
        return None  # nothing more goes to the app
    buf: bytes
    sin = session._sin
    if sin:  # the end of a packet the last read cut: one copy, then framed as bytes
        sin += data
        if len(sin) < 4 or len(sin) < 4 + (sin[0] | sin[1] << 8 | sin[2] << 16):
            return None  # its first packet is not complete yet: nothing to do (and no copy)
        buf = bytes(sin)
        sin.clear()
    else:
        buf = data if type(data) is bytes else bytes(data)
    size: cython.Py_ssize_t = len(buf)
    pos: cython.Py_ssize_t = 0  # bytes before `fwd` are dealt with; fwd..pos go on
    fwd: cython.Py_ssize_t = 0  # unchanged
    length: cython.Py_ssize_t
    end: cython.Py_ssize_t
    first: cython.Py_ssize_t
    status: cython.Py_ssize_t
    where: cython.Py_ssize_t = session._where
    rows: cython.Py_ssize_t = session._rows
    continued: cython.bint = session._continued
    count = session._count  # a length-encoded column count: not bounded to a C integer
    # The attributes' values as last read or written: only changed ones are written
    # back (most reads end where they began, between responses).
    where0: cython.Py_ssize_t = where
    rows0: cython.Py_ssize_t = rows
    continued0: cython.bint = continued
    count0 = count
    # The wire constants as locals: C integers in the compiled build (this module's
    # globals: a module attribute costs the compiled build a generic lookup per read).
    max_packet: cython.Py_ssize_t = _MAX_PACKET
    ok: cython.Py_ssize_t = _OK
    eof: cython.Py_ssize_t = _EOF
    local_infile: cython.Py_ssize_t = _LOCAL_INFILE
    more_results: cython.Py_ssize_t = _MORE_RESULTS
    no_backslash_escapes: cython.Py_ssize_t = _NO_BACKSLASH_ESCAPES
    compiled = _COMPILED
    plain = PLAIN_RESULT
    out = session.to_client
    pending = session.pending
    deprecate_eof = session.deprecate_eof
    try:
        while size - pos >= 4:
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            end = pos + 4 + length
            if end > size:
                break
            if continued or not pending:  # a continuation, or nothing asked: pass on
                continued = continued and length == max_packet
                pos = end
                continue
            continued = length == max_packet
            first = buf[pos + 4] if length else -1
            # What a result set spends its packets on is followed here, with local
            # variables, and so is the end of a result nobody audits (PLAIN_RESULT:
            # only its status flags matter); `_packet` sees the rest (errors, results
            # with audit events, prepares, authentication...).
            status = -1
            if where == _ROWS:
                if 0 <= first < eof:
                    rows += 1  # a row: the bulk of a result, walked in one go
                    if not continued and not compiled:  # (compiled: one by one, in C)
                        end, n = my.skip_rows(buf, end, size)
                        rows += n
                    pos = end
                    continue
                if (
                    first == eof
                    and pending[0] is plain
                    and length >= 5
                    and (
                        length < max_packet and buf[pos + 5] < 0xFB and buf[pos + 6] < 0xFB
                        if deprecate_eof
                        else length < 9
                    )
                ):
                    status = buf[pos + 7] | buf[pos + 8] << 8  # EOF, or OK in its place
            elif where == _FIRST:
                if pending[0] is plain:
                    if ok < first < local_infile:
                        where, count, rows = _COLUMNS, first, 0  # the column count
                        pos = end
                        continue
                    if first == ok and length >= 5:  # OK: no result set
                        status = _ok_status(buf, pos + 5, end)
            elif where == _COLUMNS:
                count -= 1
                if count <= 0:
                    where = _ROWS if deprecate_eof else _COLUMNS_EOF
                pos = end
                continue
            elif where == _COLUMNS_EOF and not (length >= 5 and buf[pos + 7] & _CURSOR_EXISTS):
                where = _ROWS  # the EOF after the columns; no cursor: rows follow
                pos = end
                continue
            if status >= 0:  # a plain result ended
                pos = end
                if status & no_backslash_escapes != session._nbe:
                    session._status(status)
                where = _FIRST
                if status & more_results:
                    continue
                pending.popleft()
                count = rows = 0
            else:
                session._where, session._rows, session._count = where, rows, count
                done = session._packet(buf, pos + 4, end)
                where0 = where = session._where
                rows0 = rows = session._rows
                count0 = count = session._count
                pos = end
                if not done:
                    continue
                if session._flip >= 0:  # SERVER_MORE_RESULTS_EXISTS: our ERR follows
                    out += buf[fwd : session._flip]
                    out.append(buf[session._flip] | my.SERVER_MORE_RESULTS_EXISTS)
                    fwd, session._flip = session._flip + 1, -1
            # The response at the head ended.
            if pending and pending[0].kind == LOCAL:
                out += buf[fwd:pos]
                fwd = pos
                while pending and pending[0].kind == LOCAL:
                    out += pending.popleft().local
            if status < 0 and session.closing is not None:  # (only `_packet`'s hooks close)
                break
    except my.ProtocolError as exc:
        out += buf[fwd:pos]
        session._fail(f"invalid packet from the server: {exc}")
        return None
    if where != where0:
        session._where = where
    if rows != rows0:
        session._rows = rows
    if count != count0:
        session._count = count
    if continued != continued0:
        session._continued = continued
    if pos > fwd:
        if fwd == 0 and pos == size:  # all of it, unchanged
            # Nothing before it and nothing to do after it (a sidecar's answer, a close:
            # those are in `to_client` too): the driver writes the read itself.
            if whole and not out and session.closing is None:
                return buf
            out += buf
        else:
            out += buf[fwd:pos]
    if pos < size:
        sin += buf[pos:]  # part of a packet: kept for the next read
    return None

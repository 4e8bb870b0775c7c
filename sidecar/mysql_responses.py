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

Cython compiles this same file into `sidecar._mysql_responses_c` (setup.py;
docs/decisions/0013-compiled-pg-session.md): the loop's offsets, lengths and states are
annotated `cython.Py_ssize_t` and it reads a `bytes` object, so the compiled build does its
integer arithmetic and byte reads in C (and walks rows packet by packet there instead of
calling `skip_rows`). `mysql_session.session_class()` gives the driver a session over that
build's methods when it is current.
"""

from __future__ import annotations

import importlib
from collections import deque
from dataclasses import dataclass, field

try:  # compiled by Cython (setup.py): the annotations below give C types; else inert
    import cython

    _COMPILED: bool = cython.compiled
except ModuleNotFoundError:
    _COMPILED = False

from policies.engine import Decision
from policies.sql.inspect import SessionState
from policies.sql.model import StatementInfo
from sidecar.protocols import mysql as my
from sidecar.session_common import RouteContext, Run

# What a command expects.
RESULT, PREPARE, FETCH, FIELDS, SIMPLE, AUTH, LOCAL = range(7)
# Where in a response we are.
_FIRST, _COLUMNS, _COLUMNS_EOF, _ROWS, _SKIP = range(5)

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


class Responses:
    """The response side of a MySQL session; `MySqlSession` supplies the hooks."""

    ctx: RouteContext
    to_client: bytearray
    closing: str | None
    deprecate_eof: bool

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

    # the server's side

    def responses(self, data: bytes | bytearray) -> None:
        """Follow the server's packets and forward them; runs of bytes that need no change
        go out as they came, in one piece (the read itself when it ends on a packet
        boundary, as it nearly always does)."""
        if self.closing is not None:
            return  # nothing more goes to the app
        buf: bytes
        sin = self._sin
        if sin:  # the end of a packet the last read cut: one copy, then framed as bytes
            sin += data
            if len(sin) < 4 or len(sin) < 4 + (sin[0] | sin[1] << 8 | sin[2] << 16):
                return  # its first packet is not complete yet: nothing to do (and no copy)
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
        where: cython.Py_ssize_t = self._where
        rows: cython.Py_ssize_t = self._rows
        continued: cython.bint = self._continued
        count = self._count  # a length-encoded column count: not bounded to a C integer
        # The wire constants as locals: C integers in the compiled build.
        max_packet: cython.Py_ssize_t = my.MAX_PACKET
        ok: cython.Py_ssize_t = my.OK
        eof: cython.Py_ssize_t = my.EOF
        local_infile: cython.Py_ssize_t = my.LOCAL_INFILE
        more_results: cython.Py_ssize_t = my.SERVER_MORE_RESULTS_EXISTS
        no_backslash_escapes: cython.Py_ssize_t = my.SERVER_STATUS_NO_BACKSLASH_ESCAPES
        compiled = _COMPILED
        plain = PLAIN_RESULT
        out = self.to_client
        pending = self.pending
        deprecate_eof = self.deprecate_eof
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
                        if (
                            first == ok
                            and length >= 5
                            and buf[pos + 5] < 0xFB  # affected rows and insert id: one
                            and buf[pos + 6] < 0xFB  # byte each, so the status is at 3
                        ):
                            status = buf[pos + 7] | buf[pos + 8] << 8  # OK: no result set
                elif where == _COLUMNS:
                    count -= 1
                    if count <= 0:
                        where = _ROWS if deprecate_eof else _COLUMNS_EOF
                    pos = end
                    continue
                elif where == _COLUMNS_EOF and not (
                    length >= 5 and buf[pos + 7] & my.SERVER_STATUS_CURSOR_EXISTS
                ):
                    where = _ROWS  # the EOF after the columns; no cursor: rows follow
                    pos = end
                    continue
                if status >= 0:
                    pos = end
                    if status & no_backslash_escapes != self._nbe:
                        self._status(status)
                    where = _FIRST
                    if status & more_results:
                        continue
                    pending.popleft()
                    count = rows = 0
                else:
                    self._where, self._rows, self._count = where, rows, count
                    done = self._packet(buf, pos + 4, end)
                    where, rows, count = self._where, self._rows, self._count
                    pos = end
                    if not done:
                        continue
                # The response at the head ended.
                if self._flip >= 0:  # SERVER_MORE_RESULTS_EXISTS: our ERR follows
                    out += buf[fwd : self._flip]
                    out.append(buf[self._flip] | my.SERVER_MORE_RESULTS_EXISTS)
                    fwd, self._flip = self._flip + 1, -1
                if pending and pending[0].kind == LOCAL:
                    out += buf[fwd:pos]
                    fwd = pos
                    while pending and pending[0].kind == LOCAL:
                        out += pending.popleft().local
                if self.closing is not None:
                    break
        except my.ProtocolError as exc:
            out += buf[fwd:pos]
            self._fail(f"invalid packet from the server: {exc}")
            return
        self._where, self._rows, self._count, self._continued = where, rows, count, continued
        if pos > fwd:
            out += buf if fwd == 0 and pos == size else buf[fwd:pos]
        if pos < size:
            sin += buf[pos:]  # part of a packet: kept for the next read

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

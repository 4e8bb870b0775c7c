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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
        # Statement id -> (engine, minute or -1, statements, decision) last decided.
        self.decisions: dict[int, tuple[object, int, tuple[StatementInfo, ...], Decision]] = {}
        self._sin = bytearray()
        self._where = _FIRST
        self._count = 0
        self._rows = 0
        self._continued = False  # the last packet was 0xFFFFFF long: this one continues it

    # hooks the session implements
    def record(self, run: Run, rows: int | None, error: str | None) -> None: ...
    def server_status(self, status: int) -> None: ...
    def authenticated(self) -> None: ...
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

    def responses(self, data: bytes) -> None:
        buf = self._sin
        buf += data
        pos = fwd = 0
        out = self.to_client
        try:
            size = len(buf)
            while self.closing is None:
                if size - pos < 4:
                    break
                length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
                end = pos + 4 + length
                if end > size:
                    break
                if self._continued:
                    self._continued = length == my.MAX_PACKET
                elif self.pending:
                    self._continued = length == my.MAX_PACKET
                    if self._where == _ROWS and length and buf[pos + 4] < my.EOF:
                        self._rows += 1  # a row (not EOF, not ERR): the bulk of a result
                    elif self._packet(buf, pos + 4, end):
                        out += buf[fwd:end]
                        fwd = end
                        self._locals(out)
                pos = end
        except my.ProtocolError as exc:
            out += buf[fwd:pos]
            del buf[:pos]
            self._fail(f"invalid packet from the server: {exc}")
            return
        out += buf[fwd:pos]
        del buf[:pos]

    def _locals(self, out: bytearray) -> None:
        pending = self.pending
        while pending and pending[0].kind == LOCAL:
            out += pending.popleft().local

    def _packet(self, buf: bytearray, start: int, end: int) -> bool:
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
                    self.server_status(status)
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
        if kind == AUTH:
            if first == my.OK:
                self.authenticated()
                return self._done()
            return first == my.ERR and self._done()  # else: switch or more data, go on
        if first == my.OK:  # SIMPLE
            self.server_status(my.ok_info(buf[start:end])[1])
        return self._done()

    def _prepare_ok(self, head: Expected, buf: bytearray, start: int, end: int, first: int) -> bool:
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

    def _terminator(self, buf: bytearray, start: int, end: int) -> int:
        if self.deprecate_eof:
            status = my.ok_info(buf[start:end])[1]
        else:
            status = my.eof_status(buf[start:end])
        self.server_status(status)
        return status

    def _result_done(
        self, head: Expected, rows: int | None, status: int, buf: bytearray, start: int, end: int
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

    def _then_deny(self, head: Expected, tail: Tail, buf: bytearray, start: int, end: int) -> None:
        """The forwarded prefix ran to its end: say more results follow, then our ERR."""
        run, err = tail
        head.tail = None
        eof = buf[start] == my.EOF and not self.deprecate_eof
        at = my.status_offset(buf, start, end, eof)
        if at < 0:  # protocol 4.1 always sends the status; without it the ERR cannot follow
            raise my.ProtocolError("result ends without status flags")
        buf[at] |= my.SERVER_MORE_RESULTS_EXISTS  # a low-byte flag
        self.record(run, None, my.err_fields(err).sqlstate)
        seq = buf[start - 1]  # the header of the packet whose payload starts at `start`
        self.pending.insert(1, Expected(LOCAL, local=my.packets(err, (seq + 1) & 0xFF)))

    def _error(self, head: Expected, buf: bytearray, start: int, end: int) -> bool:
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

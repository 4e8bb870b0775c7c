"""The cached hot path a sidecar calls per statement: text -> (statements, decision).

One `SqlDecider` serves one route (a source app talking to one destination in one dialect).
Its cache is keyed by the exact statement text plus the session state; an entry is reused
while the engine is the same and, when any rule of the route has a time window, within the
same minute (windows have minute granularity, so the decision cannot change inside one).

Apps that inline constants (`WHERE aid = 41`, `WHERE aid = 42`, ...) send a new text each
time. A second cache is keyed by the statement's *shape*: the text with its constants
replaced (PostgreSQL: `fast_shape` when one is given, the compiled
`policies.sql.pg_fastshape`, for the plain SELECT, INSERT, UPDATE and DELETE it accepts, else
libpg_query's normaliser, `policies.sql.postgres.shape`; MySQL and MariaDB:
`policies.sql.mysql_shape.shape`), used only where the inspection cannot depend on a
constant's value and only for single statements. It is never a fingerprint: comments (in
PostgreSQL; a MySQL text with a comment has no shape), identifiers and dollar-quoted code
stay in the key, and so does the session state.
"""

from __future__ import annotations

from collections.abc import Callable

from policies.attributes import Peer
from policies.engine import Decision, Engine
from policies.sql import mysql_shape, postgres
from policies.sql.inspect import DEFAULT_CACHE_SIZE, MAX_CACHED_LENGTH, SessionState, inspect
from policies.sql.model import StatementInfo

_Entry = tuple[int, tuple[StatementInfo, ...], Decision]


class SqlDecider:
    __slots__ = (
        "_entries",
        "_shapes",
        "engine",
        "fast_shape",
        "hits",
        "last_shape",
        "misses",
        "peer",
        "shape_hits",
        "size",
        "state",
    )

    def __init__(
        self,
        engine: Engine,
        peer: Peer,
        state: SessionState,
        size: int = DEFAULT_CACHE_SIZE,
        *,
        fast_shape: Callable[[str], str | None] | None = None,
    ) -> None:
        self.engine = engine
        # PostgreSQL: a cheaper shape tried before libpg_query's (its shapes start with NUL,
        # so the two kinds never share an entry; policies/sql/pg_fastshape.py).
        self.fast_shape = fast_shape
        self.peer = peer
        self.state = state
        self.size = size
        self._entries: dict[tuple[SessionState, str], _Entry] = {}
        self._shapes: dict[tuple[SessionState, str], _Entry] = {}
        self.hits = 0
        self.misses = 0
        self.shape_hits = 0
        # The shape of the text of the last decide() that computed one, else None: the
        # audit trail masks a statement once per shape.
        self.last_shape: str | None = None

    def use(self, engine: Engine) -> None:
        """Switch to a new policy set (a reload): cached decisions are dropped."""
        self.engine = engine
        self._entries.clear()
        self._shapes.clear()

    def decide(
        self, sql: str, now: float, state: SessionState | None = None
    ) -> tuple[tuple[StatementInfo, ...], Decision]:
        st = self.state if state is None else state
        self.last_shape = None
        key = (st, sql)
        minute = int(now // 60)
        entry = self._entries.get(key)
        if entry is not None and (entry[0] < 0 or entry[0] == minute):
            self.hits += 1
            return entry[1], entry[2]
        if entry is None and (st.dialect == "mysql" or st.standard_conforming_strings):
            return self._decide_by_shape(sql, st, now, minute)
        self.misses += 1
        statements = entry[1] if entry is not None else inspect(sql, st)
        decision = self.engine.decide_all(self.peer, statements, now)
        if len(sql) <= MAX_CACHED_LENGTH:
            if entry is None and len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            timeless = self.engine.view(self.peer).timeless
            self._entries[key] = (-1 if timeless else minute, statements, decision)
        return statements, decision

    def _decide_by_shape(
        self, sql: str, st: SessionState, now: float, minute: int
    ) -> tuple[tuple[StatementInfo, ...], Decision]:
        if len(sql) > MAX_CACHED_LENGTH:
            form = None
        elif st.dialect == "mysql":
            form = mysql_shape.shape(sql, ansi_quotes=st.ansi_quotes)
        else:  # PostgreSQL with standard_conforming_strings on (see decide)
            fast = self.fast_shape
            form = fast(sql) if fast is not None else None
            if form is None:
                form = postgres.shape(sql)
        self.last_shape = form
        key = (st, form if form is not None else sql)
        entry = self._shapes.get(key) if form is not None else None
        if entry is not None and (entry[0] < 0 or entry[0] == minute):
            self.hits += 1
            self.shape_hits += 1
            return entry[1], entry[2]
        self.misses += 1
        statements = inspect(sql, st)
        decision = self.engine.decide_all(self.peer, statements, now)
        if len(sql) <= MAX_CACHED_LENGTH:
            timeless = self.engine.view(self.peer).timeless
            new: _Entry = (-1 if timeless else minute, statements, decision)
            _put(self._entries, (st, sql), new, self.size)
            if form is not None and len(statements) == 1 and statements[0].error is None:
                _put(self._shapes, key, new, self.size)
        return statements, decision

    def decide_statement(self, info: StatementInfo, now: float) -> Decision:
        """Decide an already-inspected statement (a prepared statement's body at EXECUTE)."""
        return self.engine.decide(self.peer, info, now)


def _put(
    cache: dict[tuple[SessionState, str], _Entry],
    key: tuple[SessionState, str],
    entry: _Entry,
    size: int,
) -> None:
    """Insert into a FIFO-bounded cache (dict order is insertion order)."""
    if key not in cache and len(cache) >= size:
        del cache[next(iter(cache))]
    cache[key] = entry

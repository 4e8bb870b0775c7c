"""The cached hot path a sidecar calls per statement: text -> (statements, decision).

One `SqlDecider` serves one route (a source app talking to one destination in one dialect).
Its cache is keyed by the exact statement text plus the session state; an entry is reused
while the engine is the same and, when any rule of the route has a time window, within the
same minute (windows have minute granularity, so the decision cannot change inside one).
"""

from __future__ import annotations

from policies.attributes import Peer
from policies.engine import Decision, Engine
from policies.sql.inspect import DEFAULT_CACHE_SIZE, MAX_CACHED_LENGTH, SessionState, inspect
from policies.sql.model import StatementInfo

_Entry = tuple[int, tuple[StatementInfo, ...], Decision]


class SqlDecider:
    __slots__ = ("_entries", "engine", "hits", "misses", "peer", "size", "state")

    def __init__(
        self, engine: Engine, peer: Peer, state: SessionState, size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.engine = engine
        self.peer = peer
        self.state = state
        self.size = size
        self._entries: dict[tuple[SessionState, str], _Entry] = {}
        self.hits = 0
        self.misses = 0

    def use(self, engine: Engine) -> None:
        """Switch to a new policy set (a reload): cached decisions are dropped."""
        self.engine = engine
        self._entries.clear()

    def decide(
        self, sql: str, now: float, state: SessionState | None = None
    ) -> tuple[tuple[StatementInfo, ...], Decision]:
        st = self.state if state is None else state
        key = (st, sql)
        minute = int(now // 60)
        entry = self._entries.get(key)
        if entry is not None and (entry[0] < 0 or entry[0] == minute):
            self.hits += 1
            return entry[1], entry[2]
        self.misses += 1
        statements = entry[1] if entry is not None else inspect(sql, st)
        decision = self.engine.decide_all(self.peer, statements, now)
        if len(sql) <= MAX_CACHED_LENGTH:
            if entry is None and len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            timeless = self.engine.view(self.peer).timeless
            self._entries[key] = (-1 if timeless else minute, statements, decision)
        return statements, decision

    def decide_statement(self, info: StatementInfo, now: float) -> Decision:
        """Decide an already-inspected statement (a prepared statement's body at EXECUTE)."""
        return self.engine.decide(self.peer, info, now)

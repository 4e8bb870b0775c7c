"""The cached hot path a sidecar calls per HTTP request: (method, host, path) -> decision.

One `HttpDecider` serves one route (a source app talking to one HTTP service). Decisions are
cached by method, host and path when no rule of the route looks at headers (with header
rules every request is decided afresh: header values are too varied to key a cache on).
Like `SqlDecider`, an entry is reused while the engine is the same and, when a rule of the
route has a time window, within the same minute.
"""

from __future__ import annotations

from policies.attributes import HttpRequest, Peer
from policies.engine import Decision, Engine

DEFAULT_HTTP_CACHE_SIZE = 4096

_Key = tuple[str, str, str]


class HttpDecider:
    __slots__ = ("_entries", "_headers", "_timeless", "engine", "hits", "misses", "peer", "size")

    def __init__(self, engine: Engine, peer: Peer, size: int = DEFAULT_HTTP_CACHE_SIZE) -> None:
        self.peer = peer
        self.size = size
        self._entries: dict[_Key, tuple[int, Decision]] = {}
        self.hits = 0
        self.misses = 0
        self.engine = engine
        self._headers = True
        self._timeless = False
        self.use(engine)

    def use(self, engine: Engine) -> None:
        """Switch to a new policy set (a reload): cached decisions are dropped."""
        self.engine = engine
        self._entries.clear()
        view = engine.view(self.peer)
        # Header rules, and limits keyed by a header, need every request decided afresh.
        self._headers = any(r.rule.reads_headers for r in view.rules)
        self._timeless = view.timeless

    @property
    def needs_headers(self) -> bool:
        """Whether a rule of this route matches on headers (the caller must pass them)."""
        return self._headers

    def decide(
        self,
        method: str,
        host: str,
        path: str,
        now: float,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Decision:
        if self._headers:
            self.misses += 1
            return self.engine.decide(self.peer, HttpRequest(method, path, host, headers), now)
        key = (method, host, path)
        minute = -1 if self._timeless else int(now // 60)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == minute:
            self.hits += 1
            return entry[1]
        self.misses += 1
        decision = self.engine.decide(self.peer, HttpRequest(method, path, host), now)
        if entry is None and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (minute, decision)
        return decision

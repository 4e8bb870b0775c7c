"""The cached hot path a sidecar calls per HTTP request: request attributes -> decision.

One `HttpDecider` serves one route (a source app talking to one HTTP service). Rules read
the method, host, path and, some of them, a few named headers; `header_names` tells the
caller which headers to pass (their values, in order of arrival), and decisions are cached
by (method, host, path, those headers). A rule can only see headers it names, so passing
only those changes no decision, and the cache key holds everything a decision depends on.
Like `SqlDecider`, an entry is reused while the engine is the same and, when a rule of the
route has a time window, within the same minute.
"""

from __future__ import annotations

from policies.attributes import HttpRequest, Peer
from policies.engine import Decision, Engine
from policies.spec import KeyAttribute

DEFAULT_HTTP_CACHE_SIZE = 4096
# Requests whose rule-read header values are longer than this in total are not cached.
MAX_CACHED_HEADERS = 512

Headers = tuple[tuple[str, str], ...]
_Key = tuple[str, str, str, Headers]


class HttpDecider:
    __slots__ = (
        "_entries",
        "_timeless",
        "engine",
        "header_names",
        "header_names_b",
        "hits",
        "misses",
        "peer",
        "size",
    )

    def __init__(self, engine: Engine, peer: Peer, size: int = DEFAULT_HTTP_CACHE_SIZE) -> None:
        self.peer = peer
        self.size = size
        self._entries: dict[_Key, tuple[int, Decision]] = {}
        self.hits = 0
        self.misses = 0
        self.engine = engine
        # Lower-case names of the headers some rule reads (a condition or a limit key).
        self.header_names: frozenset[str] = frozenset()
        self.header_names_b: frozenset[bytes] = frozenset()  # the same, as wire bytes
        self._timeless = False
        self.use(engine)

    def use(self, engine: Engine) -> None:
        """Switch to a new policy set (a reload): cached decisions are dropped."""
        self.engine = engine
        self._entries.clear()
        view = engine.view(self.peer)
        names: set[str] = set()
        for r in view.rules:
            if r.rule.http is not None:
                names.update(name for name, _values in r.rule.http.headers)
            limit = r.rule.limit
            key = limit.key if limit is not None else None
            if key is not None and key.attribute is KeyAttribute.HEADER:
                names.add(key.header)
        self.header_names = frozenset(names)
        self.header_names_b = frozenset(n.encode("latin-1") for n in names)
        self._timeless = view.timeless

    def decide(
        self, method: str, host: str, path: str, now: float, headers: Headers = ()
    ) -> Decision:
        """`headers`: (lower-case name, value) of the request's headers named in
        `header_names` (others may be passed too; they only make the key longer)."""
        if headers and sum(len(v) for _n, v in headers) > MAX_CACHED_HEADERS:
            self.misses += 1  # long values (tokens, cookies) would make a large cache
            return self.engine.decide(self.peer, HttpRequest(method, path, host, headers), now)
        key = (method, host, path, headers)
        minute = -1 if self._timeless else int(now // 60)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == minute:
            self.hits += 1
            return entry[1]
        self.misses += 1
        decision = self.engine.decide(self.peer, HttpRequest(method, path, host, headers), now)
        if entry is None and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (minute, decision)
        return decision

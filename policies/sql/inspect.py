"""Dialect dispatch and the bounded inspection cache.

Inspection results are cached by the exact statement text plus the session state that can
change its meaning (`SessionState`): never by a fingerprint that ignores constants, since
`DO $$ ... PERFORM 1 ... $$` and `DO $$ ... DROP TABLE users ... $$` share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from policies.sql.model import StatementInfo

Dialect = Literal["postgres", "mysql"]
DIALECTS: tuple[str, ...] = ("postgres", "mysql")

# Entries per cache. Statement texts of an app are few (prepared statements, ORM queries);
# texts with inlined constants are many, and past this bound the oldest are dropped first.
DEFAULT_CACHE_SIZE = 20_000
# Longer statements are inspected every time rather than pinned in memory by the cache.
MAX_CACHED_LENGTH = 16_384


@dataclass(frozen=True, slots=True)
class SessionState:
    """Session settings that change how SQL text is read (part of every cache key)."""

    dialect: Dialect = "postgres"
    standard_conforming_strings: bool = True  # PostgreSQL
    server_version: int = 101100  # MySQL/MariaDB: M*10000 + m*100 + p, for /*!NNNNN */
    mariadb: bool = True
    ansi_quotes: bool = False  # MySQL sql_mode ANSI_QUOTES
    no_backslash_escapes: bool = False  # MySQL sql_mode NO_BACKSLASH_ESCAPES
    # Every cache lookup hashes the state: the generated hash of six fields cost 0.24 µs a
    # time, twice per decision. Computed once here; equality still compares the fields.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self._values()))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[SessionState], tuple[str, bool, int, bool, bool, bool]]:
        # Rebuilt through __init__: a copy in another process (another string hash seed)
        # computes its own hash rather than carrying this one.
        return SessionState, self._values()

    def _values(self) -> tuple[str, bool, int, bool, bool, bool]:
        return (
            self.dialect,
            self.standard_conforming_strings,
            self.server_version,
            self.mariadb,
            self.ansi_quotes,
            self.no_backslash_escapes,
        )


_INTERNED: dict[tuple[Dialect, bool, int, bool, bool, bool], SessionState] = {}


def session_state(
    dialect: Dialect = "postgres",
    standard_conforming_strings: bool = True,
    server_version: int = 101100,
    mariadb: bool = True,
    ansi_quotes: bool = False,
    no_backslash_escapes: bool = False,
) -> SessionState:
    """The one `SessionState` with these values (the fields in their order). The decision
    caches key by the state: sessions that read text alike hand them the same object, and
    an identical key compares without a call to the generated `__eq__`."""
    key = (
        dialect,
        standard_conforming_strings,
        server_version,
        mariadb,
        ansi_quotes,
        no_backslash_escapes,
    )
    state = _INTERNED.get(key)
    if state is None:
        state = _INTERNED[key] = SessionState(*key)
    return state


POSTGRES = session_state()
MYSQL = session_state("mysql")


def inspect(sql: str, state: SessionState = POSTGRES) -> tuple[StatementInfo, ...]:
    """Inspect `sql` as the server described by `state` would read it (uncached)."""
    if state.dialect == "postgres":
        from policies.sql import postgres

        return postgres.inspect(sql, standard_conforming_strings=state.standard_conforming_strings)
    if state.dialect == "mysql":
        from policies.sql import mysql

        return mysql.inspect(
            sql,
            server_version=state.server_version,
            mariadb=state.mariadb,
            ansi_quotes=state.ansi_quotes,
            no_backslash_escapes=state.no_backslash_escapes,
        )
    raise ValueError(f"unknown SQL dialect {state.dialect!r}; expected one of {DIALECTS}")


class InspectionCache:
    """A bounded FIFO cache of inspections keyed by (state, exact text)."""

    __slots__ = ("_entries", "hits", "misses", "size")

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self.size = size
        self._entries: dict[tuple[SessionState, str], tuple[StatementInfo, ...]] = {}
        self.hits = 0
        self.misses = 0

    def inspect(self, sql: str, state: SessionState = POSTGRES) -> tuple[StatementInfo, ...]:
        key = (state, sql)
        hit = self._entries.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        result = inspect(sql, state)
        if len(sql) <= MAX_CACHED_LENGTH:
            if len(self._entries) >= self.size:
                # FIFO: dict order is insertion order, so the first key is the oldest.
                del self._entries[next(iter(self._entries))]
            self._entries[key] = result
        return result

    def __len__(self) -> int:
        return len(self._entries)


def split_and_inspect(sql: str, state: SessionState = POSTGRES) -> list[tuple[str, StatementInfo]]:
    """Inspect each statement of a script on its own, with its text, so that one statement
    that does not parse does not hide the others (for tools; the sidecar inspects a
    protocol message whole, as the server parses it)."""
    pieces = _split(sql, state)
    out: list[tuple[str, StatementInfo]] = []
    for piece in pieces:
        results = inspect(piece, state)
        if len(results) == 1:
            out.append((piece, results[0]))
        else:
            out.extend((piece, r) for r in results)
    return out


def _split(sql: str, state: SessionState) -> list[str]:
    if state.dialect == "postgres":
        from pglast import parser

        try:
            return [s.strip() for s in parser.split(sql, with_parser=False) if s.strip()]
        except Exception:  # the scanner rejects e.g. an unterminated quote: inspect it whole
            return [sql] if sql.strip() else []
    from policies.sql import mysql

    pieces = mysql.split(
        sql,
        server_version=state.server_version,
        mariadb=state.mariadb,
        ansi_quotes=state.ansi_quotes,
        no_backslash_escapes=state.no_backslash_escapes,
    )
    return [s for s in pieces if s.strip()]

"""Glob matchers compiled once: names (services, apps, tables, hosts) and URL paths.

Name globs: `*` any run of characters, `?` one character, `[abc]` a set; matched in full and
case-insensitively (service and table names are case-insensitive in practice, and matching
more is the safe side for a deny rule). Path globs: `*` stays within one segment, `**` spans
segments, and `/a/**` matches `/a` itself too.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@dataclass(frozen=True, slots=True)
class NameSet:
    """A set of name globs; exact names go through a frozenset, the rest through one regex."""

    patterns: tuple[str, ...]
    exact: frozenset[str]
    regex: re.Pattern[str] | None
    any: bool

    @classmethod
    def of(cls, patterns: list[str] | tuple[str, ...]) -> NameSet:
        exact = {p.lower() for p in patterns if not _is_glob(p)}
        globs = [p.lower() for p in patterns if _is_glob(p)]
        regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None
        )
        return cls(tuple(patterns), frozenset(exact), regex, "*" in patterns)

    def matches(self, name: str) -> bool:
        if self.any:
            return True
        low = name.lower()
        return low in self.exact or (self.regex is not None and self.regex.match(low) is not None)

    def describe(self) -> str:
        return "[" + ", ".join(self.patterns) + "]"


ANY_NAME = NameSet.of(["*"])


@dataclass(frozen=True, slots=True)
class TableSet:
    """Table globs. A pattern without a dot matches the relation name whatever its schema; one
    with a dot matches the qualified name, and also an unqualified reference by its name part,
    since the schema of an unqualified name depends on the session's search_path and a deny
    rule must not be dodged by leaving the schema out."""

    names: NameSet  # every pattern, matched against the full and the bare name
    bare: NameSet  # name parts of the qualified patterns, matched against unqualified names

    @classmethod
    def of(cls, patterns: list[str] | tuple[str, ...]) -> TableSet:
        bare = [p.rsplit(".", 1)[-1] for p in patterns if "." in p]
        return cls(NameSet.of(patterns), NameSet.of(bare) if bare else NameSet.of([]))

    def matches(self, table: str) -> bool:
        if self.names.matches(table):
            return True
        if "." in table:
            return self.names.matches(table.rsplit(".", 1)[-1])
        return self.bare.matches(table)

    def describe(self) -> str:
        return self.names.describe()


def compile_path_glob(pattern: str) -> re.Pattern[str]:
    """Compile a URL path glob; raises ValueError when it is not an absolute path."""
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern must start with '/', got {pattern!r}")
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("/**", i) and (i + 3 == len(pattern) or pattern[i + 3] == "/"):
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")

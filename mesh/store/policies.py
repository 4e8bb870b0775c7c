"""Versioned policy sets: validate, store, list, show, diff and roll back.

A policy set is a map of file names to YAML texts. `apply` validates it with
`policies.loader.load_texts`, exactly like `sluice policy check`, and stores it as the next
version (1, 2, ...) or raises `PolicyError` with every problem and stores nothing. Version 0
is the empty set that is current before anything was applied.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass

from mesh.store.db import Database
from policies.loader import load_texts

# File names travel to every sidecar, which keeps the last good set on disk under them:
# relative paths of plain segments only, so no name can escape the sidecar's directory.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_FILES = 1000


class UnknownVersion(LookupError):
    """A policy version that was never stored."""

    def __init__(self, version: int) -> None:
        super().__init__(f"no policy version {version}")
        self.version = version


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    created: float | None
    comment: str
    author: str
    files: tuple[str, ...]
    policies: int
    rules: int

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "created": self.created,
            "comment": self.comment,
            "author": self.author,
            "files": list(self.files),
            "policies": self.policies,
            "rules": self.rules,
        }


@dataclass(frozen=True, slots=True)
class PolicySet:
    version: int
    created: float | None
    comment: str
    author: str
    files: dict[str, str]

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "created": self.created,
            "comment": self.comment,
            "author": self.author,
            "files": dict(self.files),
        }


EMPTY = PolicySet(0, None, "", "", {})


def check_file_name(name: str) -> None:
    """Raise ValueError unless `name` is a safe relative *.yaml / *.yml path."""
    segments = name.split("/")
    if not name.endswith((".yaml", ".yml")):
        raise ValueError(f"file name {name!r} must end with .yaml or .yml")
    if not all(_SEGMENT.match(s) for s in segments) or len(segments) > 8:
        raise ValueError(
            f"file name {name!r}: expected a relative path of up to 8 segments of letters, "
            "digits, '_', '.' and '-' (not starting with '.' or '-')"
        )


class PolicyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def apply(self, files: dict[str, str], comment: str = "", author: str = "") -> VersionInfo:
        """Validate and store `files` as the next version; PolicyError (nothing stored) if not
        valid, ValueError for a bad file name."""
        if len(files) > MAX_FILES:
            raise ValueError(f"{len(files)} files; at most {MAX_FILES} per policy set")
        for name in files:
            check_file_name(name)
        policies = load_texts(sorted(files.items()))
        rules = sum(len(p.rules) for p in policies)
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT coalesce(max(version), 0) FROM policy_versions").fetchone()
            version = int(row[0]) + 1
            conn.execute(
                "INSERT INTO policy_versions VALUES (?, ?, ?, ?, ?, ?)",
                (version, now, comment, author, len(policies), rules),
            )
            conn.executemany(
                "INSERT INTO policy_files VALUES (?, ?, ?)",
                [(version, name, text) for name, text in sorted(files.items())],
            )
        return VersionInfo(
            version, now, comment, author, tuple(sorted(files)), len(policies), rules
        )

    def rollback(self, version: int, comment: str = "", author: str = "") -> VersionInfo:
        """A new version whose files equal `version`'s (validated again, like any apply)."""
        old = self.get(version)
        return self.apply(old.files, comment or f"rollback to version {version}", author)

    def current_version(self) -> int:
        with self.db.reading() as conn:
            row = conn.execute("SELECT coalesce(max(version), 0) FROM policy_versions").fetchone()
        return int(row[0])

    def current(self) -> PolicySet:
        version = self.current_version()
        return self.get(version) if version else EMPTY

    def get(self, version: int) -> PolicySet:
        with self.db.reading() as conn:
            head = conn.execute(
                "SELECT created, comment, author FROM policy_versions WHERE version = ?",
                (version,),
            ).fetchone()
            if head is None:
                raise UnknownVersion(version)
            rows = conn.execute(
                "SELECT name, text FROM policy_files WHERE version = ? ORDER BY name", (version,)
            ).fetchall()
        return PolicySet(version, head[0], head[1], head[2], {n: t for n, t in rows})

    def versions(self) -> list[VersionInfo]:
        """Every version, newest first."""
        with self.db.reading() as conn:
            heads = conn.execute(
                "SELECT version, created, comment, author, policies, rules "
                "FROM policy_versions ORDER BY version DESC"
            ).fetchall()
            names: dict[int, list[str]] = {}
            for version, name in conn.execute(
                "SELECT version, name FROM policy_files ORDER BY version, name"
            ):
                names.setdefault(version, []).append(name)
        return [
            VersionInfo(v, created, comment, author, tuple(names.get(v, ())), policies, rules)
            for v, created, comment, author, policies, rules in heads
        ]

    def diff(self, a: int, b: int) -> str:
        """A unified diff from version `a` to version `b` over all files (0 is the empty set)."""
        old = self.get(a).files if a else {}
        new = self.get(b).files if b else {}
        out: list[str] = []
        for name in sorted(set(old) | set(new)):
            if old.get(name) == new.get(name):
                continue
            out.extend(
                difflib.unified_diff(
                    _lines(old.get(name, "")),
                    _lines(new.get(name, "")),
                    fromfile=f"a/{name}" if name in old else "/dev/null",
                    tofile=f"b/{name}" if name in new else "/dev/null",
                )
            )
        return "".join(out)


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines

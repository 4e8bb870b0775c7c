"""The audit trail: ingest sidecars' events exactly once, query, export, count, expire.

Events are the sidecar's `AuditEvent` JSON (sidecar/audit.py). `id` is unique: an event
already stored is a duplicate and is dropped, so a sidecar may resend a batch whose answer
it lost. A batch is validated whole, then stored in one transaction (one `executemany`),
and the answer is the acknowledgement.

Queries are newest first with a keyset cursor over (time, id); the export is oldest first.
The list fields `verbs`, `tables` and `rules` are stored as JSON and, through a trigger, as
rows of `event_tags`, so filtering or grouping by one verb, table or rule is exact.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.store.db import Database

# Compact JSON with one encoder (json.dumps with separators builds a new one each call).
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode

MAX_LIMIT = 1000
EXPORT_PAGE = 1000
# Retention deletes this many events per transaction, so ingest is never held up for long.
DELETE_CHUNK = 5000
MAX_ID = 256
_INT64 = 2**63

# (field, type, required): the sidecar's AuditEvent. Types: str, str?, num, num?, int, int?,
# bool, [str]. Optional fields take the defaults in _DEFAULTS.
FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("id", "str", True),
    ("time", "num", True),
    ("app", "str", True),
    ("instance", "str", True),
    ("service", "str", True),
    ("session", "str", False),
    ("protocol", "str", False),
    ("decision", "str", True),
    ("action", "str", False),
    ("enforced", "bool", False),
    ("rules", "[str]", False),
    ("rule", "str?", False),
    ("verbs", "[str]", False),
    ("tables", "[str]", False),
    ("statement", "str", False),
    ("duration_ms", "num?", False),
    ("rows", "int?", False),
    ("error", "str?", False),
    ("policy_version", "int", False),
    ("would", "str?", False),  # a dry-run limit's verdict: reject | delay | null
    # HTTP requests only (null for SQL).
    ("method", "str?", False),
    ("host", "str?", False),
    ("path", "str?", False),
    ("status", "int?", False),
    ("bytes_in", "int?", False),
    ("bytes_out", "int?", False),
)
NAMES = tuple(name for name, _t, _r in FIELDS)
_DEFAULTS: dict[str, object] = {
    "session": "",
    "protocol": "",
    "action": "",
    "enforced": True,
    "rules": [],
    "rule": None,
    "verbs": [],
    "tables": [],
    "statement": "",
    "duration_ms": None,
    "rows": None,
    "error": None,
    "policy_version": 0,
    "would": None,
    "method": None,
    "host": None,
    "path": None,
    "status": None,
    "bytes_in": None,
    "bytes_out": None,
}
_LIST_FIELDS = frozenset({"rules", "verbs", "tables"})
TAG_KINDS = ("verb", "table", "rule")
COLUMN_GROUPS = ("app", "instance", "service", "decision")
GROUPS = COLUMN_GROUPS + TAG_KINDS
_COLUMNS = ", ".join(f"e.{n}" for n in NAMES)
_INSERT = (
    f"INSERT OR IGNORE INTO events ({', '.join(NAMES)}, received) "
    f"VALUES ({', '.join('?' * (len(NAMES) + 1))})"
)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which events: every field that is set must match (since <= time < until)."""

    since: float | None = None
    until: float | None = None
    app: str | None = None
    instance: str | None = None
    service: str | None = None
    decision: str | None = None
    verb: str | None = None
    table: str | None = None
    rule: str | None = None
    q: str | None = None

    def matches(self, event: dict[str, Any]) -> bool:
        """The same test as the SQL query, for events in memory (the live stream)."""
        t = event["time"]
        return (
            (self.since is None or t >= self.since)
            and (self.until is None or t < self.until)
            and all(getattr(self, f) is None or event[f] == getattr(self, f) for f in COLUMN_GROUPS)
            and (self.verb is None or self.verb in event["verbs"])
            and (self.table is None or self.table in event["tables"])
            and (self.rule is None or self.rule in event["rules"])
            and (self.q is None or self.q in event["statement"])
        )

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        args: list[object] = []
        if self.since is not None:
            clauses.append("e.time >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("e.time < ?")
            args.append(self.until)
        for f in COLUMN_GROUPS:
            value = getattr(self, f)
            if value is not None:
                clauses.append(f"e.{f} = ?")
                args.append(value)
        for kind in TAG_KINDS:
            value = getattr(self, kind)
            if value is not None:
                clauses.append(
                    "e.seq IN (SELECT event FROM event_tags WHERE kind = ? AND value = ?)"
                )
                args.extend((kind, value))
        if self.q is not None:
            clauses.append("instr(e.statement, ?) > 0")
            args.append(self.q)
        return (" AND ".join(clauses) or "1"), args


def validate(event: object, where: str = "event") -> dict[str, Any]:
    """The event with defaults filled in, or ValueError naming the bad field.

    The common case (every field present with its usual type, ASCII text) takes the fast
    loops; anything else goes through `_check`, which also words the error."""
    if type(event) is not dict:
        raise ValueError(f"{where}: expected a JSON object")
    out: dict[str, Any] = {}
    get = event.get
    for name in _STRS:
        v = get(name, _MISSING)
        out[name] = v if type(v) is str and v.isascii() else _slow(event, name, where)
    for name in _NUMS:
        v = get(name, _MISSING)
        out[name] = v if type(v) is float and -1e15 < v < 1e15 else _slow(event, name, where)
    for name in _LISTS:
        v = get(name, _MISSING)
        ok = type(v) is list and all(type(x) is str and x.isascii() for x in v)
        out[name] = v if ok else _slow(event, name, where)
    for name in _OTHERS:
        out[name] = _slow(event, name, where)
    if not out["id"] or len(out["id"]) > MAX_ID:
        raise ValueError(f"{where}.id: expected 1 to {MAX_ID} characters")
    return out


_MISSING = object()
_KINDS = {name: (kind, required) for name, kind, required in FIELDS}
_STRS = tuple(n for n, k, _r in FIELDS if k == "str")
_NUMS = tuple(n for n, k, _r in FIELDS if k == "num")
_LISTS = tuple(n for n, k, _r in FIELDS if k == "[str]")
_OTHERS = tuple(n for n, k, _r in FIELDS if k not in ("str", "num", "[str]"))


def _slow(event: dict[str, Any], name: str, where: str) -> object:
    kind, required = _KINDS[name]
    if name not in event:
        if required:
            raise ValueError(f"{where}.{name}: required field missing")
        value = _DEFAULTS[name]
        return list(value) if isinstance(value, list) else value
    return _check(event[name], kind, f"{where}.{name}")


def _check(value: object, kind: str, where: str) -> object:
    if value is None and kind.endswith("?"):
        return None
    base = kind.rstrip("?")
    if base == "str" and isinstance(value, str):
        return _text(value, where)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "num" and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and abs(value) < 1e15:
            return float(value)
        raise ValueError(f"{where}: expected a finite number")
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        if -_INT64 <= value < _INT64:
            return value
        raise ValueError(f"{where}: integer out of range")
    if base == "[str]" and isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return [_text(v, where) for v in value]
        raise ValueError(f"{where}: expected a list of strings")
    expected = {"str": "a string", "bool": "true or false", "num": "a number"}
    what = expected.get(base, "an integer" if base == "int" else "a list of strings")
    raise ValueError(f"{where}: expected {what}{' or null' if kind.endswith('?') else ''}")


def _text(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: not valid Unicode (lone surrogate)") from None
    return value


def encode_cursor(t: float, event_id: str) -> str:
    raw = _COMPACT([t, event_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        t, event_id = json.loads(raw)
        if isinstance(t, int | float) and not isinstance(t, bool) and isinstance(event_id, str):
            return float(t), event_id
    except (ValueError, TypeError, binascii.Error):
        pass
    raise ValueError("cursor: not a cursor this server gave out")


class AuditStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def ingest(self, events: Sequence[object]) -> tuple[list[dict[str, Any]], int]:
        """Validate the whole batch (ValueError: nothing stored), store the new events in one
        transaction; returns (the events stored, the number of duplicates)."""
        checked = [validate(e, f"events[{i}]") for i, e in enumerate(events)]
        unique: dict[str, dict[str, Any]] = {}
        for e in checked:
            unique.setdefault(e["id"], e)
        now = time.time()
        with self.db.transaction() as conn:
            ids = list(unique)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for (known,) in conn.execute(f"SELECT id FROM events WHERE id IN ({marks})", chunk):
                    del unique[known]
            fresh = list(unique.values())
            conn.executemany(_INSERT, [_row(e, now) for e in fresh])
        return fresh, len(checked) - len(fresh)

    def query(
        self, filt: AuditFilter, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; the cursor of the next page, or None after the last."""
        limit = max(1, min(limit, MAX_LIMIT))
        where, args = filt.where()
        if cursor is not None:
            t, event_id = decode_cursor(cursor)
            where += " AND (e.time, e.id) < (?, ?)"
            args += [t, event_id]
        sql = (
            f"SELECT {_COLUMNS} FROM events e WHERE {where} ORDER BY e.time DESC, e.id DESC LIMIT ?"
        )
        with self.db.reading() as conn:
            rows = conn.execute(sql, [*args, limit + 1]).fetchall()
        events = [_event(r) for r in rows[:limit]]
        more = len(rows) > limit
        return events, (encode_cursor(events[-1]["time"], events[-1]["id"]) if more else None)

    def export(self, filt: AuditFilter) -> Iterator[dict[str, Any]]:
        """Every matching event, oldest first, read in pages (the lock is not held between)."""
        where, args = filt.where()
        after: tuple[float, str] | None = None
        while True:
            clause = where + (" AND (e.time, e.id) > (?, ?)" if after else "")
            sql = f"SELECT {_COLUMNS} FROM events e WHERE {clause} ORDER BY e.time, e.id LIMIT ?"
            with self.db.reading() as conn:
                rows = conn.execute(sql, [*args, *(after or ()), EXPORT_PAGE]).fetchall()
            for r in rows:
                yield _event(r)
            if len(rows) < EXPORT_PAGE:
                return
            after = (rows[-1][1], rows[-1][0])

    def stats(
        self, window: float, group_by: Sequence[str], filt: AuditFilter, now: float | None = None
    ) -> dict[str, Any]:
        """Counts per group over [until - window, until), until = filt.until or now. A group
        by verb, table or rule counts an event once per verb, table or rule it has."""
        for g in group_by:
            if g not in GROUPS:
                raise ValueError(f"group_by: unknown {g!r}; expected some of {', '.join(GROUPS)}")
        until = filt.until if filt.until is not None else (time.time() if now is None else now)
        since = until - window
        if filt.since is not None:
            since = max(since, filt.since)
        bounded = AuditFilter(**{**_fields(filt), "since": since, "until": until})
        where, args = bounded.where()
        joins, keys = [], []
        for g in dict.fromkeys(group_by):
            if g in TAG_KINDS:
                joins.append(
                    f"LEFT JOIN event_tags g_{g} ON g_{g}.event = e.seq AND g_{g}.kind = ?"
                )
                keys.append(f"g_{g}.value")
            else:
                keys.append(f"e.{g}")
        tag_args = [g for g in dict.fromkeys(group_by) if g in TAG_KINDS]
        select = ", ".join([*keys, "count(*)"])
        sql = f"SELECT {select} FROM events e {' '.join(joins)} WHERE {where}"
        if keys:
            sql += f" GROUP BY {', '.join(keys)} ORDER BY count(*) DESC, {', '.join(keys)}"
        with self.db.reading() as conn:
            rows = conn.execute(sql, [*tag_args, *args]).fetchall()
        names = list(dict.fromkeys(group_by))
        groups = [
            {
                "key": dict(zip(names, r[:-1], strict=True)),
                "count": r[-1],
                "per_second": r[-1] / window if window > 0 else 0.0,
            }
            for r in rows
        ]
        return {"window": window, "since": since, "until": until, "groups": groups}

    def count(self) -> int:
        with self.db.reading() as conn:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])

    def delete_older_than(self, ts: float) -> int:
        """Delete events with time < ts, in chunks; returns how many."""
        deleted = 0
        while True:
            with self.db.transaction() as conn:
                seqs = [
                    (s,)
                    for (s,) in conn.execute(
                        "SELECT seq FROM events WHERE time < ? LIMIT ?", (ts, DELETE_CHUNK)
                    )
                ]
                conn.executemany("DELETE FROM event_tags WHERE event = ?", seqs)
                conn.executemany("DELETE FROM events WHERE seq = ?", seqs)
            deleted += len(seqs)
            if len(seqs) < DELETE_CHUNK:
                return deleted


def _fields(filt: AuditFilter) -> dict[str, Any]:
    return {f: getattr(filt, f) for f in AuditFilter.__dataclass_fields__}


def _row(e: dict[str, Any], received: float) -> tuple[object, ...]:
    return (
        *(
            _COMPACT(e[n]) if n in _LIST_FIELDS else int(e[n]) if n == "enforced" else e[n]
            for n in NAMES
        ),
        received,
    )


def _event(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(NAMES, row, strict=True))
    for n in _LIST_FIELDS:
        out[n] = json.loads(out[n])
    out["enforced"] = bool(out["enforced"])
    return out

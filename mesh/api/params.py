"""Query parameters shared by routes: durations ("30s", "5m"), times and audit filters.

Bad values raise `ApiError(422)` naming the parameter and what was expected.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Query

from mesh.api.errors import ApiError
from mesh.store.audit import AuditFilter

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# Far enough for any audit question, small enough that arithmetic on it stays exact.
MAX_SECONDS = 100 * 365 * 86400.0
MAX_TEXT = 1024


def parse_duration(text: str, what: str = "duration") -> float:
    """'30s', '5m', '1.5h', '30d', '250ms' or plain seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{what}: expected a duration like 30s, 5m, 2h or 30d, got {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ValueError(f"{what}: {text!r} is too long")
    return seconds


def parse_time(text: str, what: str) -> float:
    """Unix seconds or ISO 8601 (naive means UTC) -> unix seconds."""
    try:
        value = float(text)
        if math.isfinite(value) and abs(value) <= 1e12:
            return value
        raise ValueError(text)
    except ValueError:
        pass
    iso = text.strip()
    if iso.endswith(("Z", "z")):
        iso = iso[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{what}: expected unix seconds or ISO 8601 (2026-03-29T01:30:00Z), got {text!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def duration(text: str, what: str) -> float:
    try:
        return parse_duration(text, what)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid request") from None


def audit_filter(
    since: str | None = Query(None, description="unix seconds or ISO 8601; inclusive"),
    until: str | None = Query(None, description="unix seconds or ISO 8601; exclusive"),
    app: str | None = Query(None, max_length=MAX_TEXT),
    instance: str | None = Query(None, max_length=MAX_TEXT),
    service: str | None = Query(None, max_length=MAX_TEXT),
    decision: str | None = Query(None, max_length=MAX_TEXT),
    verb: str | None = Query(None, max_length=MAX_TEXT),
    table: str | None = Query(None, max_length=MAX_TEXT),
    rule: str | None = Query(None, max_length=MAX_TEXT),
    q: str | None = Query(None, max_length=MAX_TEXT, description="substring of the statement"),
) -> AuditFilter:
    try:
        start = parse_time(since, "since") if since is not None else None
        end = parse_time(until, "until") if until is not None else None
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid request") from None
    return AuditFilter(start, end, app, instance, service, decision, verb, table, rule, q)


Filter = Annotated[AuditFilter, Depends(audit_filter)]

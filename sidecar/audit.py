"""Audit events for every decision, and the local JSON-lines sink.

The sidecar turns each decided statement into an `AuditEvent` once the server has answered
(so it carries duration, rows and the error code) and hands it to a sink. The control
plane's durable spool (`sidecar/spool.py`) implements the same `AuditSink` protocol;
`TeeSink` feeds it and a local sink at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import time
from dataclasses import dataclass, fields
from typing import BinaryIO, Protocol

import orjson

log = logging.getLogger("sluice.audit")

# Events are written in batches: at most this many buffered, or this old, before a flush.
FLUSH_EVERY = 256
FLUSH_AFTER = 0.2


@dataclass(slots=True)
class AuditEvent:
    """One decision, as the audit trail records it. Not frozen, though nothing changes an
    event once made: a frozen dataclass sets each of its 27 fields through
    `object.__setattr__`, which made building one cost 3 µs instead of 1, once per audited
    statement on the data path."""

    id: str  # unique per event: "<instance>-<boot>-<seq>"
    time: float  # UNIX seconds when the statement arrived
    app: str
    instance: str
    service: str
    session: str
    protocol: str
    decision: str  # what was applied: allow | deny | reject (limit exceeded) | delay
    action: str  # what the policies say counting dry-run rules: allow | deny | limit
    enforced: bool
    rules: tuple[str, ...]
    rule: str | None
    verbs: tuple[str, ...]
    tables: tuple[str, ...]
    statement: str  # literals masked unless full statements are configured
    duration_ms: float | None = None
    rows: int | None = None
    error: str | None = None  # SQLSTATE of a failure, ours (42501, 53400) or the server's
    policy_version: int = 0
    # What a dry-run limit rule would have done to this statement: reject | delay, or None.
    would: str | None = None
    # HTTP requests (protocol "http"): `verbs` holds the method and `statement` the request
    # line without the query string (with it when full statements are configured).
    method: str | None = None
    host: str | None = None
    path: str | None = None
    status: int | None = None  # the response's status code, ours (403, 429) or the server's
    bytes_in: int | None = None  # request bytes from the app, head and body
    bytes_out: int | None = None  # response bytes to the app

    def to_line(self) -> bytes:
        """The event as one line of compact JSON (UTF-8, no newline): what the sinks write.

        orjson encodes the dataclass directly in about 2 µs; the standard library's encoder
        took 8, with a dict built first. Text orjson refuses (a lone surrogate, which no
        decoder on the data path produces) falls back to the standard encoder, which
        escapes it, so an event is never lost to its encoding."""
        try:
            return orjson.dumps(self)
        except orjson.JSONEncodeError:
            return _ENCODE(dict(zip(_FIELDS, _VALUES(self), strict=True))).encode()

    def to_json(self) -> str:
        return self.to_line().decode()


_FIELDS = tuple(f.name for f in fields(AuditEvent))
_VALUES = operator.attrgetter(*_FIELDS)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class AuditSink(Protocol):
    def record(self, event: AuditEvent) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends events to a file as JSON lines, in batches. A write failure (a full disk)
    is logged and counted in `dropped`; it never stops the data path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self.dropped = 0
        self._buffer: list[bytes] = []
        self._oldest = 0.0
        self._file: BinaryIO | None = None

    def record(self, event: AuditEvent) -> None:
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(event.to_line())
        if len(self._buffer) >= FLUSH_EVERY or time.monotonic() - self._oldest > FLUSH_AFTER:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
            self.written += len(lines)
        except OSError as exc:
            self.dropped += len(lines)
            log.error("audit sink %s: %d events dropped: %s", self.path, len(lines), exc)
            self._reopen()

    def _reopen(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._file.fileno())
        self._reopen()


class MemorySink:
    """Keeps events in a list (for `sluice sidecar` without a sink path, and for tests)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.events: list[AuditEvent] = []
        self.limit = limit

    def record(self, event: AuditEvent) -> None:
        if len(self.events) >= self.limit:
            del self.events[: self.limit // 2]
        self.events.append(event)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TeeSink:
    """Hands every event to several sinks (the spool for the control plane, and a local
    JSON-lines file when one is configured)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = sinks

    def record(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            sink.record(event)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

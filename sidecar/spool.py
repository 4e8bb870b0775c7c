"""The audit spool: a durable, bounded queue of audit events on disk, between the data path
and the control-plane shipper.

Events are JSON lines appended to numbered segment files in one directory (`<state-dir>/
spool/0000000000000001.jsonl`, ...). `record` only buffers (the data path never waits on a
disk); every `WRITE_EVERY` events the buffer is written, and `flush` (the sidecar calls it
every 0.2 s) writes and fsyncs: one fsync per batch, never per event. The shipper reads the
oldest unacknowledged batch (`read_batch`) and, once the control plane has stored it,
acknowledges it (`ack`): the position is persisted in `ack` (written atomically) and wholly
acknowledged segments are deleted.

Crash safety: after a kill -9 everything flushed and not acknowledged is still there; a
reopened spool always starts a new segment, so a torn last line (a write cut short) is only
ever at the end of a sealed segment, where it is skipped and counted in `corrupt`. Events
that were acknowledged by the server but whose `ack` write was lost are sent again; the
control plane drops them as duplicates by id.

Bounds: at most `max_bytes` (default 256 MiB) of segments on disk. When the spool is full,
NEW events are dropped and counted in `dropped` (the oldest are kept: they are what the
control plane has not seen yet); a failed write (a full disk, ENOSPC, or any OSError) drops
that batch and counts it likewise. Either way a warning is logged at most once a minute, and
the data path is never blocked. One sidecar owns a spool directory (an exclusive flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sidecar.audit import AuditEvent

log = logging.getLogger("sluice.spool")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# A segment is deleted only when all of it is acknowledged: small enough that acknowledged
# bytes are freed soon, large enough that a busy sidecar does not create thousands of files.
MAX_SEGMENT_BYTES = 8 * 1024 * 1024
MIN_SEGMENT_BYTES = 4096
# Buffered events written (without fsync) at this count; `flush` writes and fsyncs the rest.
WRITE_EVERY = 256
# A line longer than this is not an event we wrote: skip it instead of reading it whole.
MAX_LINE = 16 * 1024 * 1024
# Drops and write failures are logged at most this often (seconds).
LOG_EVERY = 60.0
# read_batch skips at most this many all-corrupt batches per call (a bound, not a limit
# anyone reaches: the next call goes on).
MAX_SKIPS = 64

_SEGMENT = re.compile(r"^(\d{16})\.jsonl$")
Position = tuple[int, int]  # (segment number, byte offset in it)


class SpoolBusy(OSError):
    """Another process holds the spool directory."""


@dataclass(frozen=True, slots=True)
class Batch:
    """The oldest unacknowledged events: their JSON lines (validated), and where they end."""

    lines: tuple[bytes, ...]
    end: Position
    corrupt: int  # lines skipped inside this batch (torn or not an event)

    def body(self) -> bytes:
        """The `POST /v1/audit/events` body, built from the stored lines as they are."""
        return b'{"events":[' + b",".join(self.lines) + b"]}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Spool:
    """Implements `AuditSink` (record/flush/close) for the data path, and read_batch/ack for
    the shipper. Single-threaded: everything runs on the sidecar's event loop."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(
            MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, max_bytes // 8)
        )
        self.clock = clock
        self.spooled = 0  # events written to disk by this process
        self.dropped = 0  # events lost: spool full or a failed write
        self.corrupt = 0  # lines skipped when reading (torn by a crash, or not an event)
        self.pending = 0  # lines on disk not yet acknowledged
        self.rejected = 0  # events the control plane refused, moved to rejected.jsonl
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._segments: dict[int, int] = {}  # number -> size, oldest first
        self._disk = 0
        self._fd: int | None = None
        self._active: int | None = None
        self._unsynced = False
        self._closed = False
        self._last_log = float("-inf")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()
        try:
            self._ack = self._open_existing()
        except BaseException:
            os.close(self._lock)
            raise

    # the data path (AuditSink)

    def record(self, event: AuditEvent) -> None:
        line = event.to_line()
        size = len(line) + 1
        if self._closed or self._disk + self._buffered + size > self.max_bytes:
            self.dropped += 1
            self._warn("audit spool %s full (%d bytes): new events dropped", self.dir, self._disk)
            return
        self._buffer.append(line)
        self._buffered += size
        if len(self._buffer) >= WRITE_EVERY:
            self._write()

    def flush(self) -> None:
        """Write what is buffered and fsync: the events are durable when this returns."""
        self._write()
        if self._unsynced and self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:  # the kernel may have lost pages: start a new segment
                self._warn("audit spool %s: fsync failed: %s", self.dir, exc)
                self._seal()
        self._unsynced = False

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._seal()
        self._closed = True
        os.close(self._lock)

    # the shipper

    def read_batch(self, limit: int = 500) -> Batch | None:
        """The oldest unacknowledged events, at most `limit`; None when there are none.
        Reading does not consume: the same batch comes back until it is acknowledged."""
        self._write()  # buffered events become readable (fsync follows with flush)
        for _ in range(MAX_SKIPS):
            batch = self._read(limit)
            if batch is None or batch.lines:
                return batch
            self._commit(batch.end, batch.corrupt, 0)  # only skipped lines: pass them
        return None

    def ack(self, batch: Batch) -> None:
        """The control plane has stored `batch`: never send it again."""
        if batch.end <= self._ack:
            return
        self._commit(batch.end, batch.corrupt, len(batch.lines))

    def reject(self, batch: Batch) -> None:
        """The control plane refused these events for good (a 4xx that is not about auth):
        keep them beside the spool in rejected.jsonl for a person, and go past them."""
        try:
            with open(self.dir / "rejected.jsonl", "ab") as f:
                f.write(b"".join(line + b"\n" for line in batch.lines))
        except OSError as exc:
            self._warn("audit spool %s: cannot keep rejected events: %s", self.dir, exc)
        self.rejected += len(batch.lines)
        self._commit(batch.end, batch.corrupt, len(batch.lines))

    @property
    def disk_bytes(self) -> int:
        return self._disk

    # internals

    def _take_lock(self) -> int:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"audit spool {self.dir} is in use by another sidecar") from None
        return fd

    def _open_existing(self) -> Position:
        for entry in sorted(os.listdir(self.dir)):
            m = _SEGMENT.match(entry)
            if m:
                self._segments[int(m.group(1))] = (self.dir / entry).stat().st_size
        ack = self._read_ack()
        for number in [n for n in self._segments if n < ack[0]]:
            self._delete(number)
        if ack[0] not in self._segments:
            ack = (min(self._segments, default=ack[0]), 0)
        self._disk = sum(self._segments.values())
        self._next = max(self._segments, default=ack[0]) + 1
        self.pending = self._count_lines(ack)
        if self._segments:
            log.info(
                "audit spool %s: %d events from before the restart to ship",
                self.dir,
                self.pending,
            )
        return ack

    def _read_ack(self) -> Position:
        try:
            raw = json.loads((self.dir / "ack").read_text(encoding="utf-8"))
            return (int(raw["segment"]), int(raw["offset"]))
        except FileNotFoundError:
            return (0, 0)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Without a position everything on disk is sent again: duplicates, not losses.
            log.warning("audit spool %s: ack file unreadable (%s); resending all", self.dir, exc)
            return (0, 0)

    def _count_lines(self, start: Position) -> int:
        count = 0
        for number in sorted(self._segments):
            if number < start[0]:
                continue
            with contextlib.suppress(OSError), open(self._path(number), "rb") as f:
                f.seek(start[1] if number == start[0] else 0)
                while chunk := f.read(1 << 20):
                    count += chunk.count(b"\n")
        return count

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:016d}.jsonl"

    def _write(self) -> None:
        if not self._buffer:
            return
        data = b"".join(line + b"\n" for line in self._buffer)
        count = len(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        try:
            if self._fd is None:
                self._open_segment()
            assert self._fd is not None and self._active is not None
            _write_all(self._fd, data)
        except OSError as exc:
            self.dropped += count
            self._warn("audit spool %s: %d events dropped: %s", self.dir, count, exc)
            self._undo_partial_write()
            return
        self._segments[self._active] += len(data)
        self._disk += len(data)
        self.spooled += count
        self.pending += count
        self._unsynced = True
        if self._segments[self._active] >= self.segment_bytes:
            self.flush()
            self._seal()

    def _open_segment(self) -> None:
        number = self._next
        self._next += 1
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._fd, self._active = fd, number
        self._segments[number] = 0
        self._sync_dir()

    def _undo_partial_write(self) -> None:
        """A write failed midway: cut the segment back to its last whole line, or seal it
        (its torn tail is then skipped and counted as corrupt when read)."""
        if self._fd is None or self._active is None:
            return
        try:
            os.ftruncate(self._fd, self._segments[self._active])
        except OSError:
            self._seal()

    def _seal(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self._unsynced:
                    os.fsync(self._fd)
            os.close(self._fd)
        self._fd, self._active, self._unsynced = None, None, False

    def _read(self, limit: int) -> Batch | None:
        start = self._ack
        lines: list[bytes] = []
        corrupt = 0
        end = start
        for number in sorted(n for n in self._segments if n >= start[0]):
            offset = start[1] if number == start[0] else 0
            try:
                f = open(self._path(number), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:  # removed by hand: nothing of it to send
                self._forget(number)
                continue
            with f:
                f.seek(offset)
                while len(lines) < limit:
                    raw = f.readline(MAX_LINE)
                    if not raw:
                        break
                    if not raw.endswith(b"\n"):
                        if number == self._active:
                            break  # being written by us right now; not torn
                        if len(raw) == MAX_LINE:
                            offset += _skip_line(f)
                        corrupt += 1  # a torn tail, or an absurdly long line
                    elif _is_event(raw[:-1]):
                        lines.append(raw[:-1])
                    else:
                        corrupt += 1
                    offset += len(raw)
                    end = (number, offset)
            if len(lines) >= limit or number == self._active:
                break
            end = (number, max(offset, self._segments.get(number, 0)))
        if end == start:
            return None
        return Batch(tuple(lines), end, corrupt)

    def _commit(self, end: Position, corrupt: int, events: int) -> None:
        self._ack = end
        self.corrupt += corrupt
        self.pending = max(0, self.pending - events - corrupt)
        for number in list(self._segments):
            whole = number < end[0] or (number == end[0] and end[1] >= self._segments[number])
            if not whole:
                continue
            if number == self._active:
                self._seal()  # all of the active segment is acknowledged: start afresh
            self._delete(number)
        self._save_ack()

    def _save_ack(self) -> None:
        tmp = self.dir / "ack.tmp"
        data = json.dumps({"segment": self._ack[0], "offset": self._ack[1]}).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir / "ack")
            self._sync_dir()
        except OSError as exc:  # after a restart these events are sent again (duplicates)
            self._warn("audit spool %s: cannot save the ack position: %s", self.dir, exc)

    def _delete(self, number: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(number))
        self._forget(number)

    def _forget(self, number: int) -> None:
        self._disk -= self._segments.pop(number, 0)

    def _sync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _warn(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            suffix = " (%d dropped so far; next report in a minute)"
            log.warning(message + suffix, *args, self.dropped)


def _is_event(line: bytes) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("id"), str)


def _skip_line(f: BinaryIO) -> int:
    """Read on to the end of an over-long line; returns how many bytes were skipped."""
    skipped = 0
    while True:
        chunk = f.readline(MAX_LINE)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped

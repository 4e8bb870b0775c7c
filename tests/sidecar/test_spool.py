"""The audit spool: order, acknowledgement, kill -9, torn lines, bounds, failed writes."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sidecar.spool as spool_mod
from sidecar.audit import AuditEvent
from sidecar.spool import Batch, Spool, SpoolBusy
from tests.audit_events import audit_event

REPO = Path(__file__).resolve().parents[2]


def event(n: int, statement: str = "SELECT 1") -> AuditEvent:
    return audit_event(f"billing-1-boot-{n}", 1_700_000_000.0 + n, statement=statement)


def ids(batch: Batch | None) -> list[str]:
    assert batch is not None
    return [json.loads(line)["id"] for line in batch.lines]


def drain(spool: Spool, limit: int = 500) -> list[str]:
    """Read and acknowledge everything; the ids in the order read."""
    out: list[str] = []
    for _ in range(10_000):
        batch = spool.read_batch(limit)
        if batch is None:
            return out
        out += ids(batch)
        spool.ack(batch)
    raise AssertionError("spool never ran dry")


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def test_events_come_back_in_order_until_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(1200):
        spool.record(event(n))
    spool.flush()
    first = spool.read_batch(500)
    assert ids(first) == [f"billing-1-boot-{n}" for n in range(500)]
    assert ids(spool.read_batch(500)) == ids(first)  # reading does not consume
    assert first is not None
    spool.ack(first)
    spool.ack(first)  # a second ack of the same batch changes nothing
    assert ids(spool.read_batch(1000))[0] == "billing-1-boot-500"
    assert drain(spool) == [f"billing-1-boot-{n}" for n in range(500, 1200)]
    assert (spool.spooled, spool.dropped, spool.corrupt, spool.pending) == (1200, 0, 0, 0)
    assert spool.read_batch() is None
    spool.close()


def test_batch_body_is_the_api_request(tmp_path: Path) -> None:
    with_spool = Spool(tmp_path)
    for n in range(3):
        with_spool.record(event(n, statement='SELECT "é", $1'))
    batch = with_spool.read_batch()
    assert batch is not None
    body = json.loads(batch.body())
    assert [e["id"] for e in body["events"]] == ids(batch)
    assert body["events"][0]["statement"] == 'SELECT "é", $1'
    with_spool.close()


def test_ack_survives_a_clean_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(10):
        spool.record(event(n))
    batch = spool.read_batch(4)
    assert batch is not None
    spool.ack(batch)
    spool.close()
    again = Spool(tmp_path)
    assert again.pending == 6
    assert drain(again) == [f"billing-1-boot-{n}" for n in range(4, 10)]
    again.close()


def test_kill_9_keeps_everything_flushed_and_not_acknowledged(tmp_path: Path) -> None:
    # A real kill -9 of a process holding the spool: no close, no atexit, no buffers flushed.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from sidecar.spool import Spool
        from tests.sidecar.test_spool import event
        spool = Spool({str(tmp_path)!r})
        for n in range(1000):
            spool.record(event(n))
        spool.flush()
        batch = spool.read_batch(300)
        spool.ack(batch)              # the control plane has the first 300
        for n in range(1000, 1010):
            spool.record(event(n))    # buffered, never flushed: lost with the process
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    spool = Spool(tmp_path)  # the lock died with the process
    assert spool.pending == 700
    assert drain(spool) == [f"billing-1-boot-{n}" for n in range(300, 1000)]
    assert spool.corrupt == 0
    spool.close()


def test_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(5):
        spool.record(event(n))
    spool.flush()
    # What a crash in the middle of a write leaves: half a line, no newline.
    last = segments(tmp_path)[-1]
    with open(last, "ab") as f:
        f.write(event(5).to_json().encode()[:40])
    # Drop the spool as a crash would: descriptors closed by the kernel, nothing flushed.
    assert spool._fd is not None
    os.close(spool._fd)
    os.close(spool._lock)
    reopened = Spool(tmp_path)
    reopened.record(event(6))  # goes to a new segment, never glued to the torn line
    reopened.flush()
    assert len(segments(tmp_path)) == 2
    assert drain(reopened) == [f"billing-1-boot-{n}" for n in (0, 1, 2, 3, 4, 6)]
    assert reopened.corrupt == 1
    reopened.close()


def test_a_line_that_is_not_an_event_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.record(event(0))
    spool.close()
    with open(segments(tmp_path)[0], "ab") as f:
        f.write(b"not json\n[1, 2]\n" + event(1).to_json().encode() + b"\n")
    spool = Spool(tmp_path)
    assert drain(spool) == ["billing-1-boot-0", "billing-1-boot-1"]
    assert spool.corrupt == 2
    spool.close()


def test_a_batch_of_only_corrupt_lines_is_passed_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.record(event(0))
    spool.close()
    (tmp_path / "0000000000000001.jsonl").write_bytes(b"garbage\n" * 10)
    spool = Spool(tmp_path)
    assert spool.read_batch(5) is None
    assert spool.corrupt == 10
    assert segments(tmp_path) == []  # wholly passed over: deleted
    spool.close()


def test_full_spool_drops_new_events_and_counts_them(tmp_path: Path) -> None:
    size = len(event(0).to_json()) + 1
    spool = Spool(tmp_path, max_bytes=size * 10, segment_bytes=size * 4)
    for n in range(25):
        spool.record(event(n))
        spool.flush()  # one write per event: segments of 4 lines each
    assert (spool.spooled, spool.dropped) == (10, 15)
    assert spool.disk_bytes <= spool.max_bytes
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= spool.max_bytes
    # The oldest are kept: they are what the control plane has not seen.
    batch = spool.read_batch(4)
    assert ids(batch) == [f"billing-1-boot-{n}" for n in range(4)]
    assert batch is not None
    spool.ack(batch)  # a whole segment acknowledged: deleted, room for new events
    for n in range(100, 103):  # ids 2 bytes longer: 3 fit where 4 freed
        spool.record(event(n))
    spool.flush()
    assert spool.dropped == 15
    assert drain(spool) == [f"billing-1-boot-{n}" for n in (*range(4, 10), *range(100, 103))]
    spool.close()


def test_segments_roll_and_are_deleted_once_acknowledged(tmp_path: Path) -> None:
    size = len(event(0).to_json()) + 1
    spool = Spool(tmp_path, segment_bytes=size * 3)
    for n in range(10):
        spool.record(event(n))
        spool.flush()
    assert len(segments(tmp_path)) == 4
    assert drain(spool, limit=2) == [f"billing-1-boot-{n}" for n in range(10)]
    assert segments(tmp_path) == []
    assert spool.disk_bytes == 0
    spool.record(event(10))
    spool.flush()
    assert len(segments(tmp_path)) == 1
    spool.close()


def test_a_failed_write_drops_that_batch_and_logs_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, clock=lambda: now[0])
    spool.record(event(0))
    spool.flush()
    spool.read_batch()  # nothing acknowledged: the segment stays
    batch = spool.read_batch()
    assert batch is not None
    spool.ack(batch)  # the active segment is wholly acknowledged: sealed and deleted
    # The directory vanishes and a file takes its place: every segment open fails (as
    # root too, unlike a read-only directory).
    shutil.rmtree(spool_dir)
    spool_dir.write_text("in the way")
    with caplog.at_level(logging.WARNING, logger="sluice.spool"):
        for n in range(1, 4):
            spool.record(event(n))
            spool.flush()
        now[0] += 61
        spool.record(event(4))
        spool.flush()
    assert spool.dropped == 4
    assert spool.spooled == 1
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 2  # the first failure, then one a minute later
    spool_dir.unlink()
    spool_dir.mkdir()
    spool.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_drops_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    tmp_path.chmod(0o500)
    try:
        spool.record(event(0))
        spool.flush()
        assert (spool.spooled, spool.dropped) == (0, 1)
    finally:
        tmp_path.chmod(0o700)
        spool.close()


def test_disk_full_midway_cuts_the_segment_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.record(event(0))
    spool.flush()
    real = spool_mod._write_all

    def half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "_write_all", half_then_enospc)
    spool.record(event(1))
    spool.record(event(2))
    spool.flush()
    assert spool.dropped == 2
    monkeypatch.setattr(spool_mod, "_write_all", real)
    spool.record(event(3))
    spool.flush()
    assert drain(spool) == ["billing-1-boot-0", "billing-1-boot-3"]
    assert spool.corrupt == 0  # the half line was cut off, not left torn
    spool.close()


def test_one_sidecar_per_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolBusy, match="in use"):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()


def test_rejected_events_are_kept_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.record(event(0))
    spool.record(event(1))
    batch = spool.read_batch(1)
    assert batch is not None
    spool.reject(batch)
    assert spool.rejected == 1
    assert drain(spool) == ["billing-1-boot-1"]
    rejected = (tmp_path / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in rejected] == ["billing-1-boot-0"]
    spool.close()


def test_closed_spool_drops(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.close()
    spool.close()
    spool.record(event(0))
    assert spool.dropped == 1


# Operations: ("record", k) k events; ("ship", limit) read and acknowledge one batch;
# ("lose", limit) read a batch and lose the answer; ("restart", 0) close and reopen.
_ops = st.lists(
    st.tuples(st.sampled_from(["record", "ship", "lose", "restart"]), st.integers(1, 40)),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_ops, segment_lines=st.integers(1, 12))
def test_every_event_is_delivered_once_in_order(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]], segment_lines: int
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    size = len(event(0).to_json()) + 1
    spool = Spool(directory, segment_bytes=size * segment_lines)
    recorded: list[str] = []
    delivered: list[str] = []
    for op, k in ops:
        if op == "record":
            for _ in range(k):
                recorded.append(f"billing-1-boot-{len(recorded)}")
                spool.record(event(len(recorded) - 1))
        elif op in ("ship", "lose"):
            batch = spool.read_batch(k)
            if batch is not None and op == "ship":
                delivered += ids(batch)
                spool.ack(batch)
        else:
            spool.close()
            spool = Spool(directory, segment_bytes=size * segment_lines)
    delivered += drain(spool, limit=7)
    spool.close()
    assert delivered == recorded
    assert segments(directory) == []

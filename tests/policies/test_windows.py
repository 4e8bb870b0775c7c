"""Time windows follow the local wall clock, across midnight and across real DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from policies.windows import Clock, WindowSyntaxError, local_time, parse_window

LONDON = ZoneInfo("Europe/London")
NEW_YORK = ZoneInfo("America/New_York")


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def active_minutes(window_text: str, zone: ZoneInfo, start_utc: str, hours: int) -> list[str]:
    """The UTC minutes in [start, start+hours) during which the window is active."""
    w = parse_window(window_text, None)
    t0 = datetime.fromisoformat(start_utc)
    out = []
    for m in range(hours * 60):
        t = t0 + timedelta(minutes=m)
        if w.contains(local_time(t.timestamp(), zone)):
            out.append(t.strftime("%H:%M"))
    return out


def test_spring_forward_london_lasts_one_real_hour() -> None:
    # 2026-03-29 01:00 GMT the clocks go to 02:00 BST: local 01:00-02:00 does not exist.
    minutes = active_minutes("01:00-03:00", LONDON, "2026-03-28T23:00:00+00:00", 6)
    assert minutes[0] == "01:00" and minutes[-1] == "01:59" and len(minutes) == 60


def test_fall_back_london_lasts_three_real_hours() -> None:
    # 2026-10-25 02:00 BST the clocks go back to 01:00 GMT: local 01:00-02:00 happens twice.
    minutes = active_minutes("01:00-03:00", LONDON, "2026-10-24T22:00:00+00:00", 6)
    assert minutes[0] == "00:00" and minutes[-1] == "02:59" and len(minutes) == 180


def test_new_york_dst_both_ways() -> None:
    # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    spring = active_minutes("01:30-03:30", NEW_YORK, "2026-03-08T05:00:00+00:00", 4)
    assert (spring[0], spring[-1], len(spring)) == ("06:30", "07:29", 60)
    fall = active_minutes("01:30-03:30", NEW_YORK, "2026-11-01T04:00:00+00:00", 6)
    # 01:30-02:00 EDT (05:30-06:00 UTC), then the repeated 01:00-01:30 EST is outside the
    # window, then 01:30-03:30 EST (06:30-08:30 UTC).
    assert (fall[0], fall[-1], len(fall)) == ("05:30", "08:29", 150)
    assert "06:00" not in fall and "06:29" not in fall and "06:30" in fall


def test_crossing_midnight_belongs_to_the_start_day() -> None:
    w = parse_window("22:00-02:00", ["fri"])
    utc = ZoneInfo("UTC")
    # 2026-11-27 is a Friday.
    assert not w.contains(local_time(at("2026-11-27T21:59:00+00:00"), utc))
    assert w.contains(local_time(at("2026-11-27T22:00:00+00:00"), utc))
    assert w.contains(local_time(at("2026-11-28T01:59:00+00:00"), utc))  # Saturday morning
    assert not w.contains(local_time(at("2026-11-28T02:00:00+00:00"), utc))
    assert not w.contains(local_time(at("2026-11-28T22:30:00+00:00"), utc))  # Saturday night
    assert not w.contains(local_time(at("2026-11-27T01:00:00+00:00"), utc))  # Thursday's night


def test_end_is_exclusive_and_24_00_is_midnight() -> None:
    w = parse_window("18:00-24:00", None)
    utc = ZoneInfo("UTC")
    assert w.contains(local_time(at("2026-11-24T23:59:00+00:00"), utc))
    assert not w.contains(local_time(at("2026-11-25T00:00:00+00:00"), utc))
    assert not w.contains(local_time(at("2026-11-24T17:59:59+00:00"), utc))


def test_00_00_to_24_00_is_the_whole_day() -> None:
    w = parse_window("00:00-24:00", ["sat"])
    utc = ZoneInfo("UTC")
    assert not w.crosses_midnight
    assert w.contains(local_time(at("2026-11-28T00:00:00+00:00"), utc))  # Saturday
    assert w.contains(local_time(at("2026-11-28T23:59:00+00:00"), utc))
    assert not w.contains(local_time(at("2026-11-29T00:00:00+00:00"), utc))  # Sunday
    assert not w.contains(local_time(at("2026-11-27T23:59:00+00:00"), utc))  # Friday
    assert w.describe() == "00:00-24:00 sat"


@pytest.mark.parametrize(
    "text", ["", "1-2", "01:00", "01:00-", "1:0-2:00", "24:00-01:00", "10:60-11:00", "23:00-23:00"]
)
def test_malformed_or_empty_windows(text: str) -> None:
    with pytest.raises(WindowSyntaxError):
        parse_window(text, None)


def test_clock_memo_agrees_with_direct_conversion() -> None:
    clock = Clock()
    t = at("2026-10-25T00:30:00+00:00")
    for step in range(0, 4 * 3600, 37):
        assert clock.local(t + step, LONDON) == local_time(t + step, LONDON)


def test_local_time_uses_wall_clock() -> None:
    lt = local_time(datetime(2026, 7, 1, 12, 0, tzinfo=UTC).timestamp(), LONDON)
    assert lt.describe() == "wed 13:00"

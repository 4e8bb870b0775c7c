"""Time windows: local wall-clock ranges in a policy's IANA zone, optionally crossing midnight.

A window "22:00-02:00" with days [fri] is active from Friday 22:00 to Saturday 02:00 local
time: the day names the day a window starts. Local time comes from `zoneinfo`, so across a
DST change a window follows the wall clock: "01:00-03:00" in Europe/London lasts one real
hour on the spring-forward night (01:00-02:00 does not exist) and three on the fall-back
night (01:00-02:00 happens twice). Granularity is the minute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
MINUTES_PER_DAY = 24 * 60


class WindowSyntaxError(ValueError):
    """The text of a time window or day list is malformed."""


@dataclass(frozen=True, slots=True)
class LocalTime:
    """A moment as the wall clock of one zone shows it, at minute granularity."""

    weekday: int  # 0 = Monday
    minute: int  # minutes since local midnight

    def describe(self) -> str:
        return f"{DAYS[self.weekday]} {self.minute // 60:02d}:{self.minute % 60:02d}"


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) in minutes of the local day; end < start crosses midnight."""

    start: int
    end: int
    days: frozenset[int]  # weekdays on which a window may start

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def contains(self, t: LocalTime) -> bool:
        if not self.crosses_midnight:
            return t.weekday in self.days and self.start <= t.minute < self.end
        if t.minute >= self.start:
            return t.weekday in self.days
        return t.minute < self.end and (t.weekday - 1) % 7 in self.days

    def describe(self) -> str:
        days = ",".join(DAYS[d] for d in sorted(self.days)) if len(self.days) < 7 else "every day"
        return f"{_hhmm(self.start)}-{_hhmm(self.end)} {days}"


def parse_window(text: str, days: list[str] | None) -> Window:
    """Parse "HH:MM-HH:MM" and day names; raises WindowSyntaxError saying what was expected."""
    m = _TIME.match(text)
    if not m:
        raise WindowSyntaxError(f'expected "HH:MM-HH:MM" (24-hour clock), got {text!r}')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59:
        raise WindowSyntaxError(f"start {h1:02d}:{m1:02d} is not a time of day")
    if h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        raise WindowSyntaxError(f"end {h2:02d}:{m2:02d} is not a time of day (24:00 is allowed)")
    # 24:00 ends the day (end 1440): "00:00-24:00" is the whole day, "22:00-24:00" the last
    # two hours, neither crosses midnight.
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise WindowSyntaxError(f"window {text.strip()!r} is empty (start equals end)")
    day_set = frozenset(range(7)) if days is None else frozenset(parse_day(d) for d in days)
    return Window(start=start, end=end, days=day_set)


def parse_day(name: str) -> int:
    key = name.strip().lower()[:3]
    if key not in DAYS or len(name.strip()) < 3:
        raise WindowSyntaxError(f"unknown day {name!r}; expected one of {', '.join(DAYS)}")
    return DAYS.index(key)


def local_time(epoch: float, zone: ZoneInfo) -> LocalTime:
    """The wall clock of `zone` at UNIX time `epoch`."""
    dt = datetime.fromtimestamp(epoch, UTC).astimezone(zone)
    return LocalTime(weekday=dt.weekday(), minute=dt.hour * 60 + dt.minute)


class Clock:
    """Memoises epoch-minute -> LocalTime per zone; the hot path converts once per minute."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], LocalTime] = {}

    def local(self, epoch: float, zone: ZoneInfo) -> LocalTime:
        # Every zone in use today has a whole-minute UTC offset, so one UTC minute is one
        # local minute and the memo is exact.
        key = (zone.key, int(epoch // 60))
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            hit = self._cache[key] = local_time(key[1] * 60, zone)
        return hit


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"

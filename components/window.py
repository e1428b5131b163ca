"""Time windows: every stage reads events over a half-open span [start, end) of UTC time.

Windows of whole days run midnight to midnight. A stage's default end is the data's own end, the day after its
last events partition (`data_span`), so that a freshly imported data set needs no dates in params.yaml.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

from components.storage import DataDir


def utc_midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


def as_utc(t: dt.datetime | dt.date) -> dt.datetime:
    """An aware datetime as it is; a date as its UTC midnight."""
    if not isinstance(t, dt.datetime):
        return utc_midnight(t)
    if t.tzinfo is None:
        raise ValueError(f"{t} has no time zone, expected an aware UTC datetime or a date")
    return t


@dataclasses.dataclass(frozen=True)
class Window:
    """[start, end) in UTC. A date given for either bound means its midnight."""
    start: dt.datetime
    end: dt.datetime

    def __post_init__(self):
        object.__setattr__(self, "start", as_utc(self.start))
        object.__setattr__(self, "end", as_utc(self.end))

    @classmethod
    def ending(cls, end: dt.datetime | dt.date, length: dt.timedelta) -> Window:
        """The `length` of time right before `end`."""
        end = as_utc(end)
        return cls(end - length, end)

    def __iter__(self) -> Iterator[dt.datetime]:
        """start, end = window"""
        return iter((self.start, self.end))

    def __str__(self) -> str:
        whole_days = all(t.time() == dt.time() for t in self)
        return "..".join(f"{t:%Y-%m-%d}" if whole_days else f"{t:%Y-%m-%d %H:%M}" for t in self)

    def covers_day(self, day: dt.date) -> bool:
        """Whether some of the UTC day `day` lies inside the window (its partition must be read)."""
        midnight = utc_midnight(day)
        return midnight < self.end and midnight + dt.timedelta(days=1) > self.start


def data_span(data: DataDir) -> Window | None:
    """The days the events partitions of `data` cover, first day to the day after the last; None without any."""
    days = sorted({day for day, _ in data.event_files()})
    return Window(days[0], days[-1] + dt.timedelta(days=1)) if days else None

"""A tiny valid raw dataset for the validation gate's tests, and helpers to write broken variants of it.

20 items (item 0 is created mid-stream, on day 2 at noon, and has no events), 3 days of 40 events each
with two dense features; every event's item exists and was created before it.
"""
from __future__ import annotations

import datetime as dt
import shutil

import numpy as np
import polars as pl

from components.data import contracts
from components.storage import Layout

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DAYS = 3
PER_DAY = 40
ITEMS = 20


def items_frame() -> pl.DataFrame:
    ids = np.arange(ITEMS)
    created = [START - dt.timedelta(days=30) + dt.timedelta(hours=int(i)) for i in ids]
    created[0] = START + dt.timedelta(days=1, hours=12)
    return contracts.conform_items(pl.DataFrame({
        "item_id": ids * 10 + 1000,  # 1000, 1010, ...
        "created_at": created,
        "text": [f"headline number {i}" for i in ids],
        "category": [None if i % 7 == 0 else f"cat{i % 3}" for i in ids],
        "retired_at": [START + dt.timedelta(days=40) if i % 5 == 0 else None for i in ids],
    }))


def events_frame(seed: int = 0) -> pl.DataFrame:
    """Events sorted by ts, PER_DAY a day; item 0 (created on day 2) never appears."""
    rng = np.random.default_rng(seed)
    n = DAYS * PER_DAY
    day = np.repeat(np.arange(DAYS), PER_DAY)
    seconds = np.sort(rng.integers(0, 86_400, n).reshape(DAYS, PER_DAY), axis=1).ravel()
    return contracts.conform_events(pl.DataFrame({
        "ts": [START + dt.timedelta(days=int(d), seconds=int(s)) for d, s in zip(day, seconds)],
        "user_id": rng.integers(0, 50, n),
        "item_id": items_frame()["item_id"][1:].to_numpy()[rng.integers(0, ITEMS - 1, n)],
        "clicked": rng.integers(0, 2, n),
        "f_0": rng.standard_normal(n),
        "f_1": rng.random(n),
    }))


def write_raw(layout: Layout, items: pl.DataFrame | None = None, events: pl.DataFrame | None = None) -> None:
    """Replace data/raw with `items` and `events` (default: the valid dataset): rows [d * PER_DAY, (d + 1) *
    PER_DAY) go to day d's partition, whatever their ts says."""
    items = items_frame() if items is None else items
    events = events_frame() if events is None else events
    shutil.rmtree(layout.raw.root, ignore_errors=True)
    layout.raw.root.mkdir(parents=True)
    layout.raw.write_items(items)
    for d in range(DAYS):
        layout.raw.write_events((START + dt.timedelta(days=d)).date(), events[d * PER_DAY:(d + 1) * PER_DAY])


def set_value(frame: pl.DataFrame, row: int, column: str, value) -> pl.DataFrame:
    """`frame` with one cell replaced (dtype kept)."""
    series = frame[column].to_list()
    series[row] = value
    return frame.with_columns(pl.Series(column, series, dtype=frame.schema[column]))

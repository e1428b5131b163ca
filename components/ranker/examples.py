"""The ranker's examples (PAPER.md, "Ranker"): one row per impression, in time order, with the target item's
SemID codes and the user's click history.

window     train on [train_start, train_end), evaluate on [train_end, eval_end) right after it
history    the user's last T clicks strictly before the impression (an impression's own click, and clicks at
           the same timestamp, are never its history: no label leakage), oldest first, left-padded with -1,
           each with an age bucket of (impression ts - click ts); clicks older than history.lookback_days
           before the window start are not history
codes      c1..cL of each item from the SemID entity store, -1 for an item without a SemID; a target item
           without one is hashed by the model ("rh", counted) or refused ("fail")
counters   the user's click rate (clicks + 1) / (impressions + 2) and log(1 + impressions) over their impressions
           strictly before the event, back to the same lookback as the history: appended to the dense features
           as user_click_rate, user_impressions_log. Users differ most in how often they click at all (on
           MovieLens a user's past rate alone reaches NE 0.91), and clicks-only history cannot tell it.

`build_examples` is the pure, vectorized core (polars + numpy, no loop per event: an as-of join finds each
event's last earlier click, numpy gathers the T rows up to it); `iter_examples` streams it over day
partitions with memory bounded by one day of events plus the clicks of the window and its lookback.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterator
from itertools import groupby

import numpy as np
import polars as pl
import torch

from components.data.contracts import DENSE_PREFIX
from components.errors import DataError, ParamsError
from components.params import RankerParams
from components.semid.store import SemIdStore, join_semids
from components.storage import DataDir
from components.window import Window, data_span, utc_midnight

log = logging.getLogger(__name__)

AGE_BUCKETS = 16  # history age: clamp(floor(log2(1 + age_hours)) + 1, 1, AGE_BUCKETS - 1); 0 = padding
PAD = -1  # padding item ID and code; also the code of an item without a SemID
PAD_TS = 2 ** 62  # the padding's click time, microseconds (year 148,000): after every event, so its age is < 0
MISSING_SEMID = ("rh", "fail")
EXAMPLES = 5  # item IDs quoted in an error message
USER_COUNTERS = ["user_click_rate", "user_impressions_log"]  # dense columns after the events' f_* features
NO_COUNTS = pl.DataFrame(schema={"user_id": pl.Int64, "impressions": pl.Int64, "clicks": pl.Int64})
US_PER_HOUR = 3_600_000_000
# floor(log2(1 + h)) = floor(log2(1 + floor(h))) as 2^k - 1 is an integer, so the bucket of an age is a table
# lookup by its whole hours q: bit_length(1 + q), clamped; q >= 2^(AGE_BUCKETS - 2) - 1 all share the last
# bucket. The extra last entry, 0, is the padding's: it is read at index -1 (see `age_bucket`).
AGE_CAP = 2 ** (AGE_BUCKETS - 2) - 1
AGE_OF_HOURS = np.array([min((1 + q).bit_length(), AGE_BUCKETS - 1) for q in range(AGE_CAP + 1)] + [0], np.int8)


# ---------------------------------------------------------------------------------------------- window


def ranker_window(p: RankerParams, data: DataDir, as_of: dt.date | None = None) -> tuple[Window, Window]:
    """The training window and the evaluation window right after it. Training ends at `ranker.train_end`
    (midnight UTC) or, when unset, where the evaluation window before as_of starts (default as_of: the end of the
    data, the day after its last partition): eval_hours before it, or with eval_share the last whole hours that
    hold that share of the events. Training lasts train_days, or with train_days null goes back to the data's
    first day."""
    if p.train_days is not None and p.train_days < 1:
        raise ParamsError(f"ranker.train_days is {p.train_days}, expected an integer >= 1 or null (all the data)")
    if p.eval_hours < 1:
        raise ParamsError(f"ranker.eval_hours is {p.eval_hours}, expected an integer >= 1")
    if p.eval_share is not None and not 0 < p.eval_share < 1:
        raise ParamsError(f"ranker.eval_share is {p.eval_share}, expected a share in (0, 1) or null")
    span = data_span(data)
    if span is None:
        raise DataError(f"{data.events}: no events files (expected {data.events}/date=YYYY-MM-DD/*.parquet)")
    end = span.end if as_of is None else utc_midnight(as_of)
    if p.train_end is not None:
        train_end, set_by = utc_midnight(p.train_end), "ranker.train_end"
    elif p.eval_share is not None:
        train_end, set_by = share_start(data, Window(span.start, end), p.eval_share), "ranker.eval_share"
    else:
        train_end, set_by = end - dt.timedelta(hours=p.eval_hours), "ranker.eval_hours"
    eval_end = end if p.train_end is None else train_end + dt.timedelta(hours=p.eval_hours)
    train = Window(span.start, train_end) if p.train_days is None else \
        Window.ending(train_end, dt.timedelta(days=p.train_days))
    evaluation = Window(train_end, eval_end)
    covered = f"the events in {data.events} cover [{span.start:%Y-%m-%d}, {span.end:%Y-%m-%d})"
    if train.start >= train.end or train.start < span.start:
        raise DataError(f"training window [{train.start:%Y-%m-%d %H:%M}, {train.end:%Y-%m-%d %H:%M}) "
                        f"starts before the data: {covered}; lower ranker.train_days ({p.train_days}) or move "
                        f"{set_by}")
    if evaluation.end > span.end:
        raise DataError(f"evaluation window [{evaluation.start:%Y-%m-%d %H:%M}, {evaluation.end:%Y-%m-%d %H:%M}) "
                        f"ends after the data: {covered}; move ranker.train_end ({p.train_end}) or lower "
                        f"ranker.eval_hours ({p.eval_hours})")
    return train, evaluation


def share_start(data: DataDir, window: Window, share: float) -> dt.datetime:
    """The latest whole hour h in `window` such that [h, window.end) holds at least `share` of the window's
    events: an evaluation window sized by events rather than time, for data whose rate changes over the years.
    Reads only the ts column, one day partition at a time."""
    start_us, end_us = (int(t.timestamp() * 1_000_000) for t in window)
    hours = [pl.scan_parquet(path).select(ts=pl.col("ts").dt.epoch("us")).filter(
                 pl.col("ts").is_between(start_us, end_us, closed="left")).select(
                 hour=pl.col("ts") // US_PER_HOUR).collect()["hour"]
             for day, path in data.event_files() if window.covers_day(day)]
    counts = pl.concat(hours).value_counts(name="n").sort("hour", descending=True) if hours else None
    if counts is None or counts.height < 2:
        raise DataError(f"{data.events}: events in fewer than two hours of {window}; ranker.eval_share needs "
                        f"at least two to split them into training and evaluation")
    total = int(counts["n"].sum())
    reached = counts.filter(pl.col("n").cum_sum() >= share * total)["hour"]
    hour = max(int(reached[0]), int(counts["hour"][-1]) + 1)  # the oldest hour is left for training
    return dt.datetime.fromtimestamp(hour * 3600, tz=dt.timezone.utc)


# ---------------------------------------------------------------------------------------------- examples


@dataclasses.dataclass
class Examples:
    """One time-ordered slice of training or evaluation examples (numpy arrays, row i = one impression)."""
    ts: np.ndarray  # (N,) int64 microseconds since epoch UTC
    user_id: np.ndarray  # (N,) int64
    item_id: np.ndarray  # (N,) int64 raw ID of the target item
    label: np.ndarray  # (N,) float32 clicked
    dense: np.ndarray  # (N, F) float32, columns dense_columns (sorted f_* names, then USER_COUNTERS)
    codes: np.ndarray  # (N, L) SemID codes of the target item (the store's int16 or int32); -1 where it has none;
    # L = 0 without a store
    hist_item: np.ndarray  # (N, T) int64 the user's last T clicks before ts, oldest first, left-padded with -1
    hist_codes: np.ndarray  # (N, T, L) codes of those items, -1 for padding or an item without a SemID
    hist_age: np.ndarray  # (N, T) int8 age bucket of each history click, 0 for padding
    dense_columns: list[str]
    missing_semid: int  # events whose target item has no SemID

    BATCH_KEYS = ("label", "dense", "item_id", "codes", "hist_item", "hist_codes", "hist_age", "ts")

    def __len__(self) -> int:
        return len(self.ts)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive rows in order, batch_size at a time (the last batch may be short); tensors share memory
        with the arrays."""
        if batch_size < 1:
            raise ParamsError(f"ranker.batch_size is {batch_size}, expected an integer >= 1")
        arrays = {key: getattr(self, key) for key in self.BATCH_KEYS}
        for lo in range(0, len(self), batch_size):
            yield {key: torch.from_numpy(a[lo:lo + batch_size]) for key, a in arrays.items()}

    def take(self, rows: slice | np.ndarray) -> Examples:
        """The examples at `rows` (a slice or an index array), in that order; missing_semid is recounted from
        the codes."""
        arrays = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(Examples)
                  if f.name not in ("dense_columns", "missing_semid")}
        missing = int((arrays["codes"][:, 0] < 0).sum()) if arrays["codes"].shape[1] else 0
        return Examples(**arrays, dense_columns=list(self.dense_columns), missing_semid=missing)

    @staticmethod
    def concat(parts: list[Examples]) -> Examples:
        """The parts one after the other (callers pass them in time order). The parts are used up: each array is
        released once copied, so the peak is the result plus one field of the parts, not twice the result."""
        if not parts:
            raise ValueError("Examples.concat needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if part.dense_columns != first.dense_columns:
                raise DataError(f"events change their dense features from {first.dense_columns} to "
                                f"{part.dense_columns}; every events file must carry the same f_* columns")
        arrays = {}
        for f in dataclasses.fields(Examples):
            if f.name not in ("dense_columns", "missing_semid"):
                arrays[f.name] = np.concatenate([getattr(part, f.name) for part in parts])
                for part in parts:
                    setattr(part, f.name, None)
        return Examples(**arrays, dense_columns=list(first.dense_columns),
                        missing_semid=sum(part.missing_semid for part in parts))


def age_bucket(age_us: np.ndarray) -> np.ndarray:
    """clamp(floor(log2(1 + age_hours)) + 1, 1, AGE_BUCKETS - 1) of ages > 0 (exact, integer arithmetic);
    0 for ages < 0, which mark padding. Overwrites age_us (a temporary the size of the history)."""
    hours = np.floor_divide(age_us, US_PER_HOUR, out=age_us)  # -1 or less for a negative age
    np.clip(hours, -1, AGE_CAP, out=hours)
    return AGE_OF_HOURS.take(hours)


def semid_codes(item_id: pl.Series, store: SemIdStore | None) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, L) in the store's integer type (int16 up to K = 32,768: a history's codes are most of an
    example's bytes), -1 rows for items without a SemID; found (n,) bool), through the store's join; L = 0 without
    a store."""
    if store is None:
        return np.empty((len(item_id), 0), np.int16), np.zeros(len(item_id), bool)
    columns = store.code_columns
    joined = join_semids(item_id.to_frame("item_id"), store, store.codebook_version)
    found = joined[columns[0]].is_not_null().to_numpy()
    return joined.select(pl.col(columns).fill_null(PAD)).to_numpy(order="c"), found


def check_missing_semid(missing_semid: str) -> None:
    if missing_semid not in MISSING_SEMID:
        raise ParamsError(f"ranker.missing_semid is {missing_semid!r}, expected one of {list(MISSING_SEMID)}")


@dataclasses.dataclass(frozen=True)
class ClickHistory:
    """The clicks that may serve as history, prepared once for any number of events: rows sorted by (user, ts),
    row M (one past the last click) is the padding, with item -1, codes -1 and a time after every event."""
    by_ts: pl.DataFrame  # ts, user_id, first, end: the click's row + 1 (end) and its user's first row, by ts
    item: np.ndarray  # (M + 1,) int64
    codes: np.ndarray  # (M + 1, L) the store's code type
    ts: np.ndarray  # (M + 1,) int64 microseconds


def click_history(clicks: pl.DataFrame, store: SemIdStore | None) -> ClickHistory:
    """Prepare `clicks` (user_id, item_id, ts of clicked events; any order, any span) as history; clicks of one
    user at one timestamp keep their order in `clicks`."""
    clicks = (clicks.select("user_id", "item_id", pl.col("ts").dt.cast_time_unit("us").cast(pl.Int64))
              .sort("user_id", "ts", maintain_order=True)
              .with_columns(end=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)))
    by_ts = (clicks.select("ts", "user_id", "end", first=pl.col("end").min().over("user_id") - 1)
             .sort("ts", "end"))  # among clicks at one ts the as-of join takes the last row: the newest
    codes = semid_codes(clicks["item_id"], store)[0]
    return ClickHistory(by_ts, item=np.r_[clicks["item_id"].to_numpy(), PAD],
                        codes=np.concatenate([codes, np.full((1, codes.shape[1]), PAD, codes.dtype)]),
                        ts=np.r_[clicks["ts"].to_numpy(), PAD_TS])


def history_index(events: pl.DataFrame, history: ClickHistory, length: int) -> np.ndarray:
    """(N, T) rows of the history of each event (ts-sorted frame with ts in microseconds), oldest first: the
    last T of its user's clicks with click.ts < event.ts, found by one as-of join (backward, exact timestamps
    excluded), left-padded with row M."""
    bounds = events.select("ts", "user_id").join_asof(
        history.by_ts, on="ts", by="user_id", strategy="backward", allow_exact_matches=False,
        check_sortedness=False)  # both sides are sorted by ts; polars cannot check that within `by` groups
    first, end = (bounds[c].fill_null(0).to_numpy() for c in ("first", "end"))  # no earlier click: [0, 0)
    index = end[:, None] + np.arange(-length, 0)
    np.putmask(index, index < first[:, None], len(history.ts) - 1)
    return index


def add_counts(counts: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """Per-user impressions and clicks: `counts` (user_id, impressions, clicks) plus those of `events`."""
    more = events.group_by("user_id").agg(impressions=pl.len().cast(pl.Int64),
                                          clicks=pl.col("clicked").cast(pl.Int64).sum())
    return (pl.concat([counts, more]).group_by("user_id")
            .agg(pl.col("impressions").sum(), pl.col("clicks").sum()).sort("user_id"))


def user_counters(events: pl.DataFrame, before: pl.DataFrame) -> np.ndarray:
    """(N, 2) float32 USER_COUNTERS of each row of `events` (ts in microseconds, user_id, clicked): the user's
    impressions and clicks in `before` (totals of everything earlier than these events) plus their rows of
    `events` with an earlier ts (rows at the same ts do not count each other)."""
    earlier = (events.select("ts", "user_id", "clicked").with_row_index("row")
               .sort("user_id", "ts", maintain_order=True)
               .with_columns(n=pl.int_range(pl.len(), dtype=pl.Int64).over("user_id"),
                             c=(pl.col("clicked").cast(pl.Int64).cum_sum() - pl.col("clicked")).over("user_id"))
               .with_columns(pl.col("n", "c").min().over("user_id", "ts"))
               .join(before, on="user_id", how="left")
               .select("row", n=pl.col("n") + pl.col("impressions").fill_null(0),
                       c=pl.col("c") + pl.col("clicks").fill_null(0))
               .sort("row"))
    n, c = earlier["n"].to_numpy(), earlier["c"].to_numpy()
    return np.column_stack([(c + 1) / (n + 2), np.log1p(n)]).astype(np.float32)


def build_examples(events: pl.DataFrame, clicks: pl.DataFrame | ClickHistory, store: SemIdStore | None,
                   history_length: int, missing_semid: str = "rh", counts: pl.DataFrame = NO_COUNTS) -> Examples:
    """Examples of `events` (rows of the events contract, any span), history drawn from `clicks` (user_id,
    item_id, ts of clicked events; any order, any span; or a ClickHistory of them, to prepare once for many
    calls, prepared with the same store) and user counters from `counts` (add_counts' totals of the impressions
    before `events`) and the events themselves: rows sorted by ts (stable). Without a store there are no codes
    (L = 0) and no SemID is missing."""
    check_missing_semid(missing_semid)
    if history_length < 0:
        raise ParamsError(f"ranker.history.length is {history_length}, expected an integer >= 0")
    dense_columns = sorted(c for c in events.columns if c.startswith(DENSE_PREFIX))
    events = (events.select(pl.col("ts").dt.cast_time_unit("us").cast(pl.Int64), "user_id", "item_id", "clicked",
                            *dense_columns)
              .sort("ts", maintain_order=True))
    ts, user_id, item_id = (events[c].to_numpy(writable=True) for c in ("ts", "user_id", "item_id"))
    codes, found = semid_codes(events["item_id"], store)
    missing = 0 if store is None else int(len(found) - found.sum())
    if missing and missing_semid == "fail":
        absent = np.unique(item_id[~found])
        raise DataError(f"{missing} event(s) on {len(absent)} item(s) without a SemID in {store.path} "
                        f"(e.g. item_id {absent[:EXAMPLES].tolist()}), and ranker.missing_semid is 'fail'; "
                        f"run `semid backfill` for them or set ranker.missing_semid: rh")

    history = clicks if isinstance(clicks, ClickHistory) else click_history(clicks, store)
    index = history_index(events, history, history_length)
    age = history.ts.take(index)
    np.subtract(ts[:, None], age, out=age)  # > 0 off the padding (clicks strictly before ts), < 0 on it
    return Examples(
        ts=ts, user_id=user_id, item_id=item_id,
        label=events["clicked"].to_numpy().astype(np.float32),
        dense=np.concatenate([events.select(dense_columns).to_numpy(order="c").astype(np.float32).reshape(
            len(events), len(dense_columns)), user_counters(events, counts)], axis=1),
        codes=codes,
        hist_item=history.item.take(index),
        hist_codes=history.codes.take(index, axis=0),
        hist_age=age_bucket(age),
        dense_columns=dense_columns + USER_COUNTERS, missing_semid=missing)


# ---------------------------------------------------------------------------------------------- reading


def day_files(data: DataDir, start: dt.datetime, end: dt.datetime) -> list[tuple[dt.date, list]]:
    """The events files of each partition day that overlaps [start, end), in day order."""
    window = Window(start, end)
    files = [(day, f) for day, f in data.event_files() if window.covers_day(day)]
    return [(day, [f for _, f in group]) for day, group in groupby(files, key=lambda x: x[0])]


def in_window(start: dt.datetime, end: dt.datetime) -> pl.Expr:
    return (pl.col("ts") >= start) & (pl.col("ts") < end)


def load_clicks(data: DataDir, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """user_id, item_id, ts of the clicked events with start <= ts < end, sorted by (user_id, ts); reads only
    the partitions of those days and only these columns."""
    files = [f for _, group in day_files(data, start, end) for f in group]
    if not files:
        return pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Datetime("us", "UTC")})
    return (pl.scan_parquet(files).select("user_id", "item_id", "ts", "clicked")
            .filter(in_window(start, end) & (pl.col("clicked") == 1))
            .select("user_id", "item_id", pl.col("ts").dt.cast_time_unit("us"))
            .sort("user_id", "ts", maintain_order=True).collect())


def iter_examples(data: DataDir, start: dt.datetime, end: dt.datetime, store: SemIdStore | None,
                  p: RankerParams) -> Iterator[Examples]:
    """Examples of the events with start <= ts < end, one Examples per day partition in day order (days with
    no such events are skipped). History clicks and user counters reach back to start - history.lookback_days,
    never to or past an event's ts; the lookback's days are read for their user_id and clicked columns only."""
    check_missing_semid(p.missing_semid)
    if p.history.lookback_days < 0:
        raise ParamsError(f"ranker.history.lookback_days is {p.history.lookback_days}, expected >= 0")
    lookback = start - dt.timedelta(days=p.history.lookback_days)
    history = click_history(load_clicks(data, lookback, end), store)
    counts = NO_COUNTS
    for _, files in day_files(data, lookback, end):
        day = pl.scan_parquet(files)
        counts = add_counts(counts, day.filter(in_window(lookback, start)).select("user_id", "clicked").collect())
        events = day.filter(in_window(start, end)).collect()
        if len(events):
            yield build_examples(events, history, store, p.history.length, p.missing_semid, counts)
            counts = add_counts(counts, events)


def load_examples(data: DataDir, start: dt.datetime, end: dt.datetime, store: SemIdStore | None,
                  p: RankerParams, name: str = "") -> Examples:
    """All examples of [start, end) in one Examples; `name` ("training", "evaluation") goes into the error."""
    parts = list(iter_examples(data, start, end, store, p))
    if not parts:
        raise DataError(f"{data.events}: no events in [{start:%Y-%m-%d %H:%M}, {end:%Y-%m-%d %H:%M}) UTC "
                        f"(empty {name + ' ' if name else ''}window)")
    examples = Examples.concat(parts)
    log.info("ranker examples [%s, %s): %s rows, %s without a SemID", f"{start:%Y-%m-%d %H:%M}",
             f"{end:%Y-%m-%d %H:%M}", f"{len(examples):,}", f"{examples.missing_semid:,}")
    return examples

"""What was shown: impressions and clicks per item and day around the drift windows, and what they say about the
item distribution in raw-ID space and in SemID space.

load      one day partition at a time (memory: one day of events plus the per-day item totals): impressions
          and clicks per (day, item), and a seeded Bernoulli sample of at most drift.sample_rows impressions per
          window (item, clicked, f_*) for Evidently; partitions are UTC days (the events contract), so a window
          of whole days reads exactly its partitions
views     raw_id_churn, popularity_skew, label_drift and semid_coverage, and the day-by-day churn picture, as
          pure functions of those tables (polars)
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from itertools import groupby

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from components.data import contracts
from components.errors import DataError, ParamsError
from components.params import DriftParams
from components.semid.store import SemIdStore, join_semids
from components.storage import DataDir
from components.window import Window, data_span

DAY = dt.timedelta(days=1)
HEAD, TORSO = 0.001, 0.056  # popularity_skew: the paper's head (top 0.1% of items) and head + torso (top 5.6%)
PREFIX_BASE = 1 << 16  # level-2 prefix key = c1 * PREFIX_BASE + c2 (K <= 65,536)


@dataclasses.dataclass(frozen=True)
class DriftWindows:
    reference: Window
    current: Window
    read: Window  # the days read: the reference's start minus the churn lag, up to the current window's end


def drift_windows(p: DriftParams, data: DataDir) -> DriftWindows:
    """current: drift.current_days ending at as_of; reference: drift.reference_days ending drift.gap_days
    before the current window starts. as_of defaults to the day after the last events day."""
    for name, value, least in (("current_days", p.current_days, 1), ("reference_days", p.reference_days, 1),
                               ("gap_days", p.gap_days, 0), ("churn_lag_days", p.churn_lag_days, 1),
                               ("sample_rows", p.sample_rows, 1000), ("embedding_sample", p.embedding_sample, 20),
                               ("prefix_buckets", p.prefix_buckets, 1)):
        if value < least:
            raise ParamsError(f"drift.{name} is {value}, expected an integer >= {least}")
    span = data_span(data)
    if span is None:
        raise DataError(f"{data.events}: no events partitions (expected {data.events}/date=YYYY-MM-DD/*.parquet)")
    as_of = span.end if p.as_of is None else p.as_of
    current = Window.ending(as_of, p.current_days * DAY)
    reference = Window.ending(current.start - p.gap_days * DAY, p.reference_days * DAY)
    return DriftWindows(reference, current, Window(reference.start - p.churn_lag_days * DAY, current.end))


@dataclasses.dataclass(frozen=True)
class Traffic:
    daily: pl.DataFrame  # day Date, item_id Int64, impressions UInt32, clicks Int64: every day read
    samples: dict[str, pl.DataFrame]  # "reference" / "current": item_id, clicked, f_* of sampled impressions
    dense: list[str]  # the f_* feature names, sorted
    impressions: dict[str, int]  # "reference" / "current": all impressions of the window


def load_traffic(data: DataDir, windows: DriftWindows, sample_rows: int, seed: int) -> Traffic:
    """Read the days of windows.read; refuse an empty reference or current window (DataError naming it)."""
    days = [(day, [f for _, f in group]) for day, group in groupby(
        [(day, f) for day, f in data.event_files() if windows.read.covers_day(day)], key=lambda x: x[0])]
    role = {day: name for day, _ in days for name in ("reference", "current")
            if getattr(windows, name).covers_day(day)}
    rows = {name: sum(pq.read_metadata(f).num_rows for day, files in days if role.get(day) == name for f in files)
            for name in ("reference", "current")}
    for name in ("reference", "current"):
        if rows[name] == 0:
            raise DataError(f"{data.events}: the {name} window {getattr(windows, name)} holds no events; move "
                            f"drift.as_of, or change drift.reference_days / drift.gap_days / drift.current_days")
    dense = sorted(contracts.dense_columns(contracts.read_schema(days[0][1][0])))
    daily, samples = [], {"reference": [], "current": []}
    for day, files in days:
        events = pl.read_parquet(files, columns=["item_id", "clicked", *dense])
        daily.append(events.group_by("item_id").agg(impressions=pl.len(), clicks=pl.col("clicked").cast(pl.Int64)
                                                     .sum()).with_columns(day=pl.lit(day)))
        if day in role:
            rate = min(1.0, sample_rows / rows[role[day]])
            keep = np.random.default_rng([seed, day.toordinal()]).random(len(events)) < rate
            samples[role[day]].append(events.filter(pl.Series(keep)))
    return Traffic(daily=pl.concat(daily).select("day", "item_id", "impressions", "clicks"),
                   samples={name: pl.concat(parts) for name, parts in samples.items()}, dense=dense,
                   impressions=rows)


# ---------------------------------------------------------------------------------------------- SemID prefixes


def with_prefixes(frame: pl.DataFrame, store: SemIdStore) -> pl.DataFrame:
    """frame with l1 = c1 and l2 = (c1, c2) as integer keys, null for items without a SemID."""
    joined = join_semids(frame, store, store.codebook_version)
    l1, l2 = pl.col("c1").cast(pl.Int64), pl.col("c2").cast(pl.Int64)
    return joined.with_columns(l1=l1, l2=l1 * PREFIX_BASE + l2).drop(store.code_columns)


def in_window(daily: pl.DataFrame, window: Window) -> pl.DataFrame:
    return daily.filter(pl.col("day").is_between(window.start.date(), window.end.date(), closed="left"))


def totals(daily: pl.DataFrame, window: Window, by: str = "item_id") -> pl.DataFrame:
    """by, impressions, clicks summed over the window's days."""
    return (in_window(daily, window).group_by(by)
            .agg(pl.col("impressions").sum().cast(pl.Int64), pl.col("clicks").sum()))


def shares(daily: pl.DataFrame, windows: DriftWindows, by: str, weight: str = "items") -> pl.DataFrame:
    """by, reference, current: each key's share of its window's items shown (weight "items") or impressions
    ("impressions"), 0 where it had none."""
    def per_key(window: Window) -> pl.DataFrame:
        if weight == "items":
            shown = in_window(daily, window).select("item_id", by).unique()
            return shown.group_by(by).agg(n=pl.len().cast(pl.Float64))
        return totals(daily, window, by).select(by, n=pl.col("impressions").cast(pl.Float64))
    ref, cur = (per_key(getattr(windows, w)).rename({"n": w}) for w in ("reference", "current"))
    return (ref.join(cur, on=by, how="full", coalesce=True).fill_null(0)
            .with_columns(pl.col("reference") / pl.col("reference").sum(), pl.col("current") / pl.col("current").sum()))


def items_shown(daily: pl.DataFrame, window: Window) -> pl.DataFrame:
    """item_id, l1, l2 of every item with an impression in the window (`daily` carries l1 and l2)."""
    return in_window(daily, window).select("item_id", "l1", "l2").unique("item_id").sort("item_id")


# ---------------------------------------------------------------------------------------------- checks


def raw_id_churn(daily: pl.DataFrame, windows: DriftWindows) -> tuple[float, dict]:
    """Share of current impressions on items with no reference impression (the value), and the share of the
    reference's items with no current impression."""
    ref, cur = totals(daily, windows.reference), totals(daily, windows.current)
    new = cur.join(ref, on="item_id", how="anti")["impressions"].sum() / cur["impressions"].sum()
    gone = ref.join(cur, on="item_id", how="anti").height / ref.height
    return float(new), {"current_impressions_on_new_items": round(float(new), 6),
                        "reference_items_gone": round(float(gone), 6), "current_items": cur.height,
                        "reference_items": ref.height}


def churn_series(daily: pl.DataFrame, lag_days: int) -> pl.DataFrame:
    """day, raw, l1, l2: the share of each day's impressions on items (level-1, level-2 prefixes) that had no
    impression lag_days earlier; null where that earlier day was not read. `daily` carries l1 and l2."""
    days = daily["day"].unique().sort()
    out = []
    for key, name in (("item_id", "raw"), ("l1", "l1"), ("l2", "l2")):
        per_key = daily.drop_nulls(key).group_by("day", key).agg(pl.col("impressions").sum())
        earlier = per_key.select(pl.col("day") + pl.duration(days=lag_days), key, seen=pl.lit(True))
        share = (per_key.join(earlier, on=["day", key], how="left")
                 .group_by("day").agg((pl.col("impressions").filter(pl.col("seen").is_null()).sum()
                                       / pl.col("impressions").sum()).alias(name)))
        out.append(share.filter(pl.col("day") >= days[0] + dt.timedelta(days=lag_days)))
    frame = pl.DataFrame({"day": days})
    for part in out:
        frame = frame.join(part, on="day", how="left")
    return frame.sort("day")


def top_shares(daily: pl.DataFrame) -> pl.DataFrame:
    """day, head, torso: each day's impression share of its top 0.1% and top 5.6% of items."""
    ranked = daily.with_columns(rank=pl.col("impressions").rank("ordinal", descending=True).over("day"),
                                items=pl.len().over("day"))
    cut = lambda f: (pl.col("rank") <= (pl.col("items") * f).round().clip(lower_bound=1))  # noqa: E731
    return (ranked.group_by("day").agg(
        head=pl.col("impressions").filter(cut(HEAD)).sum() / pl.col("impressions").sum(),
        torso=pl.col("impressions").filter(cut(TORSO)).sum() / pl.col("impressions").sum()).sort("day"))


def popularity_skew(daily: pl.DataFrame, windows: DriftWindows) -> tuple[float, dict]:
    """How much more the top 0.1% / top 5.6% of a day's items take than on the median reference day (the larger
    rise; a spreading out is not flagged). Each day against days like it, never against the whole reference
    window's larger item set; the median, because one long-lived hit item lifts the head share of every day it
    lives (the default world: 0.19 while it lives, 0.04 after)."""
    per_day = top_shares(daily)
    ref = in_window(per_day, windows.reference).select(pl.col("head", "torso").median())
    cur = in_window(per_day, windows.current).select(pl.col("head", "torso").mean())
    rise = {k: float(cur[k][0] - ref[k][0]) for k in ("head", "torso")}
    return max(max(rise.values()), 0.0), {
        "top_0.1%_share": {"reference_median_day": round(float(ref["head"][0]), 6),
                           "current": round(float(cur["head"][0]), 6)},
        "top_5.6%_share": {"reference_median_day": round(float(ref["torso"][0]), 6),
                           "current": round(float(cur["torso"][0]), 6)}}


def label_drift(daily: pl.DataFrame, windows: DriftWindows, top: int = 10) -> tuple[float | None, dict]:
    """|CTR_current / CTR_reference - 1| over all impressions (the value), and CTR by level-1 prefix for the
    prefixes with the most current impressions. None when the reference has no clicks."""
    ref, cur = (totals(daily, getattr(windows, w), "l1") for w in ("reference", "current"))
    ctr = lambda f: f["clicks"].sum() / f["impressions"].sum()  # noqa: E731
    by_prefix = (cur.join(ref, on="l1", how="left", suffix="_ref").drop_nulls("l1")
                 .sort(["impressions", "l1"], descending=[True, False]).head(top)
                 .select(prefix="l1", impressions="impressions", ctr_current=pl.col("clicks") / pl.col("impressions"),
                         ctr_reference=pl.col("clicks_ref") / pl.col("impressions_ref")))
    details = {"ctr_reference": round(float(ctr(ref)), 6), "ctr_current": round(float(ctr(cur)), 6),
               "by_prefix": by_prefix.to_dicts()}
    if ctr(ref) == 0:
        return None, {**details, "note": "no clicks in the reference window: CTR change undefined"}
    return abs(float(ctr(cur) / ctr(ref)) - 1), details


def semid_coverage(daily: pl.DataFrame, windows: DriftWindows) -> tuple[float, dict]:
    """Share of current impressions on items with a SemID of the store's codebook (`daily` carries l1)."""
    cur = in_window(daily, windows.current)
    missing = cur.filter(pl.col("l1").is_null())
    value = 1 - missing["impressions"].sum() / cur["impressions"].sum()
    return float(value), {"items_without_semid": missing["item_id"].n_unique(),
                          "examples": missing["item_id"].unique().sort().head(5).to_list()}

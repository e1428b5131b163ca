"""What a `semid replay` cost, day by day and task by task, and what its timeline shows.
`python benchmarks/replay.py [--timeline reports/loop/timeline.csv]`

Reads the timeline a replay wrote (one row per simulated day, seconds by task: components/monitoring/timeline.py)
and prints, for people, the seconds per day by task over plain days (no retrain, no refresh), ranker-retrain days
and refresh days, then the figures the timeline plots (NE on all and new items under each codebook, drift
verdicts, SemID coverage), then one JSON line of the same figures for tools. The replay itself is run with
`semid replay --start YYYY-MM-DD --days N` (the README's "The loop, day by day" gives the 120-day command).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

TASKS = ("land", "validate", "embed", "train_rqvae", "backfill", "drift", "train_ranker")


def day_kinds(timeline: pl.DataFrame) -> pl.DataFrame:
    """Each day's kind: the first day (it builds everything), a refresh, a ranker retrain, or a plain day."""
    return timeline.with_row_index("day").with_columns(
        kind=pl.when(pl.col("day") == 0).then(pl.lit("first day"))
        .when(pl.col("refreshed") == 1).then(pl.lit("refresh"))
        .when(pl.col("ranker_retrained") == 1).then(pl.lit("ranker retrain"))
        .otherwise(pl.lit("plain")))


def seconds_by_task(timeline: pl.DataFrame) -> pl.DataFrame:
    """Days, and mean seconds per day by task and for the whole day, for each kind of day."""
    columns = [f"seconds_{t}" for t in TASKS if f"seconds_{t}" in timeline.columns]
    return (day_kinds(timeline).group_by("kind", maintain_order=True)
            .agg(pl.len().alias("days"), *[pl.col(c).mean().round(1).alias(c.removeprefix("seconds_"))
                                           for c in columns],
                 pl.col("seconds").mean().round(1).alias("day"))
            .sort("kind"))


def by_codebook(timeline: pl.DataFrame) -> pl.DataFrame:
    """The figures the timeline plots, for each serving codebook in turn."""
    return (timeline.with_columns(span=(pl.col("codebook_version") != pl.col("codebook_version").shift(1))
                                  .fill_null(True).cum_sum())
            .group_by("span", maintain_order=True)
            .agg(pl.col("codebook_version").first(), pl.col("as_of").first().alias("from"),
                 pl.col("as_of").last().alias("to"), pl.len().alias("days"),
                 *[getattr(pl.col(f"ne_{s}"), f)().round(4).alias(f"ne_{s}_{f}") for s in ("all", "new")
                   for f in ("min", "max")],
                 pl.col("ranker_retrained").sum().alias("retrains"),
                 *[(pl.col("drift_verdict") == v).sum().alias(v) for v in ("OK", "WARN", "ALERT")],
                 pl.col("semid_coverage").min().alias("coverage_min"))
            .drop("span"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeline", type=Path, default=Path("reports/loop/timeline.csv"))
    args = parser.parse_args()
    timeline = pl.read_csv(args.timeline, infer_schema_length=None)
    tasks, codebooks = seconds_by_task(timeline), by_codebook(timeline)
    with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print(f"{args.timeline}: {timeline.height} days, {timeline['as_of'][0]} .. {timeline['as_of'][-1]}, "
              f"{timeline['seconds'].sum() / 3600:.2f} h of loop time ({timeline['seconds'].mean():.1f} s a day), "
              f"{int(timeline['refreshed'].sum())} refresh(es), {int(timeline['ranker_retrained'].sum())} ranker "
              f"retrains")
        print("\nSeconds per day by task (mean over the days of each kind):")
        print(tasks)
        print("\nThe timeline's figures under each serving codebook:")
        print(codebooks)
    print(json.dumps({"days": timeline.height, "start": timeline["as_of"][0], "end": timeline["as_of"][-1],
                      "loop_hours": round(timeline["seconds"].sum() / 3600, 3),
                      "seconds_per_day": round(timeline["seconds"].mean(), 2),
                      "refreshes": int(timeline["refreshed"].sum()),
                      "ranker_retrains": int(timeline["ranker_retrained"].sum()),
                      "seconds_by_kind": tasks.to_dicts(), "codebooks": codebooks.to_dicts()}))


if __name__ == "__main__":
    main()

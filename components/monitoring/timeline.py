"""The loop over time (reports/loop/timeline.csv and timeline.html): one row per simulated day of `semid replay`.

row     as_of, what serves (codebook_version, store_version, champion from models/serving.json), whether the
        codebook was refreshed and the ranker retrained that day, the drift verdict and SemID coverage, NE on all
        and on new items of the day's ranker (the challenger when one was trained, else the champion), the
        day's wall seconds and seconds by task
page    the series as plots, codebook versions shaded and refreshes marked, so a reader sees at a glance when
        the codebook moved and what it did to NE and drift
"""
from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

import polars as pl

from components import serving, shards
from components.monitoring.page import png
from components.storage import Layout, write_text

HALF_DAY = dt.timedelta(hours=12)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def day_row(layout: Layout, as_of: str, seconds: float, seconds_by_task: dict[str, float]) -> dict:
    """The timeline row of the day the loop just ran, from the files its stages wrote."""
    live = serving.resolve(layout)
    rqvae = read_json(layout.record("rqvae"))
    ranker = read_json(layout.record("ranker"))
    drift = read_json(layout.reports / "drift" / "summary.json")
    return {
        "as_of": as_of,
        "codebook_version": live.codebook_version,
        "store_version": pl.read_parquet(shards.files(layout.root / live.store), columns=["codebook_version"])
        ["codebook_version"].unique().item() if live.store else None,
        "champion": live.champion,
        "refreshed": int(rqvae["refreshed"] and rqvae["replaced"] is not None),  # the first codebook is none
        "ranker_retrained": int(ranker["retrained"]),
        "drift_verdict": drift["verdict"],
        "semid_coverage": drift["checks"]["semid_coverage"]["value"],
        "ne_all": ranker["ne"]["all"],
        "ne_new": ranker["ne"]["new"],
        "seconds": round(seconds, 2),
        **{f"seconds_{task}": round(s, 2) for task, s in seconds_by_task.items()},
    }


def read_timeline(path: Path) -> pl.DataFrame | None:
    return pl.read_csv(path, infer_schema_length=None) if path.exists() else None


def append_row(path: Path, row: dict) -> pl.DataFrame:
    """timeline.csv with `row` as the row of its as_of (a re-run day replaces its earlier row), in day order."""
    frame = pl.DataFrame([row], infer_schema_length=None)
    before = read_timeline(path)
    if before is not None:
        frame = pl.concat([before.filter(pl.col("as_of") != row["as_of"]), frame], how="diagonal_relaxed")
    frame = frame.sort("as_of")
    write_text(frame.write_csv(), path)
    return frame


def plots(frame: pl.DataFrame) -> str:
    """NE, drift and coverage, seconds per day: codebook versions shaded, refreshes as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = frame["as_of"].str.to_datetime("%Y-%m-%d").to_list()  # datetimes: the half-day span edges
    fig, axes = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    versions = frame["codebook_version"].fill_null("none").to_list()
    start = 0
    shades = ("#e8eef8", "#f6efe2")
    for i in range(1, len(versions) + 1):
        if i == len(versions) or versions[i] != versions[start]:
            for ax in axes:  # each day's bar or point sits mid-span: half a day either side
                ax.axvspan(days[start] - HALF_DAY, days[i - 1] + HALF_DAY, color=shades[len(set(versions[:start])) % 2],
                           zorder=0)
            axes[0].annotate(f"codebook {versions[start][:8]}", (days[start], 1.0), xycoords=("data", "axes fraction"),
                             fontsize=7, va="top")
            start = i
    for day, refreshed in zip(days, frame["refreshed"].to_list(), strict=True):
        if refreshed:
            for ax in axes:
                ax.axvline(day, color="#b3261e", linestyle="--", linewidth=1)
    axes[0].plot(days, frame["ne_all"].to_list(), marker=".", label="NE, all items", color="#1a5fb4")
    axes[0].plot(days, frame["ne_new"].to_list(), marker=".", label="NE, new items", color="#6a9fdc")
    axes[0].set_ylabel("NE of the day's ranker\n(lower is better)")
    verdict = {"OK": 0, "WARN": 1, "ALERT": 2}
    axes[1].step(days, [verdict[v] for v in frame["drift_verdict"].to_list()], where="mid", color="#b26a00",
                 label="drift verdict")
    axes[1].set_yticks([0, 1, 2], ["OK", "WARN", "ALERT"])
    twin = axes[1].twinx()
    twin.plot(days, frame["semid_coverage"].to_list(), color="#1b7f3b", marker=".", label="SemID coverage")
    twin.set_ylabel("SemID coverage")
    axes[1].set_ylabel("drift verdict")
    axes[2].bar(days, frame["seconds"].to_list(), color="#777777", label="seconds per day")
    axes[2].set_ylabel("wall seconds")
    for ax in axes:
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    axes[0].set_title("The loop day by day (dashed red: codebook refresh)", fontsize=11)
    fig.autofmt_xdate()
    return png(fig)


def render(frame: pl.DataFrame) -> str:
    switches = frame.filter(pl.col("codebook_version").ne_missing(pl.col("codebook_version").shift(1)))
    rows = "".join(f"<tr><td>{html.escape(str(r['as_of']))}</td><td>{html.escape(str(r['codebook_version']))}</td>"
                   f"<td>{html.escape(str(r['champion']))}</td></tr>" for r in switches.iter_rows(named=True))
    last = frame.row(-1, named=True)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>semid loop timeline</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 10px}}</style>
</head><body><h1>The loop, {html.escape(frame['as_of'][0])} to {html.escape(last['as_of'])}</h1>
<p>{frame.height} day(s); {int(frame['refreshed'].sum())} codebook refresh(es); ranker retrained on
{int(frame['ranker_retrained'].sum())} day(s); serving now: codebook {html.escape(str(last['codebook_version']))},
champion {html.escape(str(last['champion']))}; mean {frame['seconds'].mean():.1f} s per day.</p>
<img alt="NE, drift, coverage and seconds per day" src="{plots(frame)}" style="max-width:100%">
<h2>When serving moved to another codebook</h2>
<table><tr><th>as_of</th><th>codebook_version</th><th>champion</th></tr>{rows}</table>
<p>Every row: timeline.csv beside this page.</p></body></html>
"""


def record_day(layout: Layout, as_of: str, seconds: float, seconds_by_task: dict[str, float]) -> dict:
    """Append the day's row to reports/loop/timeline.csv and redraw timeline.html; return the row."""
    row = day_row(layout, as_of, seconds, seconds_by_task)
    frame = append_row(layout.reports / "loop" / "timeline.csv", row)
    write_text(render(frame), layout.reports / "loop" / "timeline.html")
    return row

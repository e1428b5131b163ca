"""The `drift` stage (`semid drift`): has the item distribution moved away from what the codebook and the ranker
know, and what should the on-call engineer do about it?

load     the reference and current windows (drift.*), the current codebook's checkpoint record and its SemID
         store (a store of another codebook version is refused), impressions per item and day
check    the nine checks of components/monitoring/checks.py: semid_prefix_shift and feature_drift by Evidently,
         the others from the impressions, the store, the checkpoint and the embeddings
write    metrics/drift.json (numbers only), reports/drift/summary.json, summary.html (the on-call page),
         report.html (Evidently's) and a row of reports/drift/history.csv, each atomically and only once every
         check has run: bad input leaves the previous reports as they were
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import polars as pl

from components import provenance
from components.errors import DataError, SemidError
from components.monitoring import checks
from components.monitoring.codebook import codebook_age, codebook_fit
from components.monitoring.content import content_drift
from components.monitoring.evidently_report import evidently_table, run_report, save_html
from components.monitoring.page import churn_plot, movers_plot, render
from components.monitoring.traffic import (
    DriftWindows,
    churn_series,
    drift_windows,
    in_window,
    items_shown,
    label_drift,
    load_traffic,
    popularity_skew,
    raw_id_churn,
    semid_coverage,
    shares,
    totals,
    with_prefixes,
)
from components.params import DriftParams
from components.semid import rqvae
from components.semid.store import SemIdStore, open_store, read_store
from components.storage import Layout, write_json, write_text
from components.window import Window

log = logging.getLogger(__name__)

FAIL_ON = ("warn", "alert")
MIN_IMPRESSIONS = 1000  # a window with fewer gets a note on the page: its shares and rates are mostly noise


class DriftFailed(SemidError):
    """`semid drift --fail-on ...` and the verdict reached it; the message names the failing checks."""


def current_codebook(layout: Layout) -> tuple[str, Path, dict, SemIdStore]:
    """The current codebook's version, checkpoint file and record, and its SemID store (another version's store
    is refused: CodebookVersionMismatch)."""
    version, checkpoint = rqvae.read_current(layout.rqvae)
    _, ckpt = rqvae.load_checkpoint(checkpoint)
    if "quality" not in ckpt:
        raise DataError(f"{checkpoint}: the checkpoint has no quality record for codebook_fit (it predates the "
                        f"drift stage); re-run `semid train_rqvae`")
    return version, checkpoint, ckpt, open_store(read_store(layout.semids), version)


def measured(daily: pl.DataFrame, windows: DriftWindows, p: DriftParams, layout: Layout, ckpt: dict,
             store: SemIdStore) -> dict[str, tuple[float | None, dict]]:
    """Value and details of the seven checks computed outside Evidently."""
    current_items = totals(daily, windows.current)["item_id"]
    seen_before = in_window(daily, Window(windows.reference.start, windows.current.start))["item_id"].unique()
    trained_as_of = dt.date.fromisoformat(ckpt["window"]["end"])
    return {
        "raw_id_churn": raw_id_churn(daily, windows),
        "popularity_skew": popularity_skew(daily, windows),
        "label_drift": label_drift(daily, windows),
        "semid_coverage": semid_coverage(daily, windows),
        "content_drift": content_drift(layout.embeddings, totals(daily, windows.reference)["item_id"],
                                       current_items.filter(~current_items.is_in(seen_before.implode())),
                                       p.embedding_sample, p.seed),
        "codebook_fit": codebook_fit(current_items, store, ckpt["quality"], ckpt["config"]["codebook_size"]),
        "codebook_age": (codebook_age(windows.current.end, trained_as_of),
                         {"codebook_version": store.codebook_version, "trained_as_of": trained_as_of.isoformat()}),
    }


def judge(found: dict, judged: dict, limits: dict[str, checks.Limits]) -> dict[str, dict]:
    """Every check's entry of summary.json: value, status (Evidently's tests for the two it judges), thresholds,
    meaning, action, details and any note."""
    results = {}
    for check in checks.CHECKS:
        if check.name in judged:
            value, status, details = (judged[check.name][k] for k in ("value", "status", "details"))
        else:
            value, details = found[check.name]
            status = checks.status(value, limits[check.name], check.lower_is_worse)
        results[check.name] = {"value": None if value is None else round(value, 6), "status": status,
                               "warn": limits[check.name].warn, "alert": limits[check.name].alert,
                               "meaning": check.meaning, "action": check.action, "details": details}
        if details.get("note"):
            results[check.name]["note"] = details["note"]
    return results


def measure(p: DriftParams, layout: Layout, limits: dict[str, checks.Limits]) -> tuple[dict, dict]:
    """Every check's value, status and details (the summary), plus what the page and the report draw."""
    # load
    windows = drift_windows(p, layout.validated)
    version, checkpoint, ckpt, store = current_codebook(layout)
    traffic = load_traffic(layout.validated, windows, p.sample_rows, p.seed)
    daily = with_prefixes(traffic.daily, store)
    # check
    found = measured(daily, windows, p, layout, ckpt, store)
    keep = {key: shares(daily, windows, key).drop_nulls(key).sort(["reference", key], descending=[True, False])
            .head(p.prefix_buckets)[key] for key in ("l1", "l2")}
    tables = {w: evidently_table(items_shown(daily, getattr(windows, w)), traffic.samples[w], keep)
              for w in ("reference", "current")}
    snapshot, judged = run_report(tables["reference"], tables["current"], traffic.dense, limits)
    results = judge(found, judged, limits)
    # summarise
    summary = {
        "verdict": checks.verdict([r["status"] for r in results.values()]),
        "notes": [f"the {w} window holds {traffic.impressions[w]:,} impressions, too few for stable figures: "
                  f"widen drift.{w}_days" for w in ("reference", "current")
                  if traffic.impressions[w] < MIN_IMPRESSIONS],
        "as_of": windows.current.end.date().isoformat(),
        "windows": {w: {"start": f"{getattr(windows, w).start:%Y-%m-%d}", "end": f"{getattr(windows, w).end:%Y-%m-%d}",
                        "impressions": traffic.impressions[w]} for w in ("reference", "current")},
        "churn_lag_days": p.churn_lag_days,
        "codebook_version": version,
        "checks": results,
        "context": judged["context"],
        "provenance": {"code_version": provenance.code_version(),
                       "data_version": provenance.data_version([layout.validated.root, layout.embeddings,
                                                                layout.semids, checkpoint])},
    }
    return summary, {"snapshot": snapshot, "churn": churn_series(daily, p.churn_lag_days),
                     "level1": shares(daily, windows, "l1"), "current_start": windows.current.start.date()}


def metrics_of(summary: dict) -> dict:
    """metrics/drift.json: the verdict and each check's status as 0 (OK) / 1 (WARN) / 2 (ALERT), and each
    measured value; numbers only."""
    number = checks.STATUSES.index
    return {"verdict": number(summary["verdict"]),
            **{name: c["value"] for name, c in summary["checks"].items() if c["value"] is not None},
            "status": {name: number(c["status"]) for name, c in summary["checks"].items()}}


def history_row(summary: dict) -> dict:
    return {"as_of": summary["as_of"], "verdict": checks.STATUSES.index(summary["verdict"]),
            **{name: c["value"] for name, c in summary["checks"].items()}}


def update_history(path, row: dict) -> None:
    """Append the row to reports/drift/history.csv, replacing an earlier row of the same as_of."""
    new = pl.DataFrame([row], schema={"as_of": pl.String, "verdict": pl.Int64,
                                      **{c.name: pl.Float64 for c in checks.CHECKS}})
    if path.exists():
        try:
            old = pl.read_csv(path, schema=new.schema)
        except Exception as exc:  # a damaged history must not stop the report: it restarts, and says so
            log.warning("%s: unreadable (%s), starting a new history", path, exc)
        else:
            new = pl.concat([old.filter(pl.col("as_of") != row["as_of"]), new])
    write_text(new.sort("as_of").write_csv(), path)


def run_drift(p: DriftParams, layout: Layout, fail_on: str | None = None) -> dict:
    """Write the drift outputs and return the summary; with fail_on ("warn" or "alert"), raise DriftFailed
    naming the checks at or above it after writing."""
    if fail_on is not None and fail_on not in FAIL_ON:
        raise SemidError(f"--fail-on is {fail_on!r}, expected one of {', '.join(FAIL_ON)}")
    limits = checks.limits(p)
    summary, extra = measure(p, layout, limits)
    out = layout.reports / "drift"
    save_html(extra["snapshot"], out / "report.html")
    write_json(summary, out / "summary.json")
    plots = (churn_plot(extra["churn"], extra["current_start"], p.churn_lag_days), movers_plot(extra["level1"]))
    write_text(render(summary, *plots), out / "summary.html")
    write_json(metrics_of(summary), layout.metrics / "drift.json")
    update_history(out / "history.csv", history_row(summary))
    log.info("drift verdict %s as of %s: %s", summary["verdict"], summary["as_of"],
             ", ".join(f"{n} {c['status']}" for n, c in summary["checks"].items() if c["status"] != "OK") or "all OK")
    if fail_on is not None:
        floor = checks.STATUSES.index(fail_on.upper())
        failing = [f"{n} {c['status']} ({c['value']} vs warn {c['warn']}, alert {c['alert']})"
                   for n, c in summary["checks"].items() if checks.STATUSES.index(c["status"]) >= floor]
        if failing:
            raise DriftFailed(f"drift verdict {summary['verdict']} as of {summary['as_of']} (--fail-on {fail_on}): "
                              + "; ".join(failing))
    return summary


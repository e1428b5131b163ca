"""Evidently computes semid_prefix_shift and feature_drift, with its tests, and writes the detailed report.

It never gets a raw item ID. Its table holds two kinds of rows, and each metric reads the rows that carry its
column (Evidently drops the empty cells):
- one row per item shown in the window, with the item's level-1 and level-2 SemID prefix as categories (the
  drift.prefix_buckets prefixes shown with the most reference items by name, the rest as "other", items without
  a SemID as "none": thousands of sparse categories make PSI and Jensen-Shannon alarm on identical distributions
  and Evidently's categorical path slow). Items, not impressions: one day's impressions are dominated by a few
  head items, so impression shares over prefixes move as much between two quiet days (Jensen-Shannon 0.32-0.49
  on the default world) as under a topic shift (0.44); the mix of items shown moves with the content only
  (0.16-0.19 quiet, README "On call"). Concentration on the head is popularity_skew's to catch.
- one row per sampled impression (components/monitoring/traffic.py): the click label and the dense f_* features.

    semid_prefix_shift  ValueDrift(jensenshannon) per level, the value is the larger; PSI shown beside it
    feature_drift       ValueDrift(wasserstein, normed by the reference's std) per feature, the value is the largest
    context             ValueDrift(jensenshannon) of `clicked`

Each judged metric carries two Evidently tests: value <= warn (not critical: WARNING) and value <= alert (critical:
FAIL), so the report shows the same verdicts as the on-call page.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import polars as pl

from components.monitoring.checks import Limits
from components.monitoring.traffic import PREFIX_BASE
from components.storage import atomic_path

log = logging.getLogger(__name__)
EVIDENTLY_STATUS = {"SUCCESS": "OK", "WARNING": "WARN", "FAIL": "ALERT"}
LEVELS = {"semid_l1": "l1", "semid_l2": "l2"}


def evidently_table(items: pl.DataFrame, sample: pl.DataFrame, keep: dict[str, pl.Series]) -> pl.DataFrame:
    """The rows of one window: `items` (l1, l2 keys of each item shown) labelled by prefix, then the sampled
    impressions (clicked, f_*)."""
    def label(key: str, column: str) -> pl.Expr:
        name = (pl.col(key) // PREFIX_BASE).cast(pl.String) + "." + (pl.col(key) % PREFIX_BASE).cast(pl.String) \
            if key == "l2" else pl.col(key).cast(pl.String)
        return (pl.when(pl.col(key).is_null()).then(pl.lit("none"))
                .when(pl.col(key).is_in(keep[key].implode())).then(name).otherwise(pl.lit("other")).alias(column))
    prefixes = items.select(label("l1", "semid_l1"), label("l2", "semid_l2"))
    impressions = sample.select(pl.col("clicked").cast(pl.String), pl.col("^f_.*$"))
    return pl.concat([prefixes, impressions], how="diagonal")


def run_report(reference: pl.DataFrame, current: pl.DataFrame, dense: list[str], limits: dict[str, Limits]):
    """Run Evidently on the two windows' tables; return the snapshot (for save_html) and, for
    semid_prefix_shift and feature_drift, value, status (from Evidently's tests) and details."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no telemetry from a pipeline stage
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.tests import lte

    def tests(check: str) -> list:
        return [lte(limits[check].warn, is_critical=False), lte(limits[check].alert)]

    metrics = [ValueDrift(column=c, method="jensenshannon", tests=tests("semid_prefix_shift")) for c in LEVELS]
    metrics += [ValueDrift(column=c, method="psi") for c in LEVELS]
    metrics += [ValueDrift(column=f, method="wasserstein", tests=tests("feature_drift")) for f in dense]
    metrics += [ValueDrift(column="clicked", method="jensenshannon")]
    definition = DataDefinition(categorical_columns=[*LEVELS, "clicked"], numerical_columns=dense)
    snapshot = Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current.to_pandas(), data_definition=definition),
        Dataset.from_pandas(reference.to_pandas(), data_definition=definition))
    return snapshot, judged(snapshot.dict(), dense)


def save_html(snapshot, path: Path) -> None:
    """Evidently's self-contained report (its scripts embedded: it opens offline), written atomically."""
    with atomic_path(path) as tmp:
        snapshot.save_html(str(tmp))  # a str path: given a file object, save_html writes nothing


def judged(result: dict, dense: list[str]) -> dict[str, dict]:
    """The two checks Evidently judges, from snapshot.dict(): value, worst test status, and details."""
    values, statuses = {}, {}
    for metric in result["metrics"]:
        config = metric["config"]
        values[(config["column"], config["method"])] = float(metric["value"])
        statuses[metric["id"]] = []
    for test in result["tests"]:
        statuses[test["metric_config"]["metric_id"]].append(EVIDENTLY_STATUS[test["status"]])
    by_key = {(m["config"]["column"], m["config"]["method"]): statuses[m["id"]] for m in result["metrics"]}

    def check(keys: list[tuple[str, str]]) -> tuple[float | None, str]:
        if not keys:
            return None, "OK"
        worst = [s for k in keys for s in by_key[k]]
        return max(values[k] for k in keys), max(worst, key=["OK", "WARN", "ALERT"].index, default="OK")

    shift_keys = [(c, "jensenshannon") for c in LEVELS]
    feature_keys = [(f, "wasserstein") for f in dense]
    shift_value, shift_status = check(shift_keys)
    feature_value, feature_status = check(feature_keys)
    return {
        "semid_prefix_shift": {"value": shift_value, "status": shift_status, "details": {
            "jensenshannon": {f"level {i + 1}": round(values[(c, "jensenshannon")], 6) for i, c in enumerate(LEVELS)},
            "psi": {f"level {i + 1}": round(values[(c, "psi")], 6) for i, c in enumerate(LEVELS)}}},
        "feature_drift": {"value": feature_value, "status": feature_status, "details": (
            {"wasserstein": {f: round(values[(f, "wasserstein")], 6) for f in dense}} if dense
            else {"note": "the data has no dense f_* features: nothing to compare"})},
        "context": {"clicked_jensenshannon": round(values[("clicked", "jensenshannon")], 6)},
    }

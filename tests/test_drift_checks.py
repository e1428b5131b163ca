"""Unit tests of the drift checks: statuses, thresholds, and each view of the traffic on hand-made tables."""
import dataclasses
import datetime as dt

import numpy as np
import polars as pl
import pytest

from components.errors import ParamsError
from components.monitoring import checks
from components.monitoring.codebook import codebook_fit
from components.monitoring.content import domain_auc
from components.monitoring.drift import update_history
from components.monitoring.traffic import (
    DriftWindows,
    churn_series,
    label_drift,
    popularity_skew,
    raw_id_churn,
    semid_coverage,
    shares,
)
from components.params import DriftParams, DriftThresholds, Thresholds
from components.semid.store import SemIdStore
from components.window import Window

D0 = dt.date(2026, 1, 1)
WINDOWS = DriftWindows(reference=Window(D0, D0 + dt.timedelta(days=2)),
                       current=Window(D0 + dt.timedelta(days=2), D0 + dt.timedelta(days=3)),
                       read=Window(D0, D0 + dt.timedelta(days=3)))


def daily(rows: list[tuple[int, int, int, int, int | None]]) -> pl.DataFrame:
    """(day offset, item_id, impressions, clicks, level-1 prefix or None) -> the per-day table with l1, l2."""
    day, item, imp, clicks, l1 = zip(*rows)
    return pl.DataFrame({"day": [D0 + dt.timedelta(days=d) for d in day], "item_id": item, "impressions": imp,
                         "clicks": clicks, "l1": l1},
                        schema_overrides={"impressions": pl.UInt32, "clicks": pl.Int64, "l1": pl.Int64}
                        ).with_columns(l2=pl.col("l1") * 65536)


# ---------------------------------------------------------------------------------------------- statuses


def test_status_follows_the_thresholds_in_both_directions():
    up, down = checks.Limits(0.2, 0.4), checks.Limits(0.9999, 0.999)
    assert [checks.status(v, up) for v in (0.1, 0.2, 0.3, 0.41, None)] == ["OK", "OK", "WARN", "ALERT", "OK"]
    assert [checks.status(v, down, lower_is_worse=True) for v in (1.0, 0.9995, 0.99)] == ["OK", "WARN", "ALERT"]
    assert checks.verdict(["OK", "WARN", "OK"]) == "WARN" and checks.verdict(["ALERT", "WARN"]) == "ALERT"


def test_threshold_errors_name_the_key():
    def with_threshold(name, t):
        return dataclasses.replace(DriftParams(), thresholds=dataclasses.replace(DriftThresholds(), **{name: t}))
    with pytest.raises(ParamsError, match=r"drift.thresholds.label_drift: warn 0.5 is above alert 0.3"):
        checks.limits(with_threshold("label_drift", Thresholds(0.5, 0.3)))
    with pytest.raises(ParamsError, match=r"drift.thresholds.semid_coverage: warn 0.99 is below alert 0.999"):
        checks.limits(with_threshold("semid_coverage", Thresholds(0.99, 0.999)))
    with pytest.raises(ParamsError, match=r"drift.thresholds.raw_id_churn.alert is null"):
        checks.limits(with_threshold("raw_id_churn", Thresholds(0.3, None)))
    with pytest.raises(ParamsError, match="drift.max_codebook_age_days"):
        checks.limits(with_threshold("codebook_age", Thresholds(30, 182)))
    limits = checks.limits(dataclasses.replace(DriftParams(), max_codebook_age_days=60))
    assert limits["codebook_age"] == checks.Limits(60, DriftThresholds().codebook_age.alert)
    assert set(limits) == {c.name for c in checks.CHECKS}


# ---------------------------------------------------------------------------------------------- traffic views


def test_raw_id_churn_counts_current_impressions_on_items_the_reference_never_showed():
    frame = daily([(0, 1, 10, 1, 5), (1, 2, 10, 1, 5),  # reference: items 1, 2
                   (2, 1, 30, 3, 5), (2, 3, 10, 1, 6)])  # current: item 1 again, item 3 new
    value, details = raw_id_churn(frame, WINDOWS)
    assert value == pytest.approx(10 / 40)
    assert details["reference_items_gone"] == pytest.approx(0.5) and details["current_items"] == 2


def test_shares_weigh_items_or_impressions():
    frame = daily([(0, 1, 90, 0, 5), (0, 2, 10, 0, 6), (2, 1, 50, 0, 5), (2, 3, 50, 0, 6), (2, 4, 50, 0, 6)])
    items = shares(frame, WINDOWS, "l1").sort("l1")
    assert items["reference"].to_list() == [0.5, 0.5] and items["current"].to_list() == pytest.approx([1 / 3, 2 / 3])
    impressions = shares(frame, WINDOWS, "l1", weight="impressions").sort("l1")
    assert impressions["reference"].to_list() == [0.9, 0.1]


def test_popularity_skew_is_the_rise_of_the_top_share_over_the_median_reference_day():
    def day(d: int, top: int) -> list:  # 100 items a day (top 0.1% and 5.6% round to 1 and 6 items)
        return [(d, i, top if i == 0 else 10, 0, 1) for i in range(100)]
    value, details = popularity_skew(daily(day(0, 10) + day(1, 10) + day(2, 910)), WINDOWS)
    assert details["top_0.1%_share"] == {"reference_median_day": 0.01, "current": pytest.approx(910 / 1900)}
    assert value == pytest.approx(910 / 1900 - 0.01)
    spread, _ = popularity_skew(daily(day(0, 910) + day(1, 910) + day(2, 10)), WINDOWS)
    assert spread == 0.0  # spreading out is not flagged


def test_label_drift_is_the_relative_change_of_ctr():
    frame = daily([(0, 1, 100, 10, 5), (1, 2, 100, 10, 6), (2, 1, 100, 15, 5)])
    value, details = label_drift(frame, WINDOWS)
    assert value == pytest.approx(0.5) and details["ctr_reference"] == pytest.approx(0.1)
    assert details["by_prefix"][0] == {"prefix": 5, "impressions": 100, "ctr_current": 0.15, "ctr_reference": 0.1}
    none, details = label_drift(daily([(0, 1, 100, 0, 5), (2, 1, 100, 5, 5)]), WINDOWS)
    assert none is None and "no clicks" in details["note"]


def test_semid_coverage_counts_impressions_without_a_semid():
    value, details = semid_coverage(daily([(2, 1, 999, 0, 5), (2, 7, 1, 0, None)]), WINDOWS)
    assert value == pytest.approx(0.999) and details["examples"] == [7]


def test_churn_series_compares_each_day_with_lag_days_earlier():
    frame = daily([(0, 1, 10, 0, 5), (1, 2, 10, 0, 5), (1, 1, 30, 0, 5), (2, 3, 10, 0, 6)])
    series = churn_series(frame, lag_days=1)
    assert series["raw"].to_list()[0] is None  # no earlier day read
    assert series["raw"].to_list()[1:] == pytest.approx([10 / 40, 1.0])
    assert series["l1"].to_list()[1:] == pytest.approx([0.0, 1.0])


# ---------------------------------------------------------------------------------------------- codebook, content


def store(codes: np.ndarray) -> SemIdStore:
    table = pl.DataFrame({"item_id": np.arange(len(codes), dtype=np.int64),
                          **{f"c{l + 1}": codes[:, l].astype(np.int16) for l in range(codes.shape[1])}})
    return SemIdStore(None, "v", table)


def test_codebook_fit_flags_a_collapsed_codebook_not_a_healthy_one():
    rng = np.random.default_rng(0)
    trained = {"items": 5000, "utilization": [1.0, 1.0, 1.0], "collision_rate": 0.01}
    items = pl.Series(np.arange(400, dtype=np.int64))
    healthy, details = codebook_fit(items, store(rng.integers(0, 64, (400, 3))), trained, 64)
    collapsed, _ = codebook_fit(items, store(np.zeros((400, 3), dtype=int)), trained, 64)
    assert healthy < 0.1 and collapsed > 0.95 and details["current_items"] == 400
    few, details = codebook_fit(items[:10], store(rng.integers(0, 64, (400, 3))), trained, 64)
    assert few is None and "not measured" in details["note"]


def test_domain_auc_is_half_for_one_distribution_and_high_for_two():
    rng = np.random.default_rng(0)
    same = domain_auc(rng.normal(size=(300, 32)), rng.normal(size=(100, 32)), seed=0)
    moved = domain_auc(rng.normal(size=(300, 32)), rng.normal(size=(100, 32)) + 0.8, seed=0)
    assert 0.35 < same < 0.65 and moved > 0.95


def test_history_keeps_one_row_per_as_of(tmp_path):
    path = tmp_path / "history.csv"
    row = {"as_of": "2026-03-02", "verdict": 1, **{c.name: 0.1 for c in checks.CHECKS}}
    update_history(path, row)
    update_history(path, {**row, "as_of": "2026-03-01"})
    update_history(path, {**row, "verdict": 2})  # a re-run for the same as_of replaces its row
    history = pl.read_csv(path)
    assert history["as_of"].to_list() == ["2026-03-01", "2026-03-02"] and history["verdict"].to_list() == [1, 2]

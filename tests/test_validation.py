"""The validation gate: a valid dataset passes; each kind of bad input fails with its own message and leaves
the previous data/validated exactly as it was; a few bad rows within max_bad_fraction are quarantined."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner
from validation_data import DAYS, ITEMS, PER_DAY, START, events_frame, items_frame, set_value, write_raw

from components.cli import app
from components.data.validation import EventFile, batches, run_validate, select_window
from components.errors import DataError, ValidationFailed
from components.params import ValidationParams
from components.storage import Layout
from components.window import Window

EVENTS = DAYS * PER_DAY
DEFAULT = ValidationParams()


def snapshot(layout: Layout) -> dict:
    """Bytes and mtime of every file under data/validated and data/quarantine."""
    roots = [layout.validated.root, layout.quarantine]
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def validated_once(tmp_path_factory) -> Layout:
    """The good dataset after a passing run: the "last good" outputs every rejection must leave alone."""
    layout = Layout(tmp_path_factory.mktemp("validated-once"))
    write_raw(layout)
    assert run_validate(DEFAULT, layout)["success"]
    return layout


@pytest.fixture
def rejects(tmp_path, validated_once):
    """rejects(corrupt, params, error): on a copy of `validated_once`, corrupt data/raw and validate again;
    check that the gate raised `error`, recorded the failure and left the last good outputs untouched, and
    return the error's message."""
    def run(corrupt: Callable[[Layout], None], params: ValidationParams = DEFAULT,
            error: type[Exception] = ValidationFailed) -> str:
        shutil.copytree(validated_once.root, tmp_path, dirs_exist_ok=True)
        layout = Layout(tmp_path)
        before = snapshot(layout)
        corrupt(layout)
        with pytest.raises(error) as raised:
            run_validate(params, layout)
        assert snapshot(layout) == before
        metrics = json.loads(layout.record("validation").read_text())
        assert metrics["success"] is False and metrics["failures"]
        return str(raised.value)
    return run


def with_events(events: pl.DataFrame) -> Callable[[Layout], None]:
    return lambda layout: write_raw(layout, events=events)


def with_items(items: pl.DataFrame) -> Callable[[Layout], None]:
    return lambda layout: write_raw(layout, items=items)


def test_valid_dataset_passes_and_copies_every_file(validated_once):
    layout = validated_once
    metrics = json.loads(layout.record("validation").read_text())

    assert metrics["success"] and metrics["window"] == {"start": "2026-01-01", "end": "2026-01-04"}
    for table, rows, evaluated in [("items", ITEMS, 6), ("events", EVENTS, 14)]:
        assert metrics[table] == {"success": True, "rows": rows, "quarantined_rows": 0,
                                  "evaluated_expectations": evaluated, "failed_expectations": []}
    assert set(metrics["provenance"]) == {"code_version", "data_version"}
    raw_files = sorted(p.relative_to(layout.raw.root) for p in layout.raw.root.rglob("*.parquet"))
    assert raw_files == sorted(p.relative_to(layout.validated.root)
                               for p in layout.validated.root.rglob("*.parquet"))
    assert all((layout.raw.root / f).read_bytes() == (layout.validated.root / f).read_bytes() for f in raw_files)
    quarantine = pl.read_parquet(layout.quarantine / "events.parquet")
    assert quarantine.is_empty() and quarantine.columns == [*events_frame().columns, "reason", "source_file"]
    assert pl.read_parquet(layout.quarantine / "items.parquet").is_empty()
    assert "# Validation: PASSED" in (layout.reports / "validation" / "report.md").read_text()


def test_pinned_window_keeps_only_its_partitions(tmp_path):
    layout = Layout(tmp_path)
    write_raw(layout)
    params = dataclasses.replace(DEFAULT, window_start=dt.date(2026, 1, 2), window_end=dt.date(2026, 1, 4))
    metrics = run_validate(params, layout)
    assert metrics["events"]["rows"] == 2 * PER_DAY
    assert sorted(p.name for p in layout.validated.events.iterdir()) == ["date=2026-01-02", "date=2026-01-03"]


def test_missing_column(rejects):
    message = rejects(with_items(items_frame().drop("text")), error=DataError)
    assert "items is missing column(s) ['text']" in message and "items.parquet" in message


def test_wrong_dtype(rejects):
    events = events_frame().with_columns(pl.col("clicked").cast(pl.Int64))
    message = rejects(with_events(events), error=DataError)
    assert "date=2026-01-01/part-0.parquet: events.clicked has dtype Int64, expected Int8" in message


def test_truncated_parquet_file(rejects):
    def truncate(layout):
        path = layout.raw.partition(dt.date(2026, 1, 2)) / "part-0.parquet"
        path.write_bytes(path.read_bytes()[:200])

    message = rejects(truncate, error=DataError)
    path, _, reason = message.partition(": ")
    assert path.endswith("data/raw/events/date=2026-01-02/part-0.parquet")
    assert reason.startswith("unreadable parquet file")


def test_null_item_id(rejects):
    message = rejects(with_items(set_value(items_frame(), 3, "item_id", None)))
    assert ("items.item_id: expect_column_values_to_not_be_null (null) failed on 1 of 20 rows "
            "(e.g. (item_id=None, text=headline number 3))") in message.splitlines()


def test_duplicate_item_id(rejects):
    message = rejects(with_items(set_value(items_frame(), 4, "item_id", 1030)))
    lines = message.splitlines()
    assert ("items.item_id: expect_column_values_to_be_unique (duplicate) failed on 2 of 20 rows "
            "(e.g. 1030)") in lines
    # the events of the duplicated id fail with it
    assert any(line.startswith("events.item_id: expect_column_values_to_be_in_set (its item failed the items "
                               "checks)") and "(e.g. 1030" in line for line in lines)


@pytest.mark.parametrize("text", ["", " \t"])
def test_empty_or_blank_text(rejects, text):
    message = rejects(with_items(set_value(items_frame(), 2, "text", text)))
    assert (f"items.text: expect_column_values_to_not_match_regex (blank) failed on 1 of 20 rows "
            f"(e.g. (item_id=1020, text={text}))") in message.splitlines()


def test_retired_before_created(rejects):
    items = items_frame()
    items = set_value(items, 5, "retired_at", items["created_at"][5] - dt.timedelta(days=1))
    message = rejects(with_items(items))
    assert message.splitlines()[0] == (
        "items.retired_at: expect_column_pair_values_a_to_be_greater_than_b (before created_at) failed on 1 of 20 "
        "rows (e.g. (item_id=1050, retired_at=2025-12-01T05:00:00+00:00, created_at=2025-12-02T05:00:00+00:00))")


def test_event_for_unknown_item(rejects):
    message = rejects(with_events(set_value(events_frame(), 3, "item_id", 999)))
    assert message == ("events.item_id: expect_column_values_to_be_in_set (unknown item) failed on 1 of 120 rows "
                       "(e.g. 999)")


def test_event_before_its_item_was_created(rejects):
    events = set_value(events_frame(), 40, "item_id", 1000)  # item 1000 is created on day 2 at noon
    events = set_value(events, 40, "ts", START + dt.timedelta(days=1, hours=6))
    message = rejects(with_events(events))
    assert message == ("events.ts: expect_column_pair_values_a_to_be_greater_than_b (before its item's created_at) "
                       "failed on 1 of 120 rows (e.g. (ts=2026-01-02T06:00:00+00:00, item_id=1000, "
                       "item_created_at=2026-01-02T12:00:00+00:00))")


def test_label_outside_0_1(rejects):
    events = events_frame()
    for row, label in [(5, 2), (70, 7), (110, -1)]:
        events = set_value(events, row, "clicked", label)
    message = rejects(with_events(events))
    assert message == ("events.clicked: expect_column_values_to_be_in_set (not in {0, 1}) failed on 3 of 120 rows "
                       "(e.g. 2, 7, -1)")


def test_nan_dense_feature(rejects):
    message = rejects(with_events(set_value(events_frame(), 7, "f_0", math.nan)))
    assert message == "events.f_0: expect_column_values_to_not_be_null (NaN or null) failed on 1 of 120 rows (e.g. nan)"


def test_inf_dense_feature(rejects):
    events = set_value(set_value(events_frame(), 9, "f_1", math.inf), 50, "f_1", -math.inf)
    message = rejects(with_events(events))
    assert message == ("events.f_1: expect_column_values_to_be_between (infinite) failed on 2 of 120 rows "
                       "(e.g. inf, -inf)")


def test_timestamps_outside_a_pinned_window(rejects):
    params = dataclasses.replace(DEFAULT, window_start=dt.date(2026, 1, 1), window_end=dt.date(2026, 1, 3))
    events = set_value(events_frame(), 0, "ts", START - dt.timedelta(hours=1))
    lines = rejects(with_events(events), params).splitlines()
    assert lines == [
        "events.ts: expect_column_values_to_be_between (outside window 2026-01-01..2026-01-03) failed on 1 of 80 "
        "rows (e.g. 2025-12-31T23:00:00+00:00)",
        "events.ts: expect_column_pair_values_to_be_equal (outside its partition's day) failed on 1 of 80 rows "
        "(e.g. (ts=2025-12-31T23:00:00+00:00, partition_day=2026-01-01))"]


def test_empty_events_window(rejects):
    params = dataclasses.replace(DEFAULT, window_start=dt.date(2027, 1, 1), window_end=dt.date(2027, 2, 1))
    message = rejects(lambda layout: None, params)
    assert message.startswith("events: window 2027-01-01..2027-02-01 holds no events (0 file(s) in it; "
                              "partition days under")
    assert message.endswith("2026-01-01..2026-01-03)")


def test_few_bad_rows_are_quarantined_and_the_gate_passes(tmp_path, caplog):
    layout = Layout(tmp_path)
    items = set_value(items_frame(), 5, "text", "")  # item 1050: its events go too
    events = set_value(set_value(events_frame(), 45, "clicked", 2), 100, "f_0", math.nan)
    of_1050 = np.flatnonzero(events["item_id"].to_numpy() == 1050).tolist()
    assert 45 not in of_1050 and 100 not in of_1050
    write_raw(layout, items, events)
    params = dataclasses.replace(DEFAULT, max_bad_fraction=0.1, chunk_rows=2 * PER_DAY)  # 2 batches

    with caplog.at_level(logging.WARNING, logger="components.data.validation"):
        metrics = run_validate(params, layout)

    assert metrics["success"] and metrics["items"]["quarantined_rows"] == 1
    assert metrics["events"]["quarantined_rows"] == 2 + len(of_1050)
    assert any("events.clicked: expect_column_values_to_be_in_set (not in {0, 1}) failed on 1 of 120 rows"
               in r.message for r in caplog.records)
    quarantined = pl.read_parquet(layout.quarantine / "events.parquet")
    reasons = dict(zip(quarantined["ts"].to_list(), quarantined["reason"].to_list()))
    assert reasons[events["ts"][45]] == "clicked: not in {0, 1}"
    assert reasons[events["ts"][100]] == "f_0: NaN or null"
    assert {reasons[events["ts"][i]] for i in of_1050} == {"item_id: its item failed the items checks"}
    assert quarantined.filter(pl.col("reason") == "f_0: NaN or null")["source_file"].to_list() == [
        "events/date=2026-01-03/part-0.parquet"]
    items_out = pl.read_parquet(layout.quarantine / "items.parquet")
    assert items_out["item_id"].to_list() == [1050] and items_out["reason"].to_list() == ["text: blank"]

    validated = pl.concat([pl.read_parquet(p) for p in sorted(layout.validated.events.rglob("*.parquet"))])
    kept = [i for i in range(EVENTS) if i not in {45, 100, *of_1050}]
    assert validated.equals(events[kept])
    assert 1050 not in pl.read_parquet(layout.validated.items)["item_id"].to_list()
    for day in range(DAYS):  # a partition without quarantined rows is copied byte for byte
        name = f"events/date=2026-01-0{day + 1}/part-0.parquet"
        untouched = not quarantined.filter(pl.col("source_file") == name).height
        same = (layout.raw.root / name).read_bytes() == (layout.validated.root / name).read_bytes()
        assert same == untouched


def test_cli_exits_1_with_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("validation:\n  max_bad_fraction: 0.001\n")
    write_raw(Layout(), events=set_value(events_frame(), 5, "clicked", 2))
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: events.clicked: expect_column_values_to_be_in_set (not in {0, 1}) failed on 1 of "
                      "120 rows (e.g. 2)"]


def test_cli_validates_as_of_a_day(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("loop:\n  as_of: 2026-01-03\n")  # the loop's clock: two of the three days
    write_raw(Layout())
    assert CliRunner().invoke(app, ["validate"]).exit_code == 0
    record = json.loads(Layout().record("validation").read_text())
    assert record["window"] == {"start": "2026-01-01", "end": "2026-01-03"} and record["events"]["rows"] == 80
    assert CliRunner().invoke(app, ["validate", "--as-of", "2026-01-02"]).exit_code == 0
    assert json.loads(Layout().record("validation").read_text())["events"]["rows"] == 40
    assert sorted(p.name for p in Layout().validated.events.iterdir()) == ["date=2026-01-01"]


def test_window_defaults_to_the_datas_days_and_batches_keep_whole_files():
    days = [dt.date(2026, 1, d) for d in (3, 1, 2)]
    window, chosen = select_window(sorted((d, Path(f"{d}.parquet")) for d in days), DEFAULT)
    assert window == Window(dt.date(2026, 1, 1), dt.date(2026, 1, 4)) and len(chosen) == 3
    files = [EventFile(d, Path("x"), rows) for d, rows in zip(days * 2, [40, 40, 30, 100, 10, 10])]
    assert [[f.rows for f in b] for b in batches(files, 80)] == [[40, 40], [30], [100], [10, 10]]

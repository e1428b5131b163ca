"""Integration: `semid replay` over a quarterly boundary on a small world (hashing encoder, fast codebooks), run
through the real daily flow, DVC stages and Prefect (ephemeral API)."""
import datetime as dt
import json
import os
import subprocess
import sys

import polars as pl
import pytest
import torch

from components.storage import Layout
from test_pipeline import BIN, pipeline_repo

pytestmark = pytest.mark.integration
START, DAYS, BOUNDARY = dt.date(2026, 3, 29), 5, dt.date(2026, 4, 1)
WORLD = {"start": "2026-02-15", "days": 50, "active_items": 200, "impressions_per_day": 3000, "users": 500}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> tuple[Layout, pl.DataFrame, subprocess.CompletedProcess]:
    """A fresh git repo of this pipeline replayed from START for DAYS days."""
    # The switch after a refresh must not hinge on a few hundred clicks of a toy world: any challenger wins.
    root = pipeline_repo(tmp_path_factory.mktemp("replay"), WORLD, ranker={"promotion": {"max_ne_regression": 1.0}})
    proc = semid(root, "replay", "--start", START.isoformat(), "--days", str(DAYS))
    return Layout(root), pl.read_csv(root / "reports" / "loop" / "timeline.csv"), proc


def semid(root, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`semid ...` in `root`, running that checkout's code (as an editable install there would)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "components.cli", *args], cwd=root, capture_output=True, text=True,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"semid {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_one_refresh_on_the_boundary_day_and_one_codebook_before_it(replayed):
    layout, timeline, _ = replayed
    days = [(START + dt.timedelta(days=i)).isoformat() for i in range(DAYS)]
    assert timeline["as_of"].to_list() == days
    assert timeline.columns[:11] == ["as_of", "codebook_version", "store_version", "champion", "refreshed",
                                     "ranker_retrained", "drift_verdict", "semid_coverage", "ne_all", "ne_new",
                                     "seconds"]
    assert timeline.filter(pl.col("refreshed") == 1)["as_of"].to_list() == [BOUNDARY.isoformat()]
    versions = timeline["codebook_version"].to_list()
    assert sum(a != b for a, b in zip(versions, versions[1:])) == 1  # the serving codebook changes once
    before = timeline.filter(pl.col("as_of") < BOUNDARY.isoformat())["codebook_version"].unique()
    assert before.len() == 1 and versions[-1] != before.item()
    assert set(timeline["drift_verdict"]) <= {"OK", "WARN", "ALERT"} and (timeline["seconds"] > 0).all()
    assert {"seconds_land", "seconds_validate", "seconds_train_ranker"} <= set(timeline.columns)
    assert timeline["ranker_retrained"].to_list() == [1] * DAYS  # retrain_every_days 1


def test_every_days_store_and_champion_match_its_codebook(replayed):
    layout, timeline, _ = replayed
    assert (timeline["store_version"] == timeline["codebook_version"]).all()
    for row in timeline.iter_rows(named=True):
        ckpt = torch.load(layout.ranker / f"{row['champion']}.pt", weights_only=True)
        assert ckpt["codebook_version"] == row["codebook_version"]
    switches = [json.loads(line) for line in layout.serving_log.read_text().splitlines()]
    assert all(s["store"] == f"data/semids/{s['codebook_version']}.parquet" for s in switches)
    assert len({s["codebook_version"] for s in switches}) == 2  # the old triple stays on disk for rollback
    assert all((layout.root / s["store"]).exists() and (layout.root / s["ranker"]).exists() for s in switches)


def test_the_new_items_of_the_last_day_have_semids_in_the_serving_store(replayed):
    layout, timeline, _ = replayed
    live = json.loads(layout.serving.read_text())
    items = pl.read_parquet(layout.raw.items)  # landed as of the last day: every item known by then
    store = pl.read_parquet(layout.root / live["store"])
    assert items.join(store, on="item_id", how="anti").is_empty()
    newest = items.filter(pl.col("created_at") >= pl.col("created_at").max().dt.truncate("1d"))
    assert newest.height > 0 and timeline["semid_coverage"].to_list()[-1] == pytest.approx(1.0)


def test_the_timeline_page_draws_the_series(replayed):
    layout, _, _ = replayed
    page = (layout.reports / "loop" / "timeline.html").read_text()
    assert "data:image/png;base64," in page and "When serving moved to another codebook" in page
    assert BOUNDARY.isoformat() in page


def test_every_day_left_a_run_record_to_list_and_show(replayed):
    layout, timeline, _ = replayed
    lines = semid(layout.root, "runs", "list").stdout.strip().splitlines()
    assert len(lines) == DAYS and all(" Completed " in line for line in lines)
    boundary = next(line.split()[0] for line in lines if f"as of {BOUNDARY}" in line)
    record = json.loads(semid(layout.root, "runs", "show", boundary).stdout)
    assert record["params"]["loop"]["as_of"] == BOUNDARY.isoformat() and record["landed"]["as_of"] == str(BOUNDARY)
    assert set(record["seconds"]) == {"land", "validate", "embed", "train_rqvae", "backfill", "drift", "train_ranker",
                                      "publish", "push"}
    assert record["metrics"]["rqvae"]["refreshed"] == 1 and len(record["code_version"]) >= 40


def test_a_recorded_run_reproduces_with_identical_output_hashes(replayed, tmp_path):
    """The refresh day: new codebook, full backfill into a new store, a challenger on it, the switch."""
    layout, _, _ = replayed
    boundary = next(r.split()[0] for r in semid(layout.root, "runs", "list").stdout.splitlines()
                    if f"as of {BOUNDARY}" in r)
    proc = semid(layout.root, "runs", "reproduce", boundary, "--workdir", str(tmp_path / "again"), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["identical"] is True and summary["dirty"] is False
    same = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("same")]
    assert {"models/rqvae", "data/semids", "models/ranker", "models/serving.json", "metrics/ranker.json"} <= set(same)

"""The train_rqvae stage on a small world: window, metrics, gates, promotion, and the incremental loop
(new items are embedded and encoded alone while the codebook stays the same)."""
import dataclasses
import datetime as dt
import json
import shutil

import polars as pl
import pytest
import torch

from components.data.world import run_generate
from components.errors import DataError, ParamsError
from components.params import BackfillParams, EmbedParams, RQVAEParams
from components.semid import rqvae
from components.semid.backfill import run_backfill
from components.semid.embedding import run_embed
from components.semid.train_rqvae import (
    QualityGateFailed,
    active_items,
    last_boundary,
    run_train_rqvae,
    training_window,
)
from components.storage import Layout

FAST = RQVAEParams(codebook_size=16, latent_dim=8, hidden_dims=(32,), steps=150, warmup_steps=50,
                   batch_size=256, restart_every=25, max_collision_rate=0.3)  # K=16: 4,096 SemIDs in all
EMBED = EmbedParams(encoder="hashing-test")


@pytest.fixture
def world(tmp_path, small_world_params) -> Layout:
    """A small world, validated as is (the gate has its own tests), embedded with the fast test encoder."""
    layout = Layout(tmp_path)
    run_generate(small_world_params, layout)
    shutil.copytree(layout.raw.root, layout.validated.root)
    run_embed(EMBED, layout)
    return layout


def test_window_is_the_trailing_days_before_as_of(world):
    start, end = training_window(dataclasses.replace(FAST, window_days=5), world)
    assert end == dt.datetime(2026, 1, 11, tzinfo=dt.timezone.utc)  # the day after the last events day
    assert end - start == dt.timedelta(days=5)
    items = pl.read_parquet(world.validated.items)
    active = active_items(items, start, end)
    assert 0 < active.height < items.height
    assert (active["created_at"] < end).all()
    assert active.filter(pl.col("retired_at") < start).height == 0


def test_training_promotes_a_checkpoint_and_reports_quality(world):
    metrics = run_train_rqvae(FAST, world)
    assert metrics["promoted"] and min(metrics["utilization"]) >= 0.95
    assert set(metrics) >= {"codebook_version", "recon_loss", "utilization", "perplexity", "collision_rate",
                            "max_items_per_semid", "window", "provenance"}
    assert all(1 <= p <= 16 for p in metrics["perplexity"])
    shared = metrics["prefix_sharing"]  # ground-truth topics share SemID prefixes far more than random pairs
    assert shared["same_leaf"][0] > 2 * shared["random_pairs"][0]  # K=16 and a bag-of-words test encoder
    version, path = rqvae.read_current(world.rqvae)
    assert version == metrics["codebook_version"]
    assert torch.load(path, weights_only=True)["codebook_version"] == version
    assert json.loads(world.record("rqvae").read_text())["codebook_version"] == version
    assert (world.reports / "rqvae" / "utilization.csv").read_text().startswith("level,utilization\n1,")


def test_same_data_same_codebook_without_retraining(world, caplog):
    first = run_train_rqvae(FAST, world)
    with caplog.at_level("INFO"):
        second = run_train_rqvae(FAST, world)
    # the same day again: its refresh is reported as the first run did, the codebook reused, not retrained
    assert f"codebook {first['codebook_version']} was trained on this exact window and params: reused" \
        in caplog.text
    assert second == first
    (world.root / "models").rename(world.root / "models-first")  # a cold retrain reproduces it bit for bit
    assert run_train_rqvae(FAST, world)["codebook_version"] == first["codebook_version"]
    assert run_train_rqvae(dataclasses.replace(FAST, seed=1), world)["codebook_version"] != first["codebook_version"]


def test_failing_gate_keeps_the_previous_checkpoint_current(world):
    good = run_train_rqvae(FAST, world)
    pointer = (world.rqvae / "current.json").read_bytes()
    files = sorted(world.rqvae.iterdir())
    with pytest.raises(QualityGateFailed, match="collision_rate .* not promoted"):
        run_train_rqvae(dataclasses.replace(FAST, seed=3, max_collision_rate=0.0), world)
    assert (world.rqvae / "current.json").read_bytes() == pointer
    assert sorted(world.rqvae.iterdir()) == files
    failed = json.loads(world.record("rqvae").read_text())
    assert failed["promoted"] is False and failed["codebook_version"] != good["codebook_version"]


def test_too_few_items_in_the_window_is_a_clear_error(world):
    with pytest.raises(DataError, match="fewer than rqvae.codebook_size=4096"):
        run_train_rqvae(dataclasses.replace(FAST, codebook_size=4096), world)


def test_new_items_are_embedded_and_encoded_alone_under_a_frozen_codebook(world):
    """The production loop: the codebook is refreshed on a pinned window; items created after it get
    SemIDs from the frozen checkpoint, and only they are embedded and encoded."""
    p = dataclasses.replace(FAST, as_of=dt.date(2026, 1, 11))
    run_train_rqvae(p, world)
    first = run_backfill(BackfillParams(), world)
    items = pl.read_parquet(world.validated.items)
    n_new = max(1, items.height // 100)
    new = items.sample(n_new, seed=0).with_columns(
        item_id=pl.col("item_id") + 10**13, created_at=pl.datetime(2026, 1, 12, time_zone="UTC"),
        retired_at=pl.lit(None, dtype=items.schema["retired_at"]), text=pl.col("text") + " - new listing")
    pl.concat([items, new]).write_parquet(world.validated.items)
    assert run_embed(EMBED, world)["embedded"] == n_new
    assert run_train_rqvae(p, world)["codebook_version"] == first["codebook_version"]
    again = run_backfill(BackfillParams(), world)
    assert (again["encoded"], again["reused"], again["full_backfill"]) == (n_new, first["items"], False)


def test_default_world_semids_use_every_code_and_follow_topics(default_world, tmp_path):
    """The acceptance figures, measured: default world, MiniLM embeddings, default L, K and training."""
    layout, _ = default_world
    work = Layout(tmp_path)
    shutil.copytree(layout.raw.root, work.validated.root)
    shutil.copytree(layout.world, work.world)
    run_embed(EmbedParams(), work)
    metrics = run_train_rqvae(RQVAEParams(), work)
    print("utilization", metrics["utilization"], "collision", metrics["collision_rate"],
          "prefix sharing", metrics["prefix_sharing"])
    assert min(metrics["utilization"]) >= 0.95
    shared = metrics["prefix_sharing"]
    assert shared["same_leaf"][0] > 20 * shared["random_pairs"][0]
    assert shared["same_leaf"][1] > 20 * shared["random_pairs"][1]


def test_last_boundary_is_day_1_of_the_latest_refresh_month():
    months = (1, 4, 7, 10)
    assert last_boundary(dt.date(2026, 3, 31), months) == dt.date(2026, 1, 1)
    assert last_boundary(dt.date(2026, 4, 1), months) == dt.date(2026, 4, 1)
    assert last_boundary(dt.date(2026, 12, 15), months) == dt.date(2026, 10, 1)
    assert last_boundary(dt.date(2026, 2, 1), (11,)) == dt.date(2025, 11, 1)
    assert last_boundary(dt.date(2026, 2, 1), ()) is None


@pytest.fixture
def spring(tmp_path, small_world_params) -> Layout:
    """A small world from 2026-03-20 to 2026-04-04: across the April quarterly boundary."""
    layout = Layout(tmp_path)
    run_generate(dataclasses.replace(small_world_params, start=dt.date(2026, 3, 20), days=16), layout)
    shutil.copytree(layout.raw.root, layout.validated.root)
    run_embed(EMBED, layout)
    return layout


def test_the_codebook_stays_between_refreshes_and_is_renewed_on_the_boundary(spring, caplog):
    day = lambda d: dataclasses.replace(FAST, as_of=d)  # noqa: E731
    first = run_train_rqvae(day(dt.date(2026, 3, 28)), spring)
    assert first["refreshed"] and first["refresh_reason"] == "no codebook yet"
    kept = run_train_rqvae(day(dt.date(2026, 3, 31)), spring)
    assert not kept["refreshed"] and kept["codebook_version"] == first["codebook_version"]
    assert kept["trained_as_of"] == "2026-03-28"
    renewed = run_train_rqvae(day(dt.date(2026, 4, 1)), spring)  # as_of reaches day 1 of April
    assert renewed["refreshed"] and "refresh boundary 2026-04-01" in renewed["refresh_reason"]
    assert renewed["codebook_version"] != first["codebook_version"]
    assert rqvae.read_current(spring.rqvae)[0] == renewed["codebook_version"]
    after = run_train_rqvae(day(dt.date(2026, 4, 4)), spring)
    assert not after["refreshed"] and after["codebook_version"] == renewed["codebook_version"]
    assert json.loads((spring.metrics / "rqvae.json").read_text())["refreshed"] == 0


def test_force_and_a_drift_alert_refresh_out_of_cadence(spring):
    p = dataclasses.replace(FAST, as_of=dt.date(2026, 3, 30))
    first = run_train_rqvae(p, spring)
    forced = run_train_rqvae(p, spring, force=True)  # same window and params: the same codebook, retrained
    assert forced["refreshed"] and forced["refresh_reason"] == "forced (--force)"
    assert forced["codebook_version"] == first["codebook_version"]
    summary = spring.reports / "drift" / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"checks": {"codebook_fit": {"status": "ALERT"}}}))
    next_day = dataclasses.replace(p, as_of=dt.date(2026, 3, 31))
    assert not run_train_rqvae(next_day, spring)["refreshed"]  # refresh_on_drift is off by default
    on_drift = run_train_rqvae(dataclasses.replace(next_day, refresh_on_drift=True), spring)
    assert on_drift["refreshed"] and "codebook_fit at ALERT" in on_drift["refresh_reason"]
    with pytest.raises(ParamsError, match="rqvae.refresh_months holds 13"):
        run_train_rqvae(dataclasses.replace(p, refresh_months=(1, 13)), spring)


def test_a_day_run_again_reports_its_refresh_as_the_first_run_did(spring):
    """After a crash between the pointer's move and the end of the stage, the day's re-run is the first run."""
    day = lambda d: dataclasses.replace(FAST, as_of=d)  # noqa: E731
    first = run_train_rqvae(day(dt.date(2026, 3, 28)), spring)
    renewed = run_train_rqvae(day(dt.date(2026, 4, 1)), spring)
    metrics = (spring.metrics / "rqvae.json").read_bytes()
    again = run_train_rqvae(day(dt.date(2026, 4, 1)), spring)
    assert again == renewed and again["replaced"] == first["codebook_version"]
    assert (spring.metrics / "rqvae.json").read_bytes() == metrics
    assert not run_train_rqvae(day(dt.date(2026, 4, 2)), spring)["refreshed"]  # the next day keeps it

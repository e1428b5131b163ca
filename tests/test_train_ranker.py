"""The train_ranker stage on a small world: metrics, determinism, champion/challenger, bad input."""
import dataclasses
import datetime as dt
import json
import shutil

import numpy as np
import polars as pl
import pytest

from components import serving
from components.data.world import run_generate
from components.errors import CodebookVersionMismatch, DataError, ParamsError
from components.params import BackfillParams, EmbedParams, HistoryParams, RankerParams, RQVAEParams
from components.ranker import metrics as ranker_metrics
from components.ranker.evaluation import copy_partners
from components.ranker.promotion import load_ranker
from components.ranker.train_ranker import run_train_ranker
from components.semid.backfill import run_backfill
from components.semid.embedding import run_embed
from components.semid.store import SemIdStore, read_store
from components.semid.train_rqvae import run_train_rqvae
from components.storage import Layout, write_parquet

FAST_RQVAE = RQVAEParams(codebook_size=16, latent_dim=8, hidden_dims=(32,), steps=150, warmup_steps=50,
                         batch_size=256, restart_every=25, max_collision_rate=0.3)
SMALL = RankerParams(train_days=10, eval_hours=48, history=HistoryParams(length=8, seeds=4))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_world_params) -> Layout:
    """A small world with enough impressions to learn from (~100k training examples) -> validated (as is)
    -> test-encoder embeddings -> K=16 codebook -> SemID store."""
    layout = Layout(tmp_path_factory.mktemp("ranker-world"))
    run_generate(dataclasses.replace(small_world_params, days=14, active_items=300, impressions_per_day=10_000,
                                     users=1_000), layout)
    shutil.copytree(layout.raw.root, layout.validated.root)
    run_embed(EmbedParams(encoder="hashing-test"), layout)
    run_train_rqvae(FAST_RQVAE, layout)
    run_backfill(BackfillParams(), layout)
    return layout


@pytest.fixture
def world(prepared, tmp_path) -> Layout:
    """A private copy, so each test starts without a champion."""
    layout = Layout(tmp_path / "w")
    shutil.copytree(prepared.root, layout.root)
    return layout


def test_metrics_hold_ne_by_segment_drift_and_aar(world):
    m = run_train_ranker(SMALL, world)
    assert set(m["ne"]) == set(ranker_metrics.SEGMENTS)
    assert 0 < m["ne"]["all"] < 1  # minimum functionality: better than the base rate
    assert m["events"]["seen"] + m["events"]["new"] == m["events"]["all"]
    assert m["events"]["head"] + m["events"]["torso"] + m["events"]["tail"] == m["events"]["seen"]
    assert set(m["drift_sensitivity"]) == set(ranker_metrics.SEGMENTS)
    assert m["aar_pairs"] > 0 and m["aar"] == pytest.approx(0.0, abs=1e-6)  # exact copies share their SemID
    assert "attention" not in m  # bypass has none
    assert m["promotion"]["promoted"] and m["promotion"]["reason"] == "no champion yet"
    assert m["config"]["item_ids"] == "semid" and m["codebook_version"] == read_store(world.semids).codebook_version
    saved = json.loads(world.record("ranker").read_text())
    assert saved["model_version"] == m["model_version"] and saved["throughput"] == m["throughput"]
    assert "throughput" not in json.loads((world.metrics / "ranker.json").read_text())  # timings: record only
    assert (world.reports / "ranker" / "ne_by_segment.csv").read_text().startswith("segment,ne\nall,")
    live = serving.resolve(world)  # the first promotion switches codebook, store and champion together
    assert (live.champion, live.codebook_version, live.seq) == (m["model_version"], m["codebook_version"], 1)
    assert live.store == f"data/semids/{m['codebook_version']}.parquet"


def test_same_seed_and_data_give_the_same_model(world):
    first = run_train_ranker(SMALL, world)
    world.serving.unlink()  # nothing serves: a challenger is due again
    again = run_train_ranker(SMALL, world)
    assert again["model_version"] == first["model_version"] and again["ne"] == first["ne"]
    assert again["retrained"] is True


def test_the_champion_serves_on_until_a_challenger_is_due(world):
    day, next_day = dt.date(2026, 1, 14), dt.date(2026, 1, 15)  # the small world's events end on 2026-01-14
    first = run_train_ranker(SMALL, world, as_of=day)
    metrics, log = (world.metrics / "ranker.json").read_bytes(), world.serving_log.read_bytes()
    same_day = run_train_ranker(SMALL, world, as_of=day)  # the day again (a crash, a forced re-run): as at first
    assert same_day.pop("throughput") and same_day == {k: v for k, v in first.items() if k != "throughput"}
    assert (world.metrics / "ranker.json").read_bytes() == metrics
    assert world.serving_log.read_bytes() == log and serving.read(world).seq == 1
    weekly = run_train_ranker(dataclasses.replace(SMALL, retrain_every_days=7), world, as_of=next_day)
    assert weekly["retrained"] is False  # a day later, on a weekly cadence
    daily = run_train_ranker(SMALL, world, as_of=next_day)
    assert daily["retrained"] is True and daily["model_version"] != first["model_version"]
    changed = run_train_ranker(dataclasses.replace(SMALL, lr=0.002), world, as_of=next_day)
    assert changed["retrained"] is True  # a model param changed: the champion no longer is what params say


def test_a_worse_challenger_never_touches_the_champion(world):
    champion = run_train_ranker(SMALL, world)
    pointer = world.serving.read_bytes()
    strict = dataclasses.replace(SMALL, seed=1, promotion=dataclasses.replace(SMALL.promotion,
                                                                               max_ne_regression=-1.0))
    m = run_train_ranker(strict, world)
    assert not m["promotion"]["promoted"] and m["promotion"]["champion"] == champion["model_version"]
    assert m["promotion"]["champion_ne"] == pytest.approx(champion["ne"]["all"])
    assert world.serving.read_bytes() == pointer


def test_a_champion_that_saw_the_evaluation_window_is_not_compared(world):
    """Moving the window back puts the champion's training data inside the challenger's evaluation window."""
    champion = run_train_ranker(SMALL, world)
    earlier = dataclasses.replace(SMALL, train_days=8, train_end=dt.date(2026, 1, 11), eval_hours=24)
    m = run_train_ranker(earlier, world)
    assert m["promotion"]["promoted"] and m["promotion"]["champion_ne"] is None
    assert "inside this evaluation window" in m["promotion"]["reason"]
    assert m["model_version"] != champion["model_version"]


def test_checkpoint_refuses_semids_of_another_codebook_version(world):
    m = run_train_ranker(SMALL, world)
    path = world.root / "models" / "ranker" / f"{m['model_version']}.pt"
    store = read_store(world.semids)
    model, ckpt = load_ranker(path, store)
    assert ckpt["codebook_version"] == store.codebook_version
    with pytest.raises(CodebookVersionMismatch, match="never mix"):
        load_ranker(path, SemIdStore(store.path, "0123456789abcdef", store.table))


def test_items_without_semids_fall_back_to_rh_or_fail_as_params_say(world):
    store = pl.read_parquet(world.semids)
    write_parquet(store.filter(pl.col("item_id") % 10 != 0), world.semids)  # a tenth of the items lose theirs
    m = run_train_ranker(SMALL, world)
    assert m["examples"]["missing_semid"] > 0 and np.isfinite(m["ne"]["all"])
    with pytest.raises(DataError, match="ranker.missing_semid"):
        run_train_ranker(dataclasses.replace(SMALL, missing_semid="fail"), world)


def test_empty_evaluation_window_is_a_clear_error(world):
    last = sorted(world.validated.events.iterdir())[-1]
    for f in last.glob("*.parquet"):  # the last day keeps its partition but loses every event
        write_parquet(pl.read_parquet(f).head(0), f)
    with pytest.raises(DataError, match="empty evaluation window"):
        run_train_ranker(dataclasses.replace(SMALL, eval_hours=24), world)


def test_bad_params_name_the_key(world):
    with pytest.raises(ParamsError, match="ranker.item_ids"):
        run_train_ranker(dataclasses.replace(SMALL, item_ids="hashed"), world)
    with pytest.raises(ParamsError, match="ranker.parameterization"):
        run_train_ranker(dataclasses.replace(SMALL, parameterization="fourgram"), world)  # L = 3


def test_exact_copies_are_paired_by_content_hash(world):
    partners = copy_partners(world)
    truth = pl.read_parquet(world.world / "item_truth.parquet").filter(pl.col("copy_kind") == "exact")
    assert len(truth) and set(truth["item_id"]) <= set(partners["item_id"])
    pairs = partners.join(partners, left_on="partner", right_on="item_id")
    assert (pairs["item_id"] != pairs["partner"]).all()

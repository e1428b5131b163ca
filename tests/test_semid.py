"""SemIDs: backfill into the entity store (full, incremental, new version, streaming), the at-creation API,
the lookup joins, and the errors that leave the store untouched."""
import dataclasses
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from components.errors import CodebookVersionMismatch, DataError
from components.params import BackfillParams, RQVAEParams
from components.semid import rqvae
from components.semid.backfill import RUN_ONLY, SemIdAssigner, run_backfill
from components.semid.store import join_history_semids, join_semids, read_store
from components.storage import Layout

D = 24
TINY = RQVAEParams(levels=3, codebook_size=16, latent_dim=8, hidden_dims=(32,), steps=150, warmup_steps=50,
                   batch_size=256, restart_every=50)
BATCH = BackfillParams(batch_size=64)


def clustered(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    """Points around 20 centres: something the codes can describe."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(20, d)) * 3
    return (centres[g.integers(0, 20, n)] + 0.3 * g.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Two tiny checkpoints of different codebook versions (seeds), trained once per module: name ->
    (version, path, the trained model before saving)."""
    directory = tmp_path_factory.mktemp("rqvae")
    x = torch.from_numpy(clustered(2000))
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin (16 s instead of 0.5 s on 2 busy cores)
    try:
        for name, seed in (("a", 0), ("b", 1)):
            model, _ = rqvae.train(x, dataclasses.replace(TINY, seed=seed))
            out[name] = (*rqvae.save_checkpoint(model, directory, {}), model)
    finally:
        torch.set_num_threads(threads)
    return out


def install(layout: Layout, checkpoint: tuple) -> str:
    """Copy a checkpoint into the layout's models/rqvae and make it current."""
    version, path, _ = checkpoint
    layout.rqvae.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, layout.rqvae / path.name)
    rqvae.write_current(layout.rqvae, version)
    return version


def write_embeddings(layout: Layout, ids, x: np.ndarray) -> None:
    """An embeddings file as `semid embed` writes it: item_id, content_hash, vector Array(Float32, D)."""
    layout.embeddings.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"item_id": pl.Series(list(ids), dtype=pl.Int64),
                  "content_hash": [f"h{i}" for i in ids],
                  "vector": pl.Series(x, dtype=pl.Array(pl.Float32, x.shape[1]))}).write_parquet(layout.embeddings)


@pytest.fixture
def world(tmp_path, checkpoints) -> tuple[Layout, np.ndarray, np.ndarray]:
    """A layout with checkpoint a current and 500 items (ids 10, 13, 16, ...) embedded."""
    layout = Layout(tmp_path)
    install(layout, checkpoints["a"])
    ids, x = np.arange(500) * 3 + 10, clustered(500, seed=5)
    write_embeddings(layout, ids, x)
    return layout, ids, x


def test_full_backfill_writes_the_store_contract_and_metrics(world, checkpoints):
    layout, ids, x = world
    metrics = run_backfill(BATCH, layout)
    store = pl.read_parquet(layout.semids)
    version = checkpoints["a"][0]
    assert store.schema == pl.Schema({"item_id": pl.Int64, "codebook_version": pl.String,
                                      "c1": pl.Int16, "c2": pl.Int16, "c3": pl.Int16})
    assert store["item_id"].to_list() == ids.tolist() and store["codebook_version"].unique().to_list() == [version]
    expected = checkpoints["a"][2].assign(torch.from_numpy(x)).numpy()
    assert np.array_equal(store.select("c1", "c2", "c3").to_numpy(), expected)
    assert {k: metrics[k] for k in ("codebook_version", "items", "encoded", "reused", "dropped", "full_backfill")} \
        == {"codebook_version": version, "items": 500, "encoded": 500, "reused": 0, "dropped": 0,
            "full_backfill": True}
    semids = len(store.unique(["c1", "c2", "c3"]))
    assert metrics["collision_rate"] == pytest.approx((500 - semids) / 500)
    assert metrics["max_items_per_semid"] == store.group_by("c1", "c2", "c3").len()["len"].max()
    assert set(metrics["provenance"]) == {"code_version", "data_version"}
    saved = json.loads(layout.record("backfill").read_text())
    # timings and what this run encoded (it depends on the store it found) stay out of the file
    assert saved == {k: v for k, v in metrics.items() if k not in ("seconds", *RUN_ONLY)}


@pytest.mark.parametrize("batch_size", [37, 10_000])
def test_incremental_run_encodes_only_new_items_and_drops_gone_ones(world, batch_size):
    layout, ids, x = world
    params = BackfillParams(batch_size=batch_size)
    run_backfill(params, layout)
    before = pl.read_parquet(layout.semids)
    keep = np.ones(500, dtype=bool)
    keep[::7] = False  # 72 items retire
    new_ids, new_x = np.arange(40) * 3 + 11, clustered(40, seed=9)  # interleaved with the old ids
    all_ids = np.concatenate([ids[keep], new_ids])
    order = np.argsort(all_ids)
    write_embeddings(layout, all_ids[order], np.concatenate([x[keep], new_x])[order])
    metrics = run_backfill(params, layout)
    after = pl.read_parquet(layout.semids)
    assert (metrics["encoded"], metrics["reused"], metrics["dropped"], metrics["full_backfill"]) \
        == (40, int(keep.sum()), 72, False)
    assert after["item_id"].to_list() == sorted(all_ids.tolist())
    kept = before.filter(pl.col("item_id").is_in(ids[keep].tolist()))
    assert after.filter(pl.col("item_id").is_in(ids[keep].tolist())).equals(kept)


def test_a_new_codebook_version_replaces_the_whole_table(world, checkpoints):
    layout, ids, _ = world
    run_backfill(BATCH, layout)
    version_b = install(layout, checkpoints["b"])
    metrics = run_backfill(BATCH, layout)
    assert (metrics["codebook_version"], metrics["full_backfill"], metrics["encoded"]) == (version_b, True, 500)
    store = read_store(layout.semids)
    assert store.codebook_version == version_b and store.table["item_id"].to_list() == ids.tolist()


def test_a_mixed_or_foreign_store_is_rebuilt_whole(world, checkpoints, caplog):
    layout, ids, _ = world
    write_store(layout.semids, {int(i): (0, 0, 0) for i in ids[:10]}, version=checkpoints["a"][0])
    mixed = pl.read_parquet(layout.semids).with_columns(
        codebook_version=pl.when(pl.col("item_id") == ids[0]).then(pl.lit("other")).otherwise("codebook_version"))
    mixed.write_parquet(layout.semids)
    metrics = run_backfill(BATCH, layout)
    assert "ignoring the previous store" in caplog.text and "'other'" in caplog.text
    assert (metrics["full_backfill"], metrics["encoded"]) == (True, 500)
    assert read_store(layout.semids).codebook_version == checkpoints["a"][0]


def test_streaming_in_small_batches_gives_the_same_table_as_one_batch(world):
    layout, _, _ = world
    run_backfill(BackfillParams(batch_size=1_000_000), layout)
    whole = pl.read_parquet(layout.semids)
    layout.semids.unlink()
    run_backfill(BackfillParams(batch_size=7), layout)
    assert pl.read_parquet(layout.semids).equals(whole)


def test_at_creation_api_gives_the_backfill_codes(world, checkpoints):
    layout, ids, x = world
    run_backfill(BATCH, layout)
    assigner = SemIdAssigner.from_layout(layout)
    assert assigner.codebook_version == checkpoints["a"][0]
    picked = [3, 0, 499, 250]  # any order: rows come back in input order
    assert assigner.for_embeddings(ids[picked], x[picked]).equals(
        pl.read_parquet(layout.semids)[picked])


def test_checkpoint_round_trip_gives_identical_semids(checkpoints):
    version, path, trained = checkpoints["a"]
    loaded, _ = rqvae.load_checkpoint(path)
    ids, x = np.arange(1000), clustered(1000, seed=3)
    assert SemIdAssigner(loaded, version).for_embeddings(ids, x).equals(
        SemIdAssigner(trained, version).for_embeddings(ids, x))


def test_for_texts_embeds_then_assigns_and_copies_share_a_semid():
    from components.semid.embedding import embed_texts

    nouns, kinds = ("shoes", "coffee", "phone", "lamp", "tent"), ("red", "large", "cheap", "new")
    texts = [f"{nouns[i % 5]} {kinds[i % 4]} number {i % 100}" for i in range(700)]  # text i+100 copies text i
    vectors = embed_texts(texts, "hashing-test", 64)  # (700, 384)
    model, _ = rqvae.train(torch.from_numpy(vectors), dataclasses.replace(TINY, method="rqkmeans"))
    assigner = SemIdAssigner(model, "v", encoder="hashing-test")
    ids = list(range(len(texts)))
    frame = assigner.for_texts(ids, texts)
    assert frame.equals(assigner.for_embeddings(ids, vectors))
    assert frame[3, "c1":].equals(frame[103, "c1":])


def write_store(path, rows: dict, version: str = "v1") -> None:
    """A store by hand: rows maps item_id -> (c1, c2, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codes = {f"c{i + 1}": pl.Series([r[i] for r in rows.values()], dtype=pl.Int16)
             for i in range(len(next(iter(rows.values()))))}
    pl.DataFrame({"item_id": list(rows), "codebook_version": [version] * len(rows), **codes}).write_parquet(path)


def test_join_semids_adds_codes_in_frame_order_with_nulls_for_unknown_items(tmp_path):
    path = tmp_path / "semids.parquet"
    write_store(path, {1: (5, 6), 2: (7, 8), 3: (9, 10)})
    events = pl.DataFrame({"ad": [3, 99, 1, 3], "clicked": [1, 0, 0, 1]})
    out = join_semids(events, path, "v1", on="ad")
    assert out.to_dict(as_series=False) == {"ad": [3, 99, 1, 3], "clicked": [1, 0, 0, 1],
                                           "c1": [9, None, 5, 9], "c2": [10, None, 6, 10]}
    assert join_semids(events.lazy(), read_store(path), "v1", on="ad").collect().equals(out)


def test_join_history_semids_keeps_order_length_and_nulls(tmp_path):
    path = tmp_path / "semids.parquet"
    write_store(path, {1: (5, 6), 2: (7, 8), 3: (9, 10)})
    users = pl.DataFrame({"user": [1, 2, 3, 4], "history": [[3, 1, 99, 3], [], None, [None, 2]]},
                         schema_overrides={"history": pl.List(pl.Int64)})
    out = join_history_semids(users, path, "v1")
    assert out["history_c1"].to_list() == [[9, 5, None, 9], [], None, [None, 7]]
    assert out["history_c2"].to_list() == [[10, 6, None, 10], [], None, [None, 8]]
    assert out["history_c1"].dtype == pl.List(pl.Int16)
    assert join_history_semids(users.lazy(), path, "v1").collect().equals(out)


def test_asking_for_another_codebook_version_names_both_and_the_store(tmp_path):
    path = tmp_path / "semids.parquet"
    write_store(path, {1: (5, 6)}, version="bbbb")
    for join in (join_semids, join_history_semids):
        with pytest.raises(CodebookVersionMismatch, match=f"{path}: holds SemIDs of codebook_version bbbb, "
                                                          f"but codebook_version aaaa was asked for"):
            join(pl.DataFrame({"item_id": [1], "history": [[1]]}), path, "aaaa")


def test_read_store_refuses_mixed_versions_missing_columns_and_repeated_items(tmp_path):
    path = tmp_path / "semids.parquet"
    pl.DataFrame({"item_id": [1, 2], "codebook_version": ["a", "b"], "c1": [0, 1]}).write_parquet(path)
    with pytest.raises(DataError, match=r"holds codebook versions \['a', 'b'\], expected exactly one"):
        read_store(path)
    pl.DataFrame({"item_id": [1, 2], "c1": [0, 1]}).write_parquet(path)
    with pytest.raises(DataError, match="expected item_id Int64, codebook_version String, c1..cL"):
        read_store(path)
    pl.DataFrame({"item_id": [1, 1], "codebook_version": ["a", "a"], "c1": [0, 1]}).write_parquet(path)
    with pytest.raises(DataError, match=r"expected one row per item \(repeated e.g. \[1\]\)"):
        read_store(path)
    with pytest.raises(DataError, match="SemID store not found"):
        read_store(tmp_path / "nowhere.parquet")


def assert_untouched(layout: Layout, store: bytes, metrics: bytes) -> None:
    assert layout.semids.read_bytes() == store and (layout.metrics / "backfill.json").read_bytes() == metrics
    assert sorted(p.name for p in layout.semids.parent.iterdir()) == [layout.semids.name]  # no temp file left


def test_nan_vectors_are_refused_with_count_and_items_and_nothing_written(world):
    layout, ids, x = world
    run_backfill(BATCH, layout)
    store, metrics = layout.semids.read_bytes(), (layout.metrics / "backfill.json").read_bytes()
    x = x.copy()
    x[[4, 200, 450], 3] = [np.nan, np.inf, np.nan]
    write_embeddings(layout, ids, x)
    with pytest.raises(DataError, match=rf"{layout.embeddings}: column vector holds NaN, inf or null in 3 of 500 "
                                        rf"row\(s\).*item_id \[{ids[4]}, {ids[200]}, {ids[450]}\]"):
        run_backfill(BATCH, layout)
    assert_untouched(layout, store, metrics)


def test_wrong_dimension_and_missing_file_are_refused_and_nothing_written(world, checkpoints):
    layout, ids, x = world
    run_backfill(BATCH, layout)
    store, metrics = layout.semids.read_bytes(), (layout.metrics / "backfill.json").read_bytes()
    write_embeddings(layout, ids, x[:, :16])
    with pytest.raises(DataError, match=f"column vector has dimension 16, but checkpoint {checkpoints['a'][0]} "
                                        f"expects input_dim {D}"):
        run_backfill(BATCH, layout)
    assert_untouched(layout, store, metrics)
    layout.embeddings.unlink()
    with pytest.raises(DataError, match=r"embeddings not found \(run `semid embed` first\)"):
        run_backfill(BATCH, layout)
    assert_untouched(layout, store, metrics)


def test_unsorted_embeddings_are_refused(world):
    layout, ids, x = world
    write_embeddings(layout, ids[::-1], x)
    with pytest.raises(DataError, match=f"column item_id is not sorted and unique \\(item_id {ids[-2]} follows "
                                        f"{ids[-1]}\\)"):
        run_backfill(BATCH, layout)
    assert not layout.semids.exists()


def test_at_creation_api_refuses_bad_vectors(world):
    layout, ids, x = world
    assigner = SemIdAssigner.from_layout(layout)
    with pytest.raises(DataError, match=rf"vectors: shape \(2, 16\) for 2 item_ids, expected \(2, {D}\)"):
        assigner.for_embeddings(ids[:2], x[:2, :16])
    x = x[:3].copy()
    x[1, 0] = np.nan
    with pytest.raises(DataError, match=rf"1 row\(s\) hold NaN or inf.*item_id \[{ids[1]}\]"):
        assigner.for_embeddings(ids[:3], x)

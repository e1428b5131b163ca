"""The SemID entity store (PAPER.md, "Semantic ID", step 4): which codes each item has under one codebook version.

table   data/semids/<codebook_version>.parquet, one per codebook version: item_id Int64, codebook_version
        String, c1..cL Int16 (Int32 when K - 1 does not fit), sorted by item_id, exactly one codebook version per
        table; written by `semid backfill` (components/semid/backfill.py)
lookup  `join_semids` (target items) and `join_history_semids` (user-history lists) for feature generation;
        both refuse a store of another codebook version (CodebookVersionMismatch). `join_semids` is the one
        item -> codes join: the ranker's examples go through it too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from components import shards
from components.errors import CodebookVersionMismatch, DataError

EXAMPLES = 5  # item_ids quoted in an error message


def code_columns(levels: int) -> list[str]:
    """c1..cL: one column per level, coarse to fine."""
    return [f"c{level}" for level in range(1, levels + 1)]


def code_dtype(codebook_size: int) -> type[np.integer]:
    """The smallest signed type holding codes 0..K-1: int16 up to K = 32768, else int32."""
    return np.int16 if codebook_size - 1 <= np.iinfo(np.int16).max else np.int32


def store_schema(levels: int, codebook_size: int) -> pa.Schema:
    code = pa.from_numpy_dtype(code_dtype(codebook_size))
    return pa.schema([("item_id", pa.int64()), ("codebook_version", pa.string()),
                      *[(c, code) for c in code_columns(levels)]])


@dataclasses.dataclass(frozen=True)
class SemIdStore:
    """A validated entity store in memory: one codebook version, `table` holds item_id, c1..cL."""
    path: Path
    codebook_version: str
    table: pl.DataFrame

    @property
    def code_columns(self) -> list[str]:
        return self.table.columns[1:]


def read_store(path: str | Path) -> SemIdStore:
    """Read and validate the entity store: columns item_id Int64, codebook_version String, c1..cL integers,
    one codebook version, one row per item. Anything else is a DataError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: SemID store not found (run `semid backfill` first)")
    try:
        table = pl.read_parquet(shards.files(path))
    except Exception as exc:  # polars raises several kinds for a damaged file
        raise DataError(f"{path}: unreadable SemID store ({type(exc).__name__}: {exc})") from exc
    codes = table.columns[2:]
    expected = ["item_id", "codebook_version", *code_columns(len(codes))]
    if (table.columns != expected or not codes or table.schema["item_id"] != pl.Int64
            or table.schema["codebook_version"] != pl.String
            or not all(table.schema[c].is_integer() for c in codes)):
        raise DataError(f"{path}: SemID store has columns {table.schema}, expected item_id Int64, "
                        f"codebook_version String, c1..cL integers")
    versions = table["codebook_version"].unique().sort(nulls_last=True).to_list()
    if len(versions) != 1 or versions[0] is None:
        raise DataError(f"{path}: SemID store holds codebook versions {versions}, expected exactly one "
                        f"(re-run `semid backfill`)")
    ids = table["item_id"]
    if ids.null_count() or ids.is_duplicated().any():
        repeated = ids.filter(ids.is_duplicated()).unique().sort().head(EXAMPLES).to_list()
        raise DataError(f"{path}: SemID store has {ids.null_count()} null and repeated item_id(s), expected one "
                        f"row per item (repeated e.g. {repeated})")
    return SemIdStore(path, versions[0], table.drop("codebook_version"))


def open_store(store: SemIdStore | str | Path, codebook_version: str) -> SemIdStore:
    """The store, read if given as a path, checked to hold `codebook_version` and a code for every item."""
    store = store if isinstance(store, SemIdStore) else read_store(store)
    if store.codebook_version != codebook_version:
        raise CodebookVersionMismatch(
            f"{store.path}: holds SemIDs of codebook_version {store.codebook_version}, but codebook_version "
            f"{codebook_version} was asked for; SemIDs of two versions are different ID spaces and never mix "
            f"(re-run `semid backfill` under {codebook_version}, or build features for {store.codebook_version})")
    if any(store.table.null_count().row(0)):
        raise DataError(f"{store.path}: SemID store has null item_id or codes, expected integers in every "
                        f"item_id, {', '.join(store.code_columns)}")
    return store


def join_semids(frame: pl.DataFrame | pl.LazyFrame, store: SemIdStore | str | Path, codebook_version: str,
                on: str = "item_id") -> pl.DataFrame | pl.LazyFrame:
    """frame with c1..cL of the item in column `on` (null for items without a SemID), rows in frame order."""
    store = open_store(store, codebook_version)
    right = store.table.rename({"item_id": on})
    right = right.lazy() if isinstance(frame, pl.LazyFrame) else right
    return frame.join(right, on=on, how="left", maintain_order="left", validate="m:1")


def join_history_semids(frame: pl.DataFrame | pl.LazyFrame, store: SemIdStore | str | Path,
                        codebook_version: str, history_col: str = "history") -> pl.DataFrame | pl.LazyFrame:
    """frame with one List column per level, <history_col>_c1..: the codes of each item of the List[Int64]
    history, same order and length, null for items without a SemID (a null history stays null)."""
    store = open_store(store, codebook_version)
    ids = store.table["item_id"]
    return frame.with_columns(
        pl.col(history_col).list.eval(pl.element().replace_strict(ids, store.table[c], default=None))
        .alias(f"{history_col}_{c}") for c in store.code_columns)

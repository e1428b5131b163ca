"""The data contracts every stage trusts: column names and dtypes of items and events.

items:  item_id Int64 (unique, not null), created_at Datetime UTC, text Utf8 (not empty),
        category Utf8 (nullable), retired_at Datetime UTC (nullable, >= created_at)
events: ts Datetime UTC, user_id Int64, item_id Int64 (in items, ts >= its created_at),
        clicked Int8 in {0, 1}, optional dense features f_* (Float32, finite); f_item_age_days, when present,
        is the item's age at the impression in days (ts - created_at): the ranker's A/A test recomputes it for
        the copy it swaps in, every other f_* is taken as a feature of the impression's context

Value rules (nulls, ranges, references) are checked by the validation gate; this module fixes the shape.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from components.errors import DataError

UTC = pl.Datetime("us", "UTC")
DENSE_PREFIX = "f_"
ITEM_AGE = "f_item_age_days"

ITEMS = {"item_id": pl.Int64, "created_at": UTC, "text": pl.String, "category": pl.String, "retired_at": UTC}
EVENTS = {"ts": UTC, "user_id": pl.Int64, "item_id": pl.Int64, "clicked": pl.Int8}
DENSE = pl.Float32


def _same_dtype(expected: pl.DataType, found: pl.DataType) -> bool:
    """Datetimes match on time zone, whatever their unit (ms, us and ns all carry the same instants)."""
    if isinstance(expected, pl.Datetime):
        return isinstance(found, pl.Datetime) and found.time_zone == "UTC"
    return found == expected


def _describe(dtype: pl.DataType) -> str:
    return "Datetime UTC" if isinstance(dtype, pl.Datetime) and dtype.time_zone == "UTC" else str(dtype)


def check_schema(table: str, schema: pl.Schema, where: Path | str) -> None:
    """Raise DataError naming the file and column when `schema` breaks the contract of `table`."""
    expected = ITEMS if table == "items" else EVENTS
    missing = [c for c in expected if c not in schema]
    if missing:
        raise DataError(f"{where}: {table} is missing column(s) {missing}; "
                        f"the contract needs {list(expected)} (found {list(schema)})")
    for column, dtype in expected.items():
        if not _same_dtype(dtype, schema[column]):
            raise DataError(f"{where}: {table}.{column} has dtype {_describe(schema[column])}, "
                            f"expected {_describe(dtype)}")
    extra = [c for c in schema if c not in expected]
    if table == "items" and extra:
        raise DataError(f"{where}: items has unexpected column(s) {extra}; the contract allows {list(expected)}")
    for column in extra:
        if not column.startswith(DENSE_PREFIX):
            raise DataError(f"{where}: events has unexpected column {column!r}; "
                            f"only {list(expected)} and dense features named {DENSE_PREFIX}* are allowed")
        if schema[column] != DENSE:
            raise DataError(f"{where}: events.{column} has dtype {schema[column]}, expected Float32")


def dense_columns(schema: pl.Schema) -> list[str]:
    return [c for c in schema if c.startswith(DENSE_PREFIX)]


def read_schema(path: Path) -> pl.Schema:
    """The parquet schema of `path`, or a DataError that names the file when it cannot be read."""
    try:
        return pl.read_parquet_schema(path)
    except Exception as exc:  # polars raises several types for truncated or non-parquet files
        raise DataError(f"{path}: unreadable parquet file ({type(exc).__name__}: {exc})") from exc


def conform_items(df: pl.DataFrame) -> pl.DataFrame:
    """Cast a frame with the items columns to the exact contract dtypes and column order."""
    return df.select([pl.col(c).cast(t) for c, t in ITEMS.items()])


def conform_events(df: pl.DataFrame) -> pl.DataFrame:
    """Cast a frame with the events columns (and any f_* features) to the contract dtypes and order."""
    dense = [pl.col(c).cast(DENSE) for c in dense_columns(df.schema)]
    return df.select([pl.col(c).cast(t) for c, t in EVENTS.items()] + dense)

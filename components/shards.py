"""Sharded tables: one logical parquet table sorted by item_id, as one file or as a directory of parts.

form      <name>.parquet/ holds part-00000.parquet, part-00001.parquet, ... (each sorted by item_id, the parts in
          item_id order, no item in two parts) and manifest.json: each part's file, rows and item_id range, and
          the table's key-value metadata (an encoder version, a provenance record). The Ray engine writes this
          form, one part per shard task, so no process ever holds the whole table; the local engine writes one
          file. Readers go through `files`, `metadata` and `num_rows`, which accept both forms.
writing   the shard tasks write their parts into a staging directory (components/storage.py, staged_dir) and
          `write_manifest` checks them (in order, disjoint); the directory then replaces the table whole, whichever
          form it had before.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.errors import DataError
from components.storage import write_json

MANIFEST = "manifest.json"
FORMAT = "semid.sharded-parquet/1"
KEY = "item_id"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def read_manifest(path: Path) -> dict:
    """The manifest of a sharded table, checked to list parts that exist; DataError naming the file otherwise."""
    manifest = Path(path) / MANIFEST
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest}: unreadable manifest of the sharded table {path} ({exc}); expected the "
                        f"manifest.json written with its parts") from exc
    if found.get("format") != FORMAT or not isinstance(found.get("parts"), list):
        raise DataError(f"{manifest}: format {found.get('format')!r}, expected {FORMAT!r} with a list of parts")
    missing = [p["file"] for p in found["parts"] if not (Path(path) / p["file"]).is_file()]
    if missing:
        raise DataError(f"{manifest}: lists part(s) {missing[:5]} that are not in {path}")
    return found


def files(path: str | Path) -> list[Path]:
    """The parquet files of a table, in item_id order: the file itself, or the parts its manifest lists."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [path / p["file"] for p in read_manifest(path)["parts"]]


def metadata(path: str | Path) -> dict[str, str]:
    """The table's key-value metadata: the file's footer, or the manifest's."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path)["metadata"]
    found = pq.ParquetFile(path).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in found.items() if not k.startswith(b"ARROW:")}  # not Arrow's own


def num_rows(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p["rows"] for p in read_manifest(path)["parts"])
    return pq.ParquetFile(path).metadata.num_rows


def schema(path: str | Path) -> pa.Schema:
    """The Arrow schema of the table (of its first part)."""
    return pq.read_schema(files(path)[0])


def iter_batches(path: str | Path, batch_size: int, columns: list[str],
                 **read_options) -> Iterator[pa.RecordBatch]:
    """The table's rows in order, at most batch_size per batch, one part open at a time."""
    for file in files(path):
        yield from pq.ParquetFile(file, **read_options).iter_batches(batch_size=batch_size, columns=columns)


def row_shards(path: str | Path, shard_rows: int) -> list[dict]:
    """The table cut into shards of at most shard_rows consecutive rows of one file, in item_id order:
    {"index", "file", "start", "stop"} (rows start..stop-1 of that file)."""
    out = []
    for file in files(path):
        rows = pq.ParquetFile(file).metadata.num_rows
        for start in range(0, rows, shard_rows):
            out.append({"index": len(out), "file": str(file), "start": start, "stop": min(start + shard_rows, rows)})
    return out


def read_shard(shard: dict, columns: list[str]) -> pa.Table:
    """The rows of a shard: only the row groups that hold them are read."""
    file = pq.ParquetFile(shard["file"])
    groups, first, offset = [], None, 0
    for group in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if offset < shard["stop"] and offset + rows > shard["start"]:
            groups.append(group)
            first = offset if first is None else first
        offset += rows
    table = file.read_row_groups(groups, columns=columns)
    return table.slice(shard["start"] - first, shard["stop"] - shard["start"])


def part_record(file: Path, table: pa.Table) -> dict:
    """What the manifest says of a part written from `table` (sorted by item_id, at least one row)."""
    ids = table.column(KEY)
    return {"file": file.name, "rows": len(table), "min_item_id": ids[0].as_py(), "max_item_id": ids[-1].as_py()}


def write_manifest(directory: Path, parts: list[dict], table_metadata: dict[str, str], source: Path) -> None:
    """manifest.json of `directory` for `parts` (part_record's, in order), after checking that they are in
    item_id order with no item in two parts, as the table they were made from (`source`) must be."""
    for before, after in zip(parts, parts[1:]):
        if before["max_item_id"] >= after["min_item_id"]:
            raise DataError(f"{source}: column item_id is not sorted and unique (item_id {after['min_item_id']} "
                            f"follows {before['max_item_id']}), expected one row per item in item_id order")
    write_json({"format": FORMAT, "key": KEY, "rows": sum(p["rows"] for p in parts), "parts": parts,
                "metadata": table_metadata}, directory / MANIFEST)

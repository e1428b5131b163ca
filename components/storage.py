"""Where every artifact lives, and how it is written: always to a temporary name, then renamed into place,
so a crash never leaves a half-written file or directory behind."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from components.errors import DataError


@dataclasses.dataclass(frozen=True)
class DataDir:
    """One copy of the raw layout: items.parquet and events/date=YYYY-MM-DD/*.parquet."""
    root: Path

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def events(self) -> Path:
        return self.root / "events"

    def partition(self, day: dt.date) -> Path:
        return self.events / f"date={day.isoformat()}"

    def write_items(self, items: pl.DataFrame) -> None:
        write_parquet(items, self.items)

    def write_events(self, day: dt.date, events: pl.DataFrame, part: int = 0) -> None:
        """Write one file of the day's partition (the caller has kept only that day's rows)."""
        path = self.partition(day) / f"part-{part}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(events, path)

    def event_files(self) -> list[tuple[dt.date, Path]]:
        """Every events file with the day its partition names, in day order."""
        if not self.events.is_dir():
            raise DataError(f"{self.events}: events directory not found (expected "
                            f"{self.events}/date=YYYY-MM-DD/*.parquet)")
        files = []
        for part in sorted(self.events.iterdir()):
            if not part.is_dir():
                continue
            key, _, value = part.name.partition("=")
            try:
                day = dt.date.fromisoformat(value)
            except ValueError:
                day = None
            if key != "date" or day is None:
                raise DataError(f"{part}: partition directory must be named date=YYYY-MM-DD")
            files += [(day, f) for f in sorted(part.glob("*.parquet"))]
        return files


@dataclasses.dataclass(frozen=True)
class Layout:
    """All paths of the pipeline, relative to the repository root (the directory dvc runs in)."""
    root: Path = Path(".")

    @property
    def raw(self) -> DataDir:
        return DataDir(self.root / "data" / "raw")

    @property
    def validated(self) -> DataDir:
        return DataDir(self.root / "data" / "validated")

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def world(self) -> Path:
        """Ground truth of the synthetic world (taxonomy, item topics, copies): never an input to models."""
        return self.root / "data" / "world"

    @property
    def embeddings(self) -> Path:
        """CU embeddings of validated items: item_id, content_hash, vector (also the re-run cache)."""
        return self.root / "data" / "embeddings" / "items.parquet"

    @property
    def rqvae(self) -> Path:
        """RQ-VAE checkpoints, one file per codebook version, and the `current` pointer."""
        return self.root / "models" / "rqvae"

    @property
    def ranker(self) -> Path:
        """Ranker checkpoints, one file per model version (models/serving.json names the champion)."""
        return self.root / "models" / "ranker"

    @property
    def serving(self) -> Path:
        """The serving pointer: codebook version, SemID store and ranker champion together
        (components/serving.py)."""
        return self.root / "models" / "serving.json"

    @property
    def serving_log(self) -> Path:
        """Every switch of the serving pointer, oldest first: what `semid rollback` goes back to."""
        return self.root / "models" / "serving_log.jsonl"

    def store(self, codebook_version: str) -> Path:
        """The SemID entity store of one codebook version: item_id, codebook_version, c1..cL."""
        return self.root / "data" / "semids" / f"{codebook_version}.parquet"

    @property
    def semids(self) -> Path:
        """The store of the current codebook (models/rqvae/current.json), the one the stages work on."""
        pointer = self.rqvae / "current.json"
        try:
            return self.store(json.loads(pointer.read_text())["codebook_version"])
        except FileNotFoundError:
            raise DataError(f"{pointer}: no current RQ-VAE checkpoint (run `semid train_rqvae` first)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{pointer}: unreadable pointer, expected {{\"codebook_version\": ...}} ({exc})") from exc

    @property
    def stream(self) -> DataDir:
        """The whole generated event stream that `semid replay` lands into data/raw one day at a time."""
        return DataDir(self.root / "data" / "stream")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def record(self, stage: str) -> Path:
        """reports/<stage>/record.json: everything behind a stage's metrics, strings and provenance included."""
        return self.reports / stage / "record.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    tmp = _temp_sibling(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet(data: pl.DataFrame | Iterable[pa.Table], path: Path, metadata: dict[str, str] | None = None,
                  schema: pa.Schema | None = None) -> None:
    """Write a frame, or a stream of Arrow tables of `schema` (memory bounded by one table), to `path` atomically,
    zstd-compressed with statistics. `metadata` goes into the file's key-value metadata (an encoder version, a
    provenance record), where `pl.read_parquet_metadata` finds it."""
    with atomic_path(path) as tmp:
        if isinstance(data, pl.DataFrame):
            data.write_parquet(tmp, compression="zstd", statistics=True, metadata=metadata)
        else:
            with pq.ParquetWriter(tmp, schema.with_metadata(metadata), compression="zstd") as writer:
                for table in data:
                    writer.write_table(table)


def write_json(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


RECORD_ONLY = ("config", "window", "provenance", "gate")  # settings and versions behind the figures: record only


def numbers_only(figures: dict) -> dict:
    """The numeric leaves of `figures`, nesting kept: booleans as 0/1, a list of numbers keyed by position
    ("1", "2", ...); strings, nulls, lists of records and the RECORD_ONLY sections left out."""
    out = {}
    for key, value in figures.items():
        if key in RECORD_ONLY:
            continue
        if isinstance(value, dict):
            value = numbers_only(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            value = {str(i): v if not isinstance(v, bool) else int(v) for i, v in enumerate(value, 1)}
        elif isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, (int, float)):
            continue
        if value != {}:
            out[key] = value
    return out


def write_metrics(figures: dict, path: Path, record: Path, timings: dict | None = None) -> None:
    """A stage's figures in two files: `path` (metrics/<stage>.json) holds the numbers only, the table that
    `dvc metrics show` and `dvc metrics diff` read, the same for the same inputs; `record`
    (reports/<stage>/record.json) holds all of them, with the versions, config, windows, provenance and curves
    that produced the numbers, and the run's `timings`, which differ from run to run."""
    write_json({**figures, **(timings or {})}, record)
    write_json(numbers_only(figures), path)


def write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` whole, on error it is deleted
    and `path` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

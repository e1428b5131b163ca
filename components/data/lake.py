"""The raw lake: where raw partitions land, `<storage.root>/raw/` (items.parquet, events/date=YYYY-MM-DD/*.parquet).

With the default root (`data`), the lake is the workspace's own data/raw, the DVC dep of validate. With any other
root (s3://bucket/prefix, or a local directory outside the workspace) the objects stay in the lake and data/raw
holds only its listing, lake.json: every key with its checksum. The listing is what DVC versions, so validate
re-runs exactly when the lake changed, and reads the objects it lists, each verified against its checksum:
one object at a time into a spool beside data/raw (bounded memory; only the days in the validation window).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.progress import track

from components.errors import DataError
from components.storage import UMASK, DataDir, Lake, Layout, LocalLake, staged_dir, write_json

log = logging.getLogger(__name__)

LISTING = "lake.json"
ITEMS = "items.parquet"


def raw_lake(root: str, layout: Layout) -> Lake:
    """Where raw partitions land for storage.root `root`."""
    return Lake.at(root, layout.root).child("raw")


def in_place(lake: Lake, layout: Layout) -> bool:
    """Whether the lake is the workspace's own data/raw (the default root): then there is no listing."""
    return isinstance(lake, LocalLake) and lake.root.resolve() == layout.raw.root.resolve()


def key_day(key: str) -> dt.date | None:
    """The day an events key's partition names (events/date=YYYY-MM-DD/...), None for other keys."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "events" and parts[1].startswith("date="):
        try:
            return dt.date.fromisoformat(parts[1][len("date="):])
        except ValueError:
            pass
    return None


def sync(files: dict[str, Path], lake: Lake, remove: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """Make the lake hold `files` ({key: local path}): a key already there with the same checksum is left alone,
    and keys for which `remove(key)` holds are deleted. Returns the keys (copied, removed)."""
    from components.storage import s3_checksum, same_checksum

    present = lake.checksums()
    copied, removed = [], []
    for key in track(sorted(files), description=f"landing in {lake.url}", disable=len(files) < 20):
        if key in present and same_checksum(present[key], s3_checksum(files[key])):
            continue
        lake.put_file(files[key], key)
        copied.append(key)
    for key in sorted(k for k in present if k not in files and remove(k)):
        lake.delete(key)
        removed.append(key)
    return copied, removed


def land_files(source: DataDir, lake: Lake, layout: Layout, remove: Callable[[str], bool]) -> tuple[list, list]:
    """Land every file of `source` (a raw layout) in the lake, delete the keys `remove` picks, and list the lake
    in data/raw unless it is data/raw itself. Returns the keys (copied, removed)."""
    files = {p.relative_to(source.root).as_posix(): p for p in sorted(source.root.rglob("*.parquet"))}
    copied, removed = sync(files, lake, remove)
    if in_place(lake, layout):
        (layout.raw.root / LISTING).unlink(missing_ok=True)  # left by an earlier root outside the workspace
    else:
        write_listing(lake, layout)
    return copied, removed


def spool_dir(layout: Layout, tag: str) -> Path:
    """An empty directory beside data/raw, named for this process: a killed run's is swept by the next command
    (components/storage.py, sweep_temporaries)."""
    layout.raw.root.parent.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix=f".raw.{os.getpid()}-{tag}", suffix=".tmp", dir=layout.raw.root.parent))
    spool.chmod(0o777 & ~UMASK)
    return spool


@contextlib.contextmanager
def landing_in(lake: Lake, layout: Layout) -> Iterator[DataDir]:
    """A directory to write a whole raw layout into (generate, a MovieLens import): data/raw itself when the lake
    is data/raw, else a spool whose files are landed in the lake, replacing what it held, then removed."""
    if in_place(lake, layout):
        yield layout.raw
        return
    spool = spool_dir(layout, "landing")
    try:
        yield DataDir(spool / "raw")
        copied, removed = land_files(DataDir(spool / "raw"), lake, layout, remove=lambda key: True)
        log.info("landed %d object(s) in %s, removed %d", len(copied), lake.url, len(removed))
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def write_listing(lake: Lake, layout: Layout) -> dict:
    """data/raw/lake.json: the lake's url and every raw object with its checksum (data/raw replaced whole)."""
    objects = lake.checksums()
    if ITEMS not in objects:
        raise DataError(f"{lake.url}/{ITEMS}: not found; the lake holds no items table to list")
    listing = {"url": lake.url, "objects": [{"key": k, "checksum": c} for k, c in sorted(objects.items())]}
    with staged_dir(layout.raw.root) as tmp:
        write_json(listing, tmp / LISTING)
    return listing


def read_listing(layout: Layout) -> dict | None:
    """The listing in data/raw, or None when data/raw holds the files themselves."""
    import json

    path = layout.raw.root / LISTING
    if not path.exists():
        return None
    try:
        listing = json.loads(path.read_text())
        return {"url": listing["url"], "objects": {o["key"]: o["checksum"] for o in listing["objects"]}}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable lake listing, expected {{\"url\", \"objects\": [{{\"key\", "
                        f"\"checksum\"}}]}} ({exc})") from exc


def lake_of_listing(listing: dict) -> Lake:
    url = listing["url"]
    return Lake.at(url) if url.startswith("s3://") else LocalLake(Path(url))


def raw_days(layout: Layout) -> list[dt.date]:
    """The events days data/raw holds or lists, in order."""
    listing = read_listing(layout)
    if listing is None:
        return sorted({day for day, _ in layout.raw.event_files()})
    return sorted({d for d in map(key_day, listing["objects"]) if d is not None})


@contextlib.contextmanager
def readable_raw(layout: Layout, keep_day: Callable[[list[dt.date]], Callable[[dt.date], bool]]) -> Iterator[DataDir]:
    """data/raw as a directory of files. With a listing: items and the listed partitions of the days that
    `keep_day(all listed days)` keeps, fetched one object at a time into a spool (each checked against its
    listed checksum), removed afterwards."""
    listing = read_listing(layout)
    if listing is None:
        yield layout.raw
        return
    lake = lake_of_listing(listing)
    objects = listing["objects"]
    if ITEMS not in objects:
        raise DataError(f"{layout.raw.root / LISTING}: lists no {ITEMS}")
    keep = keep_day(sorted({d for d in map(key_day, objects) if d is not None}))
    wanted = [ITEMS] + [k for k in sorted(objects) if (day := key_day(k)) is not None and keep(day)]
    spool = spool_dir(layout, "reading")
    try:
        for key in track(wanted, description=f"reading {lake.url}", disable=len(wanted) < 20):
            lake.fetch(key, spool / key, objects[key])
        log.info("read %d object(s) of %s listed in %s", len(wanted), lake.url, layout.raw.root / LISTING)
        yield DataDir(spool)
    finally:
        shutil.rmtree(spool, ignore_errors=True)

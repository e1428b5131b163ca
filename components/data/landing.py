"""Landing (`semid land`): the lake data/raw as it stood on a day, cut from the whole generated stream.

The world is generated once into data/stream (`semid replay` does it; same world params, same stream). Landing
as of day D makes data/raw hold exactly what was known before D:

    events   the stream's partitions date < D, copied (each partition staged, then renamed into place);
             partitions on or after D are removed, so a replay can restart from an earlier day
    items    the items created before D; a retirement on or after D is not known yet (retired_at null)

Copying is idempotent: a partition already landed with the same bytes is left alone, so a daily landing copies
one day.
"""
from __future__ import annotations

import datetime as dt
import filecmp
import logging
import shutil

import polars as pl

from components.errors import DataError
from components.storage import DataDir, staged_dir
from components.window import utc_midnight

log = logging.getLogger(__name__)


def same_partition(a: DataDir, b: DataDir, day: dt.date) -> bool:
    """Whether the partition of `day` holds the same files with the same bytes in both."""
    left, right = a.partition(day), b.partition(day)
    if not right.is_dir():
        return False
    names = sorted(p.name for p in left.iterdir())
    return names == sorted(p.name for p in right.iterdir()) and all(
        filecmp.cmp(left / n, right / n, shallow=False) for n in names)


def land(stream: DataDir, lake: DataDir, as_of: dt.date) -> dict:
    """Make `lake` hold what `stream` knew before `as_of`; return what moved."""
    if not stream.items.exists():
        raise DataError(f"{stream.items}: no generated stream to land from (`semid replay` generates it)")
    days = sorted({day for day, _ in stream.event_files()})
    if not days or as_of <= days[0]:
        raise DataError(f"{stream.events}: the stream starts {days[0] if days else 'nowhere'}, so as of {as_of} "
                        f"there is nothing to land; expected an as_of after its first day")
    if as_of > days[-1] + dt.timedelta(days=1):
        raise DataError(f"{stream.events}: the stream ends {days[-1]}, so it cannot be landed as of {as_of}; "
                        f"generate a longer world (world.days)")
    landed, removed = 0, 0
    for day in days:
        target = lake.partition(day)
        if day >= as_of:
            if target.exists():
                shutil.rmtree(target)
                removed += 1
            continue
        if same_partition(stream, lake, day):
            continue
        with staged_dir(target) as tmp:
            for file in sorted(stream.partition(day).iterdir()):
                shutil.copyfile(file, tmp / file.name)
        landed += 1
    cut = utc_midnight(as_of)
    items = (pl.read_parquet(stream.items).filter(pl.col("created_at") < cut)
             .with_columns(pl.when(pl.col("retired_at") < cut).then(pl.col("retired_at")).alias("retired_at")))
    lake.write_items(items)
    log.info("landed as of %s: %d partition(s) copied, %d removed, %d items known", as_of, landed, removed,
             items.height)
    return {"as_of": as_of.isoformat(), "partitions_landed": landed, "partitions_removed": removed,
            "items": items.height}

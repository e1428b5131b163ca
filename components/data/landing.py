"""Landing (`semid land`): the raw lake (components/data/lake.py) as it stood on a day, cut from the whole generated
stream.

The world is generated once into data/stream (`semid replay` does it; same world params, same stream). Landing
as of day D makes the lake hold exactly what was known before D:

    events   the stream's partitions date < D, copied (each file to a temporary name, or uploaded and verified,
             then in place); partitions on or after D are removed, so a replay can restart from an earlier day
    items    the items created before D; a retirement on or after D is not known yet (retired_at null)

Copying is idempotent: an object already landed with the same checksum is left alone, so a daily landing copies
one day. With a lake outside the workspace, data/raw then holds its listing.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from pathlib import Path

import polars as pl

from components.data.lake import key_day, land_files, raw_lake
from components.errors import DataError
from components.storage import DataDir, Layout
from components.window import utc_midnight

log = logging.getLogger(__name__)


def land(stream: DataDir, layout: Layout, as_of: dt.date, root: str = "data") -> dict:
    """Make the raw lake of storage.root `root` hold what `stream` knew before `as_of`; return what moved."""
    if not stream.items.exists():
        raise DataError(f"{stream.items}: no generated stream to land from (`semid replay` generates it)")
    days = sorted({day for day, _ in stream.event_files()})
    if not days or as_of <= days[0]:
        raise DataError(f"{stream.events}: the stream starts {days[0] if days else 'nowhere'}, so as of {as_of} "
                        f"there is nothing to land; expected an as_of after its first day")
    if as_of > days[-1] + dt.timedelta(days=1):
        raise DataError(f"{stream.events}: the stream ends {days[-1]}, so it cannot be landed as of {as_of}; "
                        f"generate a longer world (world.days)")
    lake = raw_lake(root, layout)
    cut = utc_midnight(as_of)
    items = (pl.read_parquet(stream.items).filter(pl.col("created_at") < cut)
             .with_columns(pl.when(pl.col("retired_at") < cut).then(pl.col("retired_at")).alias("retired_at")))
    with tempfile.TemporaryDirectory() as tmp:
        known = DataDir(Path(tmp))
        known.write_items(items)
        for day, file in stream.event_files():
            if day < as_of:
                known.partition(day).mkdir(parents=True, exist_ok=True)
                os.symlink(file.resolve(), known.partition(day) / file.name)
        copied, removed = land_files(known, lake, layout, remove=lambda key: (key_day(key) or dt.date.min) >= as_of)
    landed = {key_day(k) for k in copied} - {None}
    gone = {key_day(k) for k in removed} - {None}
    log.info("landed as of %s in %s: %d partition(s) copied, %d removed, %d items known", as_of, lake.url,
             len(landed), len(gone), items.height)
    return {"as_of": as_of.isoformat(), "partitions_landed": len(landed), "partitions_removed": len(gone),
            "items": items.height}

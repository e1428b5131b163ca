"""Does the current codebook still fit today's items, and how old is it?

codebook_fit   the items shown in the current window, through the codebook: per level, the share of the K codes
               they use against what the codebook's training items used (scaled to as many items drawn from a
               uniform code distribution, since n items can use at most n codes), and their collision rate
               against the training collision rate recorded in the checkpoint. The value is the worst
               degradation: max(1 - utilization ratio at any level, collision rate - training collision rate).
codebook_age   days from the codebook's training as_of (its window end) to the drift as_of
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl

from components.semid.store import SemIdStore

MIN_ITEMS = 50  # fewer current items with a SemID than this: codebook_fit is not measured


def codebook_fit(item_ids: pl.Series, store: SemIdStore, quality: dict, K: int) -> tuple[float | None, dict]:
    """The value and its details for the current items `item_ids`; `quality` is the checkpoint's record of
    its training items (items, utilization per level, collision_rate)."""
    codes = store.table.join(item_ids.to_frame("item_id"), on="item_id", how="semi").select(store.code_columns)
    n = codes.height
    if n < MIN_ITEMS:
        return None, {"note": f"{n} current items with a SemID, fewer than {MIN_ITEMS}: not measured"}
    c = codes.to_numpy()
    reachable = 1 - (1 - 1 / K) ** n  # share of K codes n uniform draws use, on average
    utilization = [len(np.unique(c[:, level])) / K for level in range(c.shape[1])]
    ratio = [u / (trained * reachable) for u, trained in zip(utilization, quality["utilization"])]
    collisions = 1 - len(np.unique(c, axis=0)) / n
    value = max(1 - min(ratio), collisions - quality["collision_rate"], 0.0)
    return float(value), {
        "current_items": n, "utilization": [round(u, 4) for u in utilization],
        "utilization_ratio": [round(r, 4) for r in ratio], "collision_rate": round(float(collisions), 6),
        "trained": {k: quality[k] for k in ("items", "utilization", "collision_rate")}}


def codebook_age(as_of: dt.datetime, trained_as_of: dt.date) -> float:
    return float((as_of.date() - trained_as_of).days)

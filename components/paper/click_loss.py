"""PAPER.md's click loss of a swap: replace each recommended item by another item alive that day that shares its
SemID prefix of depth d, and compare the expected clicks under the synthetic world's ground-truth click model.

    loss(d) = (CTR(S') - CTR(S)) / CTR(S)      S: the evaluation window's impressions, S': after the swap

The paper's direction: the deeper the shared prefix, the smaller the loss (d = 0 is a swap for any item alive).
Every depth is measured on the same impressions: those whose item has another item alive that day sharing its
full SemID, so the depths differ only in how much of the code the replacement shares. CTR(S') keeps the user,
position and user bias of the impression and takes the replacement's topic, item effect and age; `by_factor`
swaps one of the three at a time, which says where a loss (or a gain) comes from.
"""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl

from components.data import world
from components.params import WorldParams, from_mapping
from components.ranker.metrics import user_bootstrap
from components.semid.store import SemIdStore
from components.storage import Layout

US_PER_DAY = 86_400_000_000
FACTORS = {"topic": "leaf", "item effect": "effect", "age": "created"}  # what a swap changes, one at a time


def alive_items(items: pl.DataFrame, day_start: int) -> pl.DataFrame:
    """The items alive for the whole day starting at `day_start` (microseconds): eligible replacements."""
    day_end = day_start + US_PER_DAY
    return items.filter((pl.col("created") <= day_start)
                        & (pl.col("retired").is_null() | (pl.col("retired") >= day_end)))


def pick_replacements(item_id: np.ndarray, key: np.ndarray, candidates: np.ndarray, candidate_key: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """For each item, uniformly one of the other candidates with the same key (non-negative ints); -1 where there
    is none. Vectorised through the sorted (key, candidate) pairs, each encoded as key * n + the candidate's rank
    among the n IDs (raw IDs are too large to encode beside the key)."""
    ids = np.unique(np.concatenate([candidates, item_id]))
    base = len(ids)
    candidates, item_id = np.searchsorted(ids, candidates), np.searchsorted(ids, item_id)
    pairs = np.sort(candidate_key.astype(np.int64) * base + candidates)
    start = np.searchsorted(pairs, key * base)
    count = np.searchsorted(pairs, (key + 1) * base) - start
    at = np.searchsorted(pairs, key * base + item_id)  # the item's own place in its group
    is_self = (at < start + count) & (pairs[np.minimum(at, len(pairs) - 1)] == key * base + item_id)
    others = count - is_self
    draw = start + (rng.random(len(item_id)) * np.maximum(others, 1)).astype(np.int64)
    draw += is_self & (draw >= at)  # step over the item itself
    picked = pairs[np.minimum(draw, len(pairs) - 1)] % base if len(pairs) else np.zeros_like(item_id)
    return np.where(others > 0, ids[picked], -1)


def prefix_key(codes: np.ndarray, depth: int, K: int) -> np.ndarray:
    """The first `depth` codes as one integer (0 for depth 0)."""
    key = np.zeros(len(codes), dtype=np.int64)
    for t in range(depth):
        key = key * K + codes[:, t]
    return key


def click_loss(layout: Layout, store: SemIdStore, K: int, start: dt.datetime, end: dt.datetime, seed: int = 0,
               resamples: int = 1000) -> dict:
    """{"impressions", "loss": {depth: {"difference", "low", "high"}}, "deeper_loses_less": {"d->d+1": ...}} on
    the impressions of [start, end): the loss of a swap at each shared-prefix depth with its 95% interval over
    users, and the gain of sharing one level more (> 0 where the deeper swap loses less)."""
    p = world_params(layout)
    tax = world.load_taxonomy()
    truth = pl.read_parquet(layout.world / "item_truth.parquet", columns=["item_id", "leaf", "effect"])
    users = pl.read_parquet(layout.world / "users.parquet", columns=["user_id", "favourite_leaves", "bias"])
    codes = store.table.select("item_id", *store.code_columns)
    us = pl.col("created_at").dt.cast_time_unit("us").cast(pl.Int64)
    items = (pl.read_parquet(layout.validated.items, columns=["item_id", "created_at", "retired_at"])
             .select("item_id", created=us, retired=pl.col("retired_at").dt.cast_time_unit("us").cast(pl.Int64))
             .join(truth, on="item_id").join(codes, on="item_id"))
    files = [f for day, f in layout.validated.event_files() if start.date() <= day < end.date() + dt.timedelta(1)]
    events = (pl.scan_parquet(files).filter((pl.col("ts") >= start) & (pl.col("ts") < end))
              .select(pl.col("ts").dt.cast_time_unit("us").cast(pl.Int64), "user_id", "item_id", "f_position")
              .collect().join(items, on="item_id").join(users, on="user_id").sort("ts", "user_id", "item_id"))
    L = len(store.code_columns)
    rng = np.random.default_rng(seed)
    day = events["ts"] // US_PER_DAY
    picked = np.full((L + 1, len(events)), -1)
    for d0 in np.unique(day.to_numpy()):
        rows = np.flatnonzero(day.to_numpy() == d0)
        alive = alive_items(items, int(d0) * US_PER_DAY)
        alive_codes = alive.select(store.code_columns).to_numpy().astype(np.int64)
        event_codes = events[rows].select(store.code_columns).to_numpy().astype(np.int64)
        for depth in range(L + 1):
            picked[depth, rows] = pick_replacements(events["item_id"].to_numpy()[rows],
                                                    prefix_key(event_codes, depth, K), alive["item_id"].to_numpy(),
                                                    prefix_key(alive_codes, depth, K), rng)
    kept = picked[L] >= 0  # a replacement shares the whole SemID, so every shallower one exists too
    events, picked = events.filter(pl.Series(kept)), picked[:, kept]
    favourites = np.stack(events["favourite_leaves"].to_numpy())

    def ctr(item_rows: pl.DataFrame) -> np.ndarray:
        depth = world.shared_depth(tax, favourites, item_rows["leaf"].to_numpy()[:, None]).max(axis=1)
        age = (events["ts"].to_numpy() - item_rows["created"].to_numpy()) / US_PER_DAY
        return world.click_probability(p, world.AFFINITY_BY_SHARED_DEPTH[depth], item_rows["effect"].to_numpy(),
                                       events["bias"].to_numpy(), events["f_position"].to_numpy(), age)

    original = events.select("created", "leaf", "effect")
    shown = ctr(original)
    by_id = items.select("item_id", "created", "leaf", "effect")
    replacements = [pl.DataFrame({"item_id": picked[d]}).join(by_id, on="item_id", how="left", maintain_order="left")
                    for d in range(L + 1)]
    swapped = [ctr(r) for r in replacements]
    user = events["user_id"].to_numpy()

    def ratio(numerator: np.ndarray) -> dict:
        return user_bootstrap(user, np.stack([numerator, shown]), lambda s: s[0] / s[1], resamples, seed=seed)

    def one_factor(d: int, column: str) -> np.ndarray:  # the shown item with one attribute of the replacement
        return ctr(original.with_columns(replacements[d][column]))

    return {"impressions": int(len(events)),
            "loss": {d: ratio(swapped[d] - shown) for d in range(L + 1)},
            "deeper_loses_less": {f"{d}->{d + 1}": ratio(swapped[d + 1] - swapped[d]) for d in range(L)},
            "by_factor": {factor: {d: ratio(one_factor(d, column) - shown) for d in range(L + 1)}
                          for factor, column in FACTORS.items()}}


def world_params(layout: Layout) -> WorldParams:
    """The params that generated the workspace's synthetic world (data/world/world.json)."""
    recorded = json.loads((layout.world / "world.json").read_text())
    return from_mapping(WorldParams, recorded["params"], where=f"{layout.world / 'world.json'} params")

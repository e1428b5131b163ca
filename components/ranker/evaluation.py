"""The ranker's evaluation (PAPER.md, "Metrics"): what goes into metrics/ranker.json besides the promotion.

    ne                 NE by impression segment (all, head, torso, tail, seen, unseen, new) on the evaluation
                       window; new: items created in it
    drift_sensitivity  NE on 48h..42h before the end of training minus NE on its last 6h, final model
    aar                the A/A ratio over exact-copy items: each evaluation impression of an item with an exact
                       copy (same content hash, another raw ID) is scored again with the copy in its place, as
                       production would see the copy: its own raw ID, SemID and item age (f_item_age_days)
    attention          first-token mass, padding mass, entropy and self-attention (transformer, PMA)

The formulas are pure functions in components/ranker/metrics.py; this module runs the model to feed them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import polars as pl
import torch

from components import shards
from components.data.contracts import ITEM_AGE
from components.errors import DataError
from components.ranker import metrics
from components.ranker.device import autocast, to_device
from components.ranker.examples import Examples, semid_codes
from components.ranker.model import Ranker
from components.semid.store import SemIdStore
from components.storage import Layout
from components.window import Window

ATTENTION_ROWS = 4096  # evaluation examples whose attention weights are summarised
HOUR = dt.timedelta(hours=1)
US_PER_DAY = 86_400_000_000


@torch.no_grad()
def predict(model: Ranker, examples: Examples, batch_size: int, device: torch.device,
            attention_rows: int = 0) -> tuple[np.ndarray, dict | None]:
    """Click probabilities for every example, and attention diagnostics over the first attention_rows."""
    model.eval()
    probs, weights, pads = [], [], []
    for batch in examples.batches(max(batch_size, 4096)):
        batch = to_device(batch, device)
        with autocast(device):
            logits, A = model(batch)
        probs.append(torch.sigmoid(logits.float()).cpu())
        if A is not None and sum(len(w) for w in weights) < attention_rows:
            weights.append(A.float().cpu())
            pads.append((batch["hist_item"] < 0).cpu())
    p = torch.cat(probs).numpy().astype(np.float64) if probs else np.empty(0)
    if not np.isfinite(p).all():
        raise DataError(f"the ranker predicted {int((~np.isfinite(p)).sum())} non-finite probabilities "
                        f"(diverged training: lower ranker.lr / ranker.sparse_lr)")
    diagnostics = None
    if weights:
        A, pad = torch.cat(weights)[:attention_rows], torch.cat(pads)[:attention_rows]
        diagnostics = metrics.attention_diagnostics(A.numpy(), pad.numpy())
    return p, diagnostics


def time_slice(examples: Examples, window: Window) -> Examples:
    """The examples with ts in the window (examples are in time order)."""
    us = lambda t: int(t.timestamp() * 1_000_000)  # noqa: E731
    lo, hi = np.searchsorted(examples.ts, [us(window.start), us(window.end)])
    return examples.take(slice(lo, hi))


def copy_partners(layout: Layout) -> pl.DataFrame:
    """item_id -> partner: every later item with the same content hash as an earlier one (an exact copy under
    a new raw ID) is paired with the first item of that text, and the first with its first copy."""
    hashes = pl.read_parquet(shards.files(layout.embeddings), columns=["item_id", "content_hash"]).sort("item_id")
    groups = hashes.group_by("content_hash").agg(pl.col("item_id")).filter(pl.col("item_id").list.len() > 1)
    first, second = groups["item_id"].list.first(), groups["item_id"].list.get(1)
    copies = groups.explode("item_id").join(pl.DataFrame({"content_hash": groups["content_hash"],
                                                          "first": first, "second": second}), on="content_hash")
    return copies.select("item_id", partner=pl.when(pl.col("item_id") == pl.col("first"))
                         .then(pl.col("second")).otherwise(pl.col("first")))


def created_at(layout: Layout) -> pl.DataFrame:
    """item_id, created (microseconds since epoch UTC) of every validated item."""
    return pl.read_parquet(layout.validated.items, columns=["item_id", "created_at"]).select(
        "item_id", created=pl.col("created_at").dt.cast_time_unit("us").cast(pl.Int64))


def new_items(created: pl.DataFrame, start: dt.datetime) -> np.ndarray:
    """The items created at or after `start` (the evaluation window's): PAPER.md's new items."""
    return created.filter(pl.col("created") >= int(start.timestamp() * 1_000_000))["item_id"].to_numpy()


def swap_items(examples: Examples, partners: pl.DataFrame, created: pl.DataFrame, store: SemIdStore | None
               ) -> tuple[np.ndarray, Examples]:
    """The rows of the examples whose item has an exact copy, and those examples with the copy in its place: the
    copy's raw ID, its SemID and, where the events carry it, its own age at the impression."""
    frame = (pl.DataFrame({"item_id": examples.item_id}).with_row_index("row").join(partners, on="item_id")
             .join(created, left_on="partner", right_on="item_id", how="left").sort("row"))
    rows = frame["row"].to_numpy()
    a = examples.take(rows)
    partner = frame["partner"].cast(pl.Int64)
    dense = a.dense.copy()
    if ITEM_AGE in a.dense_columns:
        dense[:, a.dense_columns.index(ITEM_AGE)] = (a.ts - frame["created"].to_numpy()) / US_PER_DAY
    return rows, dataclasses.replace(a, item_id=partner.to_numpy(), codes=semid_codes(partner, store)[0], dense=dense)


def evaluate(model: Ranker, train: Examples, evaluation: Examples, train_window: Window, batch_size: int,
             device: torch.device, partners: pl.DataFrame, created: pl.DataFrame, store: SemIdStore | None
             ) -> tuple[dict, pl.DataFrame]:
    """NE by segment on the evaluation examples, drift sensitivity, AAR and attention diagnostics, and the
    predictions behind them (`prediction_frame`: what a paired bootstrap resamples); `created` is created_at's
    output (new items, the copies' ages)."""
    segments = metrics.impression_segments(train.item_id)
    no_new = np.empty(0, np.int64)  # training slices: every item was created before the evaluation
    probs, attention = predict(model, evaluation, batch_size, device, ATTENTION_ROWS)
    masks = metrics.segment_masks(evaluation.item_id, segments, new_items(created, train_window.end))
    by_segment = metrics.ne_by_segment(evaluation.label, probs, masks)
    copy_probs = np.full(len(evaluation), np.nan)
    rows, copies = swap_items(evaluation, partners, created, store)
    if len(rows):
        copy_probs[rows], _ = predict(model, copies, batch_size, device)
    frames = [prediction_frame("eval", evaluation, probs, masks, copy_probs)]

    def slice_ne(part_name: str, window: Window) -> dict:
        part = time_slice(train, window)
        if not len(part):
            return {}
        slice_probs, _ = predict(model, part, batch_size, device)
        slice_masks = metrics.segment_masks(part.item_id, segments, no_new)
        frames.append(prediction_frame(part_name, part, slice_probs, slice_masks, np.full(len(part), np.nan)))
        return metrics.ne_by_segment(part.label, slice_probs, slice_masks)

    end = train_window.end
    early = slice_ne("early", Window(end - 48 * HOUR, end - 42 * HOUR))
    late = slice_ne("late", Window(end - 6 * HOUR, end))
    results = {
        "ne": {name: s["ne"] for name, s in by_segment.items()},
        "events": {name: s["events"] for name, s in by_segment.items()},
        "drift_sensitivity": metrics.drift_sensitivity(early, late),
        "aar": metrics.aar(probs[rows], copy_probs[rows]) if len(rows) else None, "aar_pairs": len(rows),
    }
    if attention is not None:
        results["attention"] = attention
    return results, pl.concat(frames)


def prediction_frame(part: str, examples: Examples, probs: np.ndarray, masks: dict[str, np.ndarray],
                     copy_probs: np.ndarray) -> pl.DataFrame:
    """One row per impression: part (eval | early | late: the drift slices), ts, user_id, item_id, clicked, p,
    p_copy (the exact copy's prediction in its place, null without one), segment (head | torso | tail | unseen)
    and new."""
    segment = np.select([masks["head"], masks["torso"], masks["tail"]], ["head", "torso", "tail"], "unseen")
    return pl.DataFrame({
        "part": pl.Series([part] * len(examples), dtype=pl.Enum(["eval", "early", "late"])), "ts": examples.ts,
        "user_id": examples.user_id, "item_id": examples.item_id, "clicked": examples.label.astype(np.int8),
        "p": probs.astype(np.float32), "p_copy": pl.Series(copy_probs.astype(np.float32), nan_to_null=True),
        "segment": pl.Series(segment, dtype=pl.Enum(["head", "torso", "tail", "unseen"])), "new": masks["new"]})

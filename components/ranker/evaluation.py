"""The ranker's evaluation (PAPER.md, "Metrics"): what goes into metrics/ranker.json besides the promotion.

    ne                 NE by impression segment (all, head, torso, tail, seen, new) on the evaluation window
    drift_sensitivity  NE on 48h..42h before the end of training minus NE on its last 6h, final model
    aar                the A/A ratio over exact-copy items: each evaluation impression of an item with an exact
                       copy (same content hash, another raw ID) is scored again with the copy in its place
    attention          first-token mass, padding mass, entropy and self-attention (transformer, PMA)

The formulas are pure functions in components/ranker/metrics.py; this module runs the model to feed them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import polars as pl
import torch

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
    hashes = pl.read_parquet(layout.embeddings, columns=["item_id", "content_hash"]).sort("item_id")
    groups = hashes.group_by("content_hash").agg(pl.col("item_id")).filter(pl.col("item_id").list.len() > 1)
    first, second = groups["item_id"].list.first(), groups["item_id"].list.get(1)
    copies = groups.explode("item_id").join(pl.DataFrame({"content_hash": groups["content_hash"],
                                                          "first": first, "second": second}), on="content_hash")
    return copies.select("item_id", partner=pl.when(pl.col("item_id") == pl.col("first"))
                         .then(pl.col("second")).otherwise(pl.col("first")))


def swap_items(examples: Examples, partners: pl.DataFrame, store: SemIdStore | None) -> tuple[Examples, Examples]:
    """The examples whose item has an exact copy, and the same examples with the copy in its place."""
    frame = pl.DataFrame({"item_id": examples.item_id}).with_row_index("row").join(partners, on="item_id")
    a = examples.take(frame["row"].to_numpy())
    partner = frame["partner"].cast(pl.Int64)
    b = dataclasses.replace(a, item_id=partner.to_numpy(), codes=semid_codes(partner, store)[0])
    return a, b


def evaluate(model: Ranker, train: Examples, evaluation: Examples, train_window: Window, batch_size: int,
             device: torch.device, partners: pl.DataFrame, store: SemIdStore | None) -> dict:
    """NE by segment on the evaluation examples, drift sensitivity, AAR and attention diagnostics."""
    segments = metrics.impression_segments(train.item_id)
    probs, attention = predict(model, evaluation, batch_size, device, ATTENTION_ROWS)
    by_segment = metrics.ne_by_segment(evaluation.label, probs, metrics.segment_masks(evaluation.item_id, segments))

    def slice_ne(window: Window) -> dict:
        part = time_slice(train, window)
        if not len(part):
            return {}
        slice_probs, _ = predict(model, part, batch_size, device)
        return metrics.ne_by_segment(part.label, slice_probs, metrics.segment_masks(part.item_id, segments))

    end = train_window.end
    early, late = slice_ne(Window(end - 48 * HOUR, end - 42 * HOUR)), slice_ne(Window(end - 6 * HOUR, end))
    results = {
        "ne": {name: s["ne"] for name, s in by_segment.items()},
        "events": {name: s["events"] for name, s in by_segment.items()},
        "drift_sensitivity": metrics.drift_sensitivity(early, late),
        "aar": None, "aar_pairs": 0,
    }
    a, b = swap_items(evaluation, partners, store)
    if len(a):
        pa, _ = predict(model, a, batch_size, device)
        pb, _ = predict(model, b, batch_size, device)
        results["aar"], results["aar_pairs"] = metrics.aar(pa, pb), len(a)
    if attention is not None:
        results["attention"] = attention
    return results

"""The train_ranker stage: one time-ordered pass over the training window, evaluation on the hours right after
it, champion/challenger promotion.

    load     the window (ranker_data.ranker_window), the SemID store of the current codebook, the examples
    train    Adam on the dense parameters, Adagrad on the embedding tables (sparse gradients: dense updates of
             a large table are ~25x slower, STACK.md); CUDA with bf16 autocast when present, else CPU
    evaluate NE by impression segment on the evaluation window, drift sensitivity on two training slices,
             A/A ratio over exact-copy items, attention diagnostics (transformer, PMA)
    write    models/ranker/<model_version>.pt, metrics/ranker.json, reports/ranker/ne_by_segment.csv;
             models/ranker/champion.json moves only when the challenger is not worse than the champion by
             more than ranker.promotion.max_ne_regression (NE on all items, same evaluation window)
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.progress import Progress

from components import provenance
from components.ranker import metrics as ranker_metrics
from components.semid import rqvae
from components.errors import CodebookVersionMismatch, DataError, ParamsError
from components.params import RankerParams, from_mapping
from components.ranker.parameterization import NAMES as PARAMETERIZATIONS
from components.ranker.parameterization import row_indices
from components.ranker.model import Ranker, bce
from components.ranker.examples import Examples, Window, load_examples, ranker_window
from components.semid.store import SemIdStore, open_store, read_store
from components.storage import Layout, atomic_path, write_json, write_text

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
ITEM_IDS = ("ie", "rh", "semid")
AGGREGATIONS = ("bypass", "transformer", "pma")
ATTENTION_ROWS = 4096  # evaluation examples whose attention weights are summarised
HOUR = dt.timedelta(hours=1)


def check_params(p: RankerParams) -> None:
    for name, value, allowed in (("item_ids", p.item_ids, ITEM_IDS), ("history.item_ids", p.history.item_ids, ITEM_IDS),
                                 ("parameterization", p.parameterization, PARAMETERIZATIONS),
                                 ("history.aggregation", p.history.aggregation, AGGREGATIONS),
                                 ("device", p.device, ("auto", "cpu", "cuda"))):
        if value not in allowed:
            raise ParamsError(f"ranker.{name} is {value!r}, expected one of {', '.join(allowed)}")
    if p.collision_factor < 1:
        raise ParamsError(f"ranker.collision_factor is {p.collision_factor}, expected >= 1")
    if p.embedding_dim % p.history.heads:
        raise ParamsError(f"ranker.embedding_dim ({p.embedding_dim}) must be divisible by ranker.history.heads "
                          f"({p.history.heads})")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("ranker.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def uses_semid(p: RankerParams) -> bool:
    return "semid" in (p.item_ids, p.history.item_ids)


def current_store(p: RankerParams, layout: Layout) -> tuple[SemIdStore | None, int, int]:
    """The SemID store under the current codebook version, K and L; (None, 0, 0) when no lookup uses SemIDs."""
    if not uses_semid(p):
        return None, 0, 0
    version, path = rqvae.read_current(layout.rqvae)
    _, ckpt = rqvae.load_checkpoint(path)
    store = open_store(read_store(layout.semids), version)
    return store, ckpt["config"]["codebook_size"], len(store.code_columns)


def model_config(p: RankerParams, train: Examples, K: int, L: int, vocabulary_size: int) -> dict:
    """Plain-JSON description of the model: what a checkpoint needs to rebuild it."""
    if uses_semid(p):
        depth = p.ngram_depth if p.parameterization == "prefix_ngram" else None
        try:  # the parameterization checks its depth against the store's L
            row_indices(torch.zeros(1, L, dtype=torch.int64), p.parameterization, K, 1, depth)
        except ValueError as exc:
            raise ParamsError(f"ranker.parameterization / ranker.ngram_depth: {exc}") from exc
    H = math.ceil(len(np.unique(train.item_id)) / p.collision_factor)
    return {"item_ids": p.item_ids, "parameterization": p.parameterization, "ngram_depth": p.ngram_depth,
            "codebook_size": K, "levels": L, "embedding_dim": p.embedding_dim,
            "rows": {"ie": vocabulary_size + 1, "rh": H, "semid": H}, "vocabulary_size": vocabulary_size,
            "dense_features": len(train.dense_columns), "dense_columns": list(train.dense_columns),
            "dense_hidden": list(p.dense_hidden), "top_hidden": list(p.top_hidden),
            "history_length": p.history.length,
            "history": {"item_ids": p.history.item_ids, "aggregation": p.history.aggregation,
                        "seeds": p.history.seeds, "heads": p.history.heads}}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_one_pass(model: Ranker, train: Examples, p: RankerParams, device: torch.device) -> dict:
    """One epoch over the training examples in time order; returns throughput and the loss curve."""
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=p.lr)
    sparse_opt = torch.optim.Adagrad(model.sparse_parameters(), lr=p.sparse_lr)
    # Adagrad builds its sparse updates from coalesced gradients: torch's note on skipped checks is noise here.
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    model.train()
    losses, curve, started = [], [], time.perf_counter()
    steps = math.ceil(len(train) / p.batch_size)
    with Progress(transient=True) as bar:
        task = bar.add_task("train ranker (one pass)", total=steps)
        for step, batch in enumerate(train.batches(p.batch_size)):
            batch = to_device(batch, device)
            with autocast(device):
                logits, _ = model(batch)
            loss = bce(logits, batch["label"])
            dense_opt.zero_grad(set_to_none=True)
            sparse_opt.zero_grad(set_to_none=True)
            loss.backward()
            dense_opt.step()
            sparse_opt.step()
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step == steps - 1:
                curve.append({"step": step + 1, "loss": float(np.mean(losses[-50:]))})
            bar.advance(task)
    seconds = time.perf_counter() - started
    return {"examples": len(train), "seconds": round(seconds, 2), "examples_per_s": round(len(train) / seconds),
            "loss_curve": curve}


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
        diagnostics = ranker_metrics.attention_diagnostics(A.numpy(), pad.numpy())
    return p, diagnostics


def time_slice(examples: Examples, start: dt.datetime, end: dt.datetime) -> Examples:
    us = lambda t: int(t.timestamp() * 1_000_000)  # noqa: E731
    lo, hi = np.searchsorted(examples.ts, [us(start), us(end)])
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
    partner = frame["partner"].to_numpy()
    codes = a.codes.copy()
    if store is not None and codes.shape[1]:
        table = pl.DataFrame({"item_id": partner}).join(store.table, on="item_id", how="left")
        codes = table.select(store.code_columns).fill_null(-1).to_numpy().astype(np.int64)
    b = dataclasses.replace(a, item_id=partner.astype(np.int64), codes=codes)
    return a, b


def evaluate(model: Ranker, train: Examples, evaluation: Examples, window: Window, p: RankerParams,
             device: torch.device, partners: pl.DataFrame, store: SemIdStore | None) -> dict:
    """NE by segment on the evaluation window, drift sensitivity, AAR and attention diagnostics."""
    segments = ranker_metrics.impression_segments(train.item_id)
    probs, attention = predict(model, evaluation, p.batch_size, device, ATTENTION_ROWS)
    masks = ranker_metrics.segment_masks(evaluation.item_id, segments)
    by_segment = ranker_metrics.ne_by_segment(evaluation.label, probs, masks)

    def slice_ne(start: dt.datetime, end: dt.datetime) -> dict:
        part = time_slice(train, start, end)
        if not len(part):
            return {}
        slice_probs, _ = predict(model, part, p.batch_size, device)
        return ranker_metrics.ne_by_segment(part.label, slice_probs,
                                            ranker_metrics.segment_masks(part.item_id, segments))

    end = window.train_end
    early, late = slice_ne(end - 48 * HOUR, end - 42 * HOUR), slice_ne(end - 6 * HOUR, end)
    metrics = {
        "ne": {name: s["ne"] for name, s in by_segment.items()},
        "events": {name: s["events"] for name, s in by_segment.items()},
        "drift_sensitivity": ranker_metrics.drift_sensitivity(early, late),
        "aar": None, "aar_pairs": 0,
    }
    a, b = swap_items(evaluation, partners, store)
    if len(a):
        pa, _ = predict(model, a, p.batch_size, device)
        pb, _ = predict(model, b, p.batch_size, device)
        metrics["aar"], metrics["aar_pairs"] = ranker_metrics.aar(pa, pb), len(a)
    if attention is not None:
        metrics["attention"] = attention
    return metrics


# ---------------------------------------------------------------------------------------------- checkpoints


def model_version(config: dict, state: dict[str, torch.Tensor]) -> str:
    """Content hash of a ranker checkpoint (config + tensors), like the RQ-VAE's codebook_version."""
    return rqvae.codebook_version(config, state)


def save_ranker(model: Ranker, directory: Path, extra: dict) -> str:
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    version = model_version(model.config, state)
    path = Path(directory) / f"{version}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "model_version": version, "config": model.config,
                    "state_dict": state, **extra}, tmp)
    return version


def load_ranker(path: Path, store: SemIdStore | None = None) -> tuple[Ranker, dict]:
    """Load without executing code (weights_only) and verify the content hash. A SemID model refuses a store of
    another codebook version (CodebookVersionMismatch)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        vocabulary = torch.zeros(ckpt["config"]["vocabulary_size"], dtype=torch.int64)
        model = Ranker(ckpt["config"], vocabulary if ckpt["config"]["item_ids"] == "ie"
                       or ckpt["config"]["history"]["item_ids"] == "ie" else None)
        model.load_state_dict(ckpt["state_dict"])
    except FileNotFoundError:
        raise DataError(f"{path}: ranker checkpoint not found") from None
    except Exception as exc:
        raise DataError(f"{path}: not a valid semid ranker checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]})") from exc
    if model_version(model.config, model.state_dict()) != ckpt["model_version"]:
        raise DataError(f"{path}: content hash does not match its model_version {ckpt['model_version']}")
    if store is not None and ckpt.get("codebook_version") is not None:
        open_store(store, ckpt["codebook_version"])
    return model, ckpt


def read_champion(directory: Path) -> str | None:
    pointer = Path(directory) / "champion.json"
    if not pointer.exists():
        return None
    try:
        return json.loads(pointer.read_text())["model_version"]
    except (ValueError, KeyError) as exc:
        raise DataError(f"{pointer}: unreadable pointer, expected {{\"model_version\": ...}} ({exc})") from exc


def champion_ne(layout: Layout, version: str, window: Window, store: SemIdStore | None,
                device: torch.device) -> tuple[float | None, str]:
    """NE on all items of the champion on this evaluation window, or None and why it cannot be scored."""
    model, ckpt = load_ranker(layout.root / "models" / "ranker" / f"{version}.pt")
    champion_end = dt.datetime.fromisoformat(ckpt["window"]["train_end"])
    if champion_end > window.train_end:
        return None, (f"champion {version} was trained on data up to {champion_end:%Y-%m-%d %H:%M}, inside this "
                      f"evaluation window: its NE there would not be a fair comparison")
    champion_p = from_mapping(RankerParams, ckpt["params"], where=f"champion {version} params")
    champion_store = store
    if uses_semid(champion_p):
        try:
            champion_store = open_store(store if store is not None else read_store(layout.semids),
                                        ckpt["codebook_version"])  # the store already in memory when there is one
        except CodebookVersionMismatch:
            return None, (f"champion {version} uses codebook {ckpt['codebook_version']}; the store now holds "
                          f"another version, so it cannot score today's SemIDs")
    evaluation = load_examples(layout.validated, window.train_end, window.eval_end, champion_store, champion_p,
                               "evaluation")
    probs, _ = predict(model.to(device), evaluation, champion_p.batch_size, device)
    return ranker_metrics.normalized_entropy(evaluation.label, probs), "scored on the same evaluation window"


def decide(ne_challenger: float, ne_champion: float | None, reason: str, max_regression: float) -> dict:
    promote = ne_champion is None or ne_challenger <= ne_champion + max_regression
    return {"promoted": promote, "challenger_ne": ne_challenger, "champion_ne": ne_champion,
            "max_ne_regression": max_regression, "reason": reason}


# ---------------------------------------------------------------------------------------------- stage


def run_train_ranker(p: RankerParams, layout: Layout) -> dict:
    check_params(p)
    device = pick_device(p.device)
    window = ranker_window(p, layout.validated)
    store, K, L = current_store(p, layout)
    started = time.perf_counter()
    train = load_examples(layout.validated, window.train_start, window.train_end, store, p, "training")
    evaluation = load_examples(layout.validated, window.train_end, window.eval_end, store, p, "evaluation")
    pipeline_s = time.perf_counter() - started
    missing = train.missing_semid + evaluation.missing_semid
    if missing:
        log.warning("%s events have an item without a SemID: hashed by raw ID (ranker.missing_semid = rh)",
                    f"{missing:,}")

    torch.manual_seed(p.seed)
    vocabulary = torch.from_numpy(np.sort(pl.read_parquet(layout.validated.items, columns=["item_id"])
                                          ["item_id"].to_numpy()))
    config = model_config(p, train, K, L, len(vocabulary))
    model = Ranker(config, vocabulary)
    dense = torch.from_numpy(train.dense)
    if dense.shape[1]:
        model.dense_mean.copy_(dense.mean(0))
        model.dense_std.copy_(dense.std(0).clamp_min(1e-6))
    model.to(device)
    log.info("training %s ranker (%s, history %s) on %s examples, %s on %s", p.item_ids, p.parameterization,
             p.history.aggregation, f"{len(train):,}", device, window)
    training = train_one_pass(model, train, p, device)
    metrics = evaluate(model, train, evaluation, window, p, device, copy_partners(layout), store)
    if metrics["ne"]["all"] is None:
        raise DataError(f"evaluation window [{window.train_end}, {window.eval_end}) has "
                        f"{metrics['events']['all']} events but no click/no-click mix: NE is undefined")

    codebook_version = store.codebook_version if store is not None else None
    params = json.loads(json.dumps(dataclasses.asdict(p), default=str))
    window_json = {k: v.isoformat() for k, v in dataclasses.asdict(window).items()}
    directory = layout.root / "models" / "ranker"
    prov = {"code_version": provenance.code_version(),
            "data_version": provenance.data_version([layout.validated.root]
                                                    + ([layout.semids] if store is not None else []))}
    version = save_ranker(model, directory, {"params": params, "codebook_version": codebook_version,
                                             "window": window_json, "provenance": prov})
    champion = read_champion(directory)
    if champion is None or champion == version:
        decision = decide(metrics["ne"]["all"], None, "no champion yet" if champion is None
                          else "the challenger is the champion (same weights)", p.promotion.max_ne_regression)
    else:
        ne_champion, reason = champion_ne(layout, champion, window, store, device)
        decision = decide(metrics["ne"]["all"], ne_champion, reason, p.promotion.max_ne_regression)
    decision["champion"] = version if decision["promoted"] else champion
    if decision["promoted"]:
        write_json({"model_version": version, "checkpoint": f"{version}.pt"}, directory / "champion.json")
        log.info("ranker %s is the champion (NE %.5f)", version, metrics["ne"]["all"])
    else:
        log.warning("ranker %s not promoted: NE %.5f vs champion %s %.5f (max regression %s)", version,
                    metrics["ne"]["all"], champion, decision["champion_ne"], p.promotion.max_ne_regression)

    metrics = {
        "model_version": version, "codebook_version": codebook_version, **metrics,
        "promotion": decision,
        "throughput": {"train_examples_per_s": training["examples_per_s"],
                       "pipeline_examples_per_s": round((len(train) + len(evaluation)) / pipeline_s),
                       "device": device.type},
        "examples": {"train": len(train), "eval": len(evaluation),
                     "missing_semid": missing},
        "window": window_json, "config": params, "provenance": prov,
        "loss_curve": training["loss_curve"],
    }
    write_json(metrics, layout.metrics / "ranker.json")
    write_text("segment,ne\n" + "".join(f"{name},{ne}\n" for name, ne in metrics["ne"].items() if ne is not None),
               layout.reports / "ranker" / "ne_by_segment.csv")
    return metrics

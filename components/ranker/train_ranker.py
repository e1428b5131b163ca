"""The `train_ranker` stage (`semid train_ranker`): time-ordered passes over the training window (ranker.epochs,
one by default), evaluation on the hours right after it, champion/challenger promotion.

    load      the windows (components/ranker/examples.py), the SemID store of the current codebook, the examples
    train     the output bias starts at the base rate's logit; the loop (components/ranker/training.py): Adam on
              the dense parameters, Adagrad on the sparse embedding tables; CUDA with bf16 autocast when present,
              else CPU; with engine.kind ray, data-parallel on Ray Train (components/ranker/distributed.py)
    evaluate  NE by segment, drift sensitivity, A/A ratio, attention diagnostics (components/ranker/evaluation.py)
    promote   save models/ranker/<model_version>.pt; models/serving.json switches to it (and its codebook) only
              when the challenger is not worse than the champion (components/ranker/promotion.py)

A challenger is trained only when one is due: the champion is ranker.retrain_every_days old, or was trained under
another codebook than the current one, or nothing serves yet. Otherwise the champion serves on and the stage
reports it (retrained 0).
    write     metrics/ranker.json, reports/ranker/ne_by_segment.csv, reports/ranker/predictions.parquet
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time

import numpy as np
import polars as pl
import torch

from components import engine, provenance, serving
from components.errors import DataError, IncompatibleCheckpoint, ParamsError
from components.params import EngineParams, RankerParams
from components.ranker.device import pick_device
from components.ranker.evaluation import copy_partners, created_at, evaluate
from components.ranker.examples import Examples, load_examples, ranker_window
from components.ranker.model import Ranker
from components.ranker.parameterization import NAMES as PARAMETERIZATIONS
from components.ranker.parameterization import row_indices
from components.ranker.promotion import load_ranker, promote, save_ranker
from components.ranker.sharding import SHARDINGS
from components.ranker.training import train_passes
from components.semid import rqvae
from components.semid.store import SemIdStore, open_store, read_store
from components.storage import Layout, write_metrics, write_parquet, write_text

log = logging.getLogger(__name__)

ITEM_IDS = ("ie", "rh", "semid", "hybrid")
# The evaluation predictions of the last ranker trained (evaluation.prediction_frame; its model_version in the file's
# metadata): what the paper report's paired bootstrap resamples. A day the champion serves on leaves them as they are.
PREDICTIONS = "predictions.parquet"
# Params that do not change what a champion is: a champion trained under other values of them still serves.
CADENCE_PARAMS = ("train_end", "retrain_every_days", "promotion", "device")
AGGREGATIONS = ("bypass", "transformer", "pma")
TABLES = ("torch", "torchrec")


def check_params(p: RankerParams) -> None:
    for name, value, allowed in (("item_ids", p.item_ids, ITEM_IDS), ("history.item_ids", p.history.item_ids, ITEM_IDS),
                                 ("parameterization", p.parameterization, PARAMETERIZATIONS),
                                 ("history.aggregation", p.history.aggregation, AGGREGATIONS),
                                 ("device", p.device, ("auto", "cpu", "cuda")),
                                 ("tables", p.tables, TABLES), ("sharding", p.sharding, SHARDINGS)):
        if value not in allowed:
            raise ParamsError(f"ranker.{name} is {value!r}, expected one of {', '.join(allowed)}")
    if p.epochs < 1:
        raise ParamsError(f"ranker.epochs is {p.epochs}, expected an integer >= 1")
    if p.collision_factor < 1:
        raise ParamsError(f"ranker.collision_factor is {p.collision_factor}, expected >= 1")
    if p.embedding_dim % p.history.heads:
        raise ParamsError(f"ranker.embedding_dim ({p.embedding_dim}) must be divisible by ranker.history.heads "
                          f"({p.history.heads})")


def current_store(p: RankerParams, layout: Layout) -> tuple[SemIdStore | None, int, int]:
    """The SemID store under the current codebook version, K and L; (None, 0, 0) when no lookup uses SemIDs."""
    if not p.uses_semid:
        return None, 0, 0
    version, path = rqvae.read_current(layout.rqvae)
    _, ckpt = rqvae.load_checkpoint(path)
    store = open_store(read_store(layout.semids), version)
    return store, ckpt["config"]["codebook_size"], len(store.code_columns)


def model_config(p: RankerParams, train: Examples, K: int, L: int, vocabulary_size: int) -> dict:
    """Plain-JSON description of the model: what a checkpoint needs to rebuild it."""
    if p.uses_semid:
        depth = p.ngram_depth if p.parameterization == "prefix_ngram" else None
        try:  # the parameterization checks its depth against the store's L
            row_indices(torch.zeros(1, L, dtype=torch.int64), p.parameterization, K, 1, depth)
        except ValueError as exc:
            raise ParamsError(f"ranker.parameterization / ranker.ngram_depth: {exc}") from exc
    H = math.ceil(len(np.unique(train.item_id)) / p.collision_factor)
    return {"item_ids": p.item_ids, "parameterization": p.parameterization, "ngram_depth": p.ngram_depth,
            "codebook_size": K, "levels": L, "embedding_dim": p.embedding_dim,
            "rows": {"ie": vocabulary_size + 1, "rh": H, "semid": H, "hybrid": 2 * H},
            "vocabulary_size": vocabulary_size,
            "dense_features": len(train.dense_columns), "dense_columns": list(train.dense_columns),
            "dense_hidden": list(p.dense_hidden), "top_hidden": list(p.top_hidden),
            "history_length": p.history.length,
            "history": {"item_ids": p.history.item_ids, "aggregation": p.history.aggregation,
                        "seeds": p.history.seeds, "heads": p.history.heads},
            **({"tables": "torchrec", "sparse_lr": p.sparse_lr} if p.tables == "torchrec" else {})}


def build_model(p: RankerParams, train: Examples, K: int, L: int, layout: Layout) -> Ranker:
    """A fresh Ranker for the training examples, its IE vocabulary the validated items."""
    vocabulary = torch.from_numpy(np.sort(pl.read_parquet(layout.validated.items, columns=["item_id"])
                                          ["item_id"].to_numpy()))
    return initial_model(p, train, K, L, vocabulary)


def initial_model(p: RankerParams, train: Examples, K: int, L: int, vocabulary: torch.Tensor,
                  rows: int | None = None) -> Ranker:
    """A fresh Ranker seeded by ranker.seed, dense features standardised on the training examples; `rows` sizes
    the rh and SemID tables instead of the training items (benchmarks/ranker.py's large-table figure)."""
    torch.manual_seed(p.seed)
    config = model_config(p, train, K, L, len(vocabulary))
    if rows is not None:
        config["rows"]["rh"] = config["rows"]["semid"] = rows
    model = Ranker(config, vocabulary)
    dense = torch.from_numpy(train.dense)
    if dense.shape[1]:
        model.dense_mean.copy_(dense.mean(0))
        model.dense_std.copy_(dense.std(0).clamp_min(1e-6))
    # The output starts at the base rate's logit: the first steps learn who clicks, not how often anyone does.
    rate = float(np.clip(train.label.mean(), 1e-4, 1 - 1e-4))
    with torch.no_grad():
        model.top[-1].bias.fill_(math.log(rate / (1 - rate)))
    return model


def run_train_ranker(p: RankerParams, layout: Layout, as_of: dt.date | None = None,
                     engine_params: EngineParams = EngineParams()) -> dict:
    """Train, evaluate and promote a ranker as of `as_of` (its evaluation window ends there; default: the data's
    end); returns the metrics. With engine.kind ray the training passes are data-parallel on Ray Train workers
    (components/ranker/distributed.py); the rest runs here."""
    # load
    check_params(p)
    engine.check(engine_params)
    device = pick_device(p.device)
    if p.tables == "torchrec" and device.type != "cpu":
        raise ParamsError(f"ranker.tables torchrec trains on the CPU here (fbgemm-gpu-cpu), not on {device.type}: "
                          f"set ranker.device cpu, or ranker.tables torch")
    train_window, eval_window = ranker_window(p, layout.validated, as_of)
    store, K, L = current_store(p, layout)
    codebook_version = store.codebook_version if store is not None else None
    kept = champion_if_not_due(p, layout, eval_window.end.date(), codebook_version)
    if kept is not None:
        return kept
    started = time.perf_counter()
    train = load_examples(layout.validated, *train_window, store, p, "training")
    evaluation = load_examples(layout.validated, *eval_window, store, p, "evaluation")
    pipeline_s = time.perf_counter() - started
    missing = train.missing_semid + evaluation.missing_semid
    if missing:
        log.warning("%s events have an item without a SemID: hashed by raw ID (ranker.missing_semid = rh)",
                    f"{missing:,}")

    # train
    model = build_model(p, train, K, L, layout).to(device)
    log.info("training %s ranker (%s, history %s) on %s examples, %s on %s", p.item_ids, p.parameterization,
             p.history.aggregation, f"{len(train):,}", device, train_window)
    if engine_params.kind == "ray":
        from components.ranker.distributed import train_on_ray
        training = train_on_ray(model, train, p, engine_params, layout.ranker.parent)
    else:
        training = train_passes(model, train, p, device)

    # evaluate
    metrics, predictions = evaluate(model, train, evaluation, train_window, p.batch_size, device,
                                    copy_partners(layout), created_at(layout), store)
    if metrics["ne"]["all"] is None:
        raise DataError(f"evaluation window [{eval_window.start}, {eval_window.end}) has "
                        f"{metrics['events']['all']} events but no click/no-click mix: NE is undefined")

    # promote
    params = json.loads(json.dumps(dataclasses.asdict(p), default=str))
    window_json = {"train_start": train_window.start.isoformat(), "train_end": train_window.end.isoformat(),
                   "eval_end": eval_window.end.isoformat()}
    prov = {"code_version": provenance.code_version(),
            "data_version": provenance.data_version([layout.validated.root]
                                                    + ([layout.semids] if store is not None else []))}
    version = save_ranker(model, layout.ranker, {"params": params, "codebook_version": codebook_version,
                                                 "window": window_json, "provenance": prov, "ne": metrics["ne"]})
    write_parquet(predictions, layout.reports / "ranker" / PREDICTIONS, metadata={"model_version": version})
    decision = promote(layout, version, metrics["ne"]["all"], eval_window, codebook_version, device,
                       p.promotion.max_ne_regression)

    # write
    metrics = {
        "model_version": version, "codebook_version": codebook_version, "retrained": True, **metrics,
        "promotion": decision,
        "examples": {"train": len(train), "eval": len(evaluation),
                     "missing_semid": missing},
        "window": window_json, "config": params, "provenance": prov,
        "loss_curve": training["loss_curve"],
    }
    timings = {"throughput": {"train_examples_per_s": training["examples_per_s"],
                              "pipeline_examples_per_s": round((len(train) + len(evaluation)) / pipeline_s),
                              "device": device.type if engine_params.kind == "local"
                              else f"ray: {training['workers']} cpu worker(s)"}}
    write_outputs(layout, metrics, timings)
    return {**metrics, **timings}


def champion_if_not_due(p: RankerParams, layout: Layout, as_of: dt.date, codebook_version: str | None
                        ) -> dict | None:
    """The serving champion's figures when no challenger is due as of `as_of` (it was trained for a day 1 to
    retrain_every_days - 1 days before, under the current codebook and the same model params); None when one is
    due."""
    if p.retrain_every_days < 1:
        raise ParamsError(f"ranker.retrain_every_days is {p.retrain_every_days}, expected >= 1")
    live = serving.read(layout)
    if live is None or live.codebook_version != codebook_version:
        return None
    try:
        _, ckpt = load_ranker(layout.root / live.ranker)
    except IncompatibleCheckpoint:  # saved by an earlier model code: a challenger replaces it
        return None
    trained_for = dt.datetime.fromisoformat(ckpt["window"]["eval_end"]).date()
    wanted = json.loads(json.dumps(dataclasses.asdict(p), default=str))
    # A champion trained for this very day: the day is run again (after a crash between the switch and the end
    # of the stage, or forced), and training reproduces it and its decision (promotion.promote).
    if (not 0 < (as_of - trained_for).days < p.retrain_every_days
            or "ne" not in ckpt
            or {k: v for k, v in ckpt["params"].items() if k not in CADENCE_PARAMS}
            != {k: v for k, v in wanted.items() if k not in CADENCE_PARAMS}):
        return None
    log.info("ranker %s serves on: trained as of %s, a challenger is due every %d day(s)", live.champion,
             trained_for, p.retrain_every_days)
    metrics = {"model_version": live.champion, "codebook_version": codebook_version, "retrained": False,
               "trained_as_of": trained_for.isoformat(), "ne": ckpt["ne"], "window": ckpt["window"]}
    write_outputs(layout, metrics, {})
    return metrics


def write_outputs(layout: Layout, metrics: dict, timings: dict) -> None:
    """metrics/ranker.json, its record, and the NE-by-segment plot."""
    write_metrics(metrics, layout.metrics / "ranker.json", layout.record("ranker"), timings)
    write_text("segment,ne\n" + "".join(f"{name},{ne}\n" for name, ne in metrics["ne"].items() if ne is not None),
               layout.reports / "ranker" / "ne_by_segment.csv")

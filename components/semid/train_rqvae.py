"""The `train_rqvae` stage (`semid train_rqvae`): refresh the Semantic ID codebooks on a trailing window.

decide   a new codebook only at a refresh (`refresh_due`): the first run, as_of crossing day 1 of one of
         rqvae.refresh_months, a change of the model's params, --force, or (rqvae.refresh_on_drift) the last
         drift verdict's codebook_fit at ALERT. Otherwise the current codebook is kept, and its figures on
         today's window are reported: between refreshes it stays fixed and only new items get SemIDs.
load     validated items + their CU embeddings; keep the items active in [as_of - window_days, as_of)
train    components/semid/rqvae.py (method rqvae or rqkmeans)
measure  utilization, perplexity, collision rate, items per SemID; on the synthetic world also how often
         items of one ground-truth leaf topic share a SemID prefix, against random pairs
gate     every level's utilization >= min_utilization and collision_rate <= max_collision_rate; only then
         is the checkpoint written and models/rqvae/current.json moved to it. A failing gate exits non-zero
         and the previous checkpoint stays current.
write    metrics/rqvae.json, reports/rqvae/{utilization,cluster_sizes}.csv (DVC plots)
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math

import numpy as np
import polars as pl
import torch
from rich.progress import Progress

from components import provenance, shards
from components.errors import DataError, ParamsError, SemidError
from components.params import RQVAEParams
from components.semid import rqvae
from components.storage import Layout, write_metrics, write_text
from components.window import Window, data_span

log = logging.getLogger(__name__)


class QualityGateFailed(SemidError):
    """The new codebooks are worse than params allow; the previous checkpoint stays current."""


def training_window(p: RQVAEParams, layout: Layout) -> Window:
    """[as_of - window_days, as_of); as_of defaults to the day after the last validated events partition."""
    as_of = p.as_of
    if as_of is None:
        span = data_span(layout.validated)
        if span is None:
            raise DataError(f"{layout.validated.events}: no events partitions to infer rqvae.as_of from; "
                            "set rqvae.as_of in params.yaml")
        as_of = span.end
    return Window.ending(as_of, dt.timedelta(days=p.window_days))


def active_items(items: pl.DataFrame, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """Items alive at some point of [start, end): created before the end, not retired before the start."""
    return items.filter((pl.col("created_at") < end)
                        & (pl.col("retired_at").is_null() | (pl.col("retired_at") >= start)))


def load_window_vectors(p: RQVAEParams, layout: Layout) -> tuple[pl.DataFrame, torch.Tensor, dict]:
    """item_ids (sorted) and their embeddings (N, D) for the items active in the training window."""
    window = training_window(p, layout)
    items = active_items(pl.read_parquet(layout.validated.items, columns=["item_id", "created_at", "retired_at"]),
                         *window)
    if not layout.embeddings.exists():
        raise DataError(f"{layout.embeddings}: embeddings not found (run `semid embed` first)")
    emb = pl.read_parquet(shards.files(layout.embeddings), columns=["item_id", "vector"]).join(
        items.select("item_id"), on="item_id", how="semi").sort("item_id")
    if emb.height < p.codebook_size:
        raise DataError(f"{layout.embeddings}: {emb.height} items active in the window {window}, fewer than "
                        f"rqvae.codebook_size={p.codebook_size}; widen rqvae.window_days or lower the codebook size")
    x = torch.from_numpy(np.require(emb["vector"].to_numpy(), np.float32, ["W"]))  # torch wants it writable
    return emb.select("item_id"), x, {"start": f"{window.start:%Y-%m-%d}", "end": f"{window.end:%Y-%m-%d}",
                                      "items": emb.height}


def code_quality(codes: torch.Tensor, K: int) -> dict:
    """Utilization (used / K) and perplexity per level; collisions of the full SemID."""
    c = codes.numpy()
    counts = [np.bincount(c[:, level], minlength=K) for level in range(c.shape[1])]
    perplexity = []
    for n in counts:
        q = n[n > 0] / n.sum()
        perplexity.append(float(math.exp(-(q * np.log(q)).sum())))
    _, per_semid = np.unique(c, axis=0, return_counts=True)
    return {
        "utilization": [float((n > 0).mean()) for n in counts],
        "perplexity": [round(v, 2) for v in perplexity],
        "collision_rate": float((len(c) - len(per_semid)) / len(c)),
        "unique_semids": int(len(per_semid)),
        "max_items_per_semid": int(per_semid.max()),
        "cluster_sizes": np.bincount(per_semid).tolist(),  # [k] = how many SemIDs hold exactly k items
    }


def prefix_sharing(codes: torch.Tensor, leaf: np.ndarray, seed: int, pairs: int = 200_000) -> dict:
    """P(two items share the length-l SemID prefix) for pairs of one ground-truth leaf vs random pairs."""
    rng = np.random.default_rng(seed)
    c = codes.numpy()
    order = np.argsort(leaf, kind="stable")
    first = np.searchsorted(leaf[order], leaf[order])  # start of each item's leaf group, in sorted order
    size = np.bincount(leaf)[leaf[order]]
    a = rng.integers(0, len(c), pairs)
    sorted_pos = rng.integers(0, 1 << 30, pairs)
    grouped = np.argsort(order)[a]  # position of item a in the leaf-sorted order
    b_same = order[first[grouped] + sorted_pos % size[grouped]]
    keep = b_same != a
    a_same, b_same = a[keep], b_same[keep]
    b_rand = rng.integers(0, len(c), pairs)
    rate = lambda i, j, level: float((c[i, :level] == c[j, :level]).all(1).mean())  # noqa: E731
    L = c.shape[1]
    return {"same_leaf": [round(rate(a_same, b_same, l), 4) for l in range(1, L + 1)],
            "random_pairs": [round(rate(a, b_rand, l), 4) for l in range(1, L + 1)]}


def reconstruction_loss(model: rqvae.SemanticIdModel, x: torch.Tensor, beta: float) -> float:
    """Mean ||x_n - x_hat||^2 on the window; for rqkmeans x_hat is the quantized vector itself."""
    with torch.no_grad():
        if len(model.decoder):
            return float(np.mean([model(x[i:i + 8192], beta)[0].item() for i in range(0, len(x), 8192)]))
        x_n = model.normalize(x)
        q = model.quantizer(x_n, beta)
        return float(((x_n - q.z_q) ** 2).sum(1).mean())


def training_data_version(ids: pl.DataFrame, x: torch.Tensor, p: RQVAEParams) -> str:
    """Hash of exactly what training sees (item ids, vectors, params): equal hashes give equal codebooks."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(p), default=str, sort_keys=True).encode())
    digest.update(ids["item_id"].to_numpy().tobytes())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()[:16]


def current_if_same(layout: Layout, data_version: str) -> tuple[rqvae.SemanticIdModel, list] | None:
    """The current model, when it was trained on exactly this data: retraining would reproduce it bit for bit."""
    if not (layout.rqvae / "current.json").exists():
        return None
    model, ckpt = rqvae.load_checkpoint(rqvae.read_current(layout.rqvae)[1])
    # A checkpoint without its quality record (saved before the drift stage existed) is retrained: the same
    # seed and data give the same weights, and the new file carries the record that codebook_fit reads.
    if ckpt.get("training_data_version") != data_version or "quality" not in ckpt:
        return None
    log.info("codebook %s was trained on this exact window and params: reused, not retrained",
             ckpt["codebook_version"])
    return model, ckpt.get("history", [])


# What a checkpoint's params must match for it to stay current: the model and its training, not the window's
# end, the cadence or the gates.
MODEL_PARAMS = ("method", "window_days", "levels", "codebook_size", "latent_dim", "hidden_dims", "beta", "seed",
                "steps", "batch_size", "lr", "warmup_steps", "normalize_input", "kmeans_init", "kmeans_iterations",
                "dead_code_restart", "restart_every")


def last_boundary(as_of: dt.date, months: tuple[int, ...]) -> dt.date | None:
    """The latest day 1 of one of `months` on or before as_of (None without months)."""
    for back in range(12):
        month = (as_of.month - 1 - back) % 12 + 1
        year = as_of.year - (as_of.month - back <= 0)
        if month in months:
            return dt.date(year, month, 1)
    return None


def drift_wants_refresh(layout: Layout) -> bool:
    """Whether the last drift verdict (reports/drift/summary.json, a signal from the previous run, not a DVC
    dep: drift depends on this stage) has codebook_fit at ALERT."""
    path = layout.reports / "drift" / "summary.json"
    try:
        return json.loads(path.read_text())["checks"]["codebook_fit"]["status"] == "ALERT"
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable drift summary, expected checks.codebook_fit.status ({exc})") from exc


def refresh_due(p: RQVAEParams, as_of: dt.date, ckpt: dict | None, force: bool, layout: Layout) -> str | None:
    """Why a new codebook is due now, or None when the current one stays."""
    if ckpt is None:
        return "no codebook yet"
    if force:
        return "forced (--force)"
    trained = {k: v for k, v in (ckpt.get("provenance", {}).get("params") or {}).items() if k in MODEL_PARAMS}
    wanted = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(p), default=str)).items() if k in MODEL_PARAMS}
    if trained != wanted:
        changed = sorted(k for k in wanted if trained.get(k) != wanted[k])
        return f"rqvae params changed ({', '.join(changed)})"
    if "quality" not in ckpt:
        return "the current checkpoint predates the quality record that drift's codebook_fit reads"
    trained_as_of = dt.date.fromisoformat(ckpt["window"]["end"])
    boundary = last_boundary(as_of, p.refresh_months)
    if boundary is not None and trained_as_of < boundary <= as_of:
        return f"as_of {as_of} is past the refresh boundary {boundary} (codebook trained as of {trained_as_of})"
    if p.refresh_on_drift and drift_wants_refresh(layout):
        return "the last drift verdict has codebook_fit at ALERT (rqvae.refresh_on_drift)"
    return None


def todays_refresh(ckpt: dict | None, as_of: dt.date) -> dict | None:
    """The refresh that made the current codebook, when it was made as of this very day: a re-run of the day
    (after a crash between the pointer's move and the end of the stage) reports that refresh again, as the
    first run did, instead of keeping a codebook it would call fresh."""
    refresh = (ckpt or {}).get("refresh")
    return refresh if refresh is not None and refresh["as_of"] == as_of.isoformat() else None


def current_checkpoint(layout: Layout) -> tuple[rqvae.SemanticIdModel, dict] | tuple[None, None]:
    if not (layout.rqvae / "current.json").exists():
        return None, None
    return rqvae.load_checkpoint(rqvae.read_current(layout.rqvae)[1])


def run_train_rqvae(p: RQVAEParams, layout: Layout, force: bool = False) -> dict:
    for month in p.refresh_months:
        if not 1 <= month <= 12:
            raise ParamsError(f"rqvae.refresh_months holds {month}, expected months 1..12")
    ids, x, window = load_window_vectors(p, layout)
    as_of = dt.date.fromisoformat(window["end"])
    current, ckpt = current_checkpoint(layout)
    reason = refresh_due(p, as_of, ckpt, force, layout)
    again = todays_refresh(ckpt, as_of) if reason is None or force else None
    reason = reason or (again or {}).get("reason")
    if reason is None:
        return keep_current(p, layout, current, ckpt, ids, x, window)
    log.info("codebook refresh as of %s: %s", as_of, reason)
    data_version = training_data_version(ids, x, p)
    reused = current_if_same(layout, data_version)
    if reused:
        model, history = reused
    else:
        log.info("training %s on %d items active in %s..%s", p.method, window["items"], window["start"],
                 window["end"])
        with Progress() as bar:
            task = bar.add_task(f"train {p.method}", total=p.steps if p.method == "rqvae" else 1)
            model, history = rqvae.train(x, p, progress=lambda step: bar.update(task, completed=step + 1))
            bar.update(task, completed=bar.tasks[0].total)
    codes = model.assign(x)
    quality = code_quality(codes, p.codebook_size)
    gate = {"min_utilization": p.min_utilization, "max_collision_rate": p.max_collision_rate,
            "passed": min(quality["utilization"]) >= p.min_utilization
            and quality["collision_rate"] <= p.max_collision_rate}
    version = rqvae.codebook_version(model)
    # the codebook this one replaces; None for the first codebook, or when training reproduced the current one
    replaced = again["replaced"] if again else (
        ckpt["codebook_version"] if ckpt is not None and ckpt["codebook_version"] != version else None)
    metrics = {
        "codebook_version": version,
        "refreshed": True, "refresh_reason": reason, "replaced": replaced,
        "promoted": gate["passed"],
        "method": p.method, "levels": p.levels, "codebook_size": p.codebook_size, "latent_dim": p.latent_dim,
        "window": window,
        "recon_loss": reconstruction_loss(model, x, p.beta),
        **{k: v for k, v in quality.items() if k != "cluster_sizes"},
        "gate": gate,
        "history": history,
    }
    truth = layout.world / "item_truth.parquet"
    if truth.exists():  # the synthetic world keeps the topic of every item: measure what SemIDs capture
        leaf = ids.join(pl.read_parquet(truth, columns=["item_id", "leaf"]), on="item_id", how="left")["leaf"]
        if leaf.null_count() == 0:
            metrics["prefix_sharing"] = prefix_sharing(codes, leaf.to_numpy(), p.seed)
    metrics["provenance"] = {
        "code_version": provenance.code_version(),
        "data_version": provenance.data_version([layout.validated.items, layout.embeddings]),
        "training_data_version": data_version,
        "params": json.loads(json.dumps(dataclasses.asdict(p), default=str)),  # plain types: weights_only
    }
    if gate["passed"] and not reused:
        _, path = rqvae.save_checkpoint(model, layout.rqvae, {
            "provenance": metrics["provenance"], "window": window, "training_data_version": data_version,
            "refresh": {"as_of": as_of.isoformat(), "reason": reason, "replaced": replaced},
            "history": history, "quality": {"items": window["items"], "utilization": quality["utilization"],
                                            "collision_rate": quality["collision_rate"]}})
        rqvae.write_current(layout.rqvae, version)
        log.info("codebook %s is current (%s)", version, path)
    write_outputs(layout, metrics, quality)
    if not gate["passed"]:
        raise QualityGateFailed(
            f"rqvae quality gate failed: utilization per level {quality['utilization']} (min "
            f"{p.min_utilization}), collision_rate {quality['collision_rate']:.4f} (max {p.max_collision_rate}); "
            f"codebook {version} not promoted, models/rqvae/current.json unchanged")
    return metrics


def keep_current(p: RQVAEParams, layout: Layout, model: rqvae.SemanticIdModel, ckpt: dict, ids: pl.DataFrame,
                 x: torch.Tensor, window: dict) -> dict:
    """No refresh due: the current codebook stays; report its figures on today's window."""
    codes = model.assign(x)
    quality = code_quality(codes, model.config["codebook_size"])
    version = ckpt["codebook_version"]
    log.info("codebook %s kept: no refresh due (trained as of %s; next boundary after %s on rqvae.refresh_months "
             "%s)", version, ckpt["window"]["end"], window["end"], list(p.refresh_months))
    metrics = {
        "codebook_version": version, "refreshed": False, "promoted": False,
        "trained_as_of": ckpt["window"]["end"], "window": window,
        **{k: v for k, v in quality.items() if k != "cluster_sizes"},
        "provenance": {"code_version": provenance.code_version(),
                       "data_version": provenance.data_version([layout.validated.items, layout.embeddings])},
    }
    write_outputs(layout, metrics, quality)
    return metrics


def write_outputs(layout: Layout, metrics: dict, quality: dict) -> None:
    """metrics/rqvae.json, its record, and the two plots: utilization per level, SemIDs by items held."""
    write_metrics(metrics, layout.metrics / "rqvae.json", layout.record("rqvae"))
    write_text("level,utilization\n" + "".join(f"{l + 1},{u}\n" for l, u in enumerate(quality["utilization"])),
               layout.reports / "rqvae" / "utilization.csv")
    write_text("items_per_semid,semids\n" + "".join(f"{k},{n}\n" for k, n in enumerate(quality["cluster_sizes"])
                                                   if k > 0 and n > 0),
               layout.reports / "rqvae" / "cluster_sizes.csv")

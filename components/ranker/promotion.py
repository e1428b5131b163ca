"""Champion/challenger: which trained ranker serves, and the registry of every trained one.

registry   models/ranker/<model_version>.pt, content-hashed and loaded with weights_only
           (components/checkpoints.py); a SemID model records its codebook version and refuses a store of another
champion   the ranker models/serving.json names (components/serving.py). A challenger replaces it only when its
           NE on all items is at most the champion's NE on the same evaluation window +
           ranker.promotion.max_ne_regression; the champion is scored with the store of its own codebook, so a
           challenger on a refreshed codebook is compared on equal terms. A champion that cannot be compared
           fairly (it was trained on data inside this evaluation window) or at all (its codebook's store is gone)
           is replaced. A promotion switches codebook, store and champion together, in one rename; while a
           rollback pins the pointer, the challenger is recorded but nothing switches.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import torch

from components import checkpoints, serving
from components.errors import IncompatibleCheckpoint
from components.params import RankerParams, from_mapping
from components.ranker.evaluation import predict
from components.ranker.examples import load_examples
from components.ranker.metrics import normalized_entropy
from components.ranker.model import Ranker
from components.semid.store import SemIdStore, open_store, read_store
from components.storage import Layout
from components.window import Window

log = logging.getLogger(__name__)

RANKER = checkpoints.Kind("ranker", "model_version", None, "semid train_ranker")


def save_ranker(model: Ranker, directory: Path, extra: dict) -> str:
    """Write models/ranker/<model_version>.pt atomically; return the version."""
    return checkpoints.save(RANKER, directory, model.config, model.state_dict(), extra)[0]


def build_ranker(config: dict) -> Ranker:
    """An untrained Ranker of `config`, for a checkpoint's weights to be loaded into (the IE vocabulary too)."""
    uses_ie = "ie" in (config["item_ids"], config["history"]["item_ids"])
    return Ranker(config, torch.zeros(config["vocabulary_size"], dtype=torch.int64) if uses_ie else None)


def load_ranker(path: Path, store: SemIdStore | None = None) -> tuple[Ranker, dict]:
    """Load without executing code and verify the content hash. A SemID model refuses a store of another
    codebook version (CodebookVersionMismatch)."""
    model, ckpt = checkpoints.load(RANKER, path, build_ranker)
    if store is not None and ckpt.get("codebook_version") is not None:
        open_store(store, ckpt["codebook_version"])
    return model, ckpt


def champion_ne(layout: Layout, live: serving.Serving, evaluation_window: Window, device: torch.device
                ) -> tuple[float | None, str]:
    """NE on all items of the serving champion on this evaluation window, or None and why it cannot be scored."""
    version = live.champion
    try:
        model, ckpt = load_ranker(layout.root / live.ranker)
    except IncompatibleCheckpoint as exc:
        return None, f"champion {version} cannot be scored by this model code ({exc})"
    champion_end = dt.datetime.fromisoformat(ckpt["window"]["train_end"])
    if champion_end > evaluation_window.start:
        return None, (f"champion {version} was trained on data up to {champion_end:%Y-%m-%d %H:%M}, inside this "
                      f"evaluation window: its NE there would not be a fair comparison")
    champion_p = from_mapping(RankerParams, ckpt["params"], where=f"champion {version} params")
    champion_store = None
    if champion_p.uses_semid:
        path = layout.store(ckpt["codebook_version"])
        if not path.exists():
            return None, f"champion {version} uses codebook {ckpt['codebook_version']}, whose store {path} is gone"
        champion_store = open_store(read_store(path), ckpt["codebook_version"])
    evaluation = load_examples(layout.validated, *evaluation_window, champion_store, champion_p, "evaluation")
    probs, _ = predict(model.to(device), evaluation, champion_p.batch_size, device)
    return normalized_entropy(evaluation.label, probs), "scored on the same evaluation window, with its own codebook"


def decide(ne_challenger: float, ne_champion: float | None, reason: str, max_regression: float) -> dict:
    promote = ne_champion is None or ne_challenger <= ne_champion + max_regression
    return {"promoted": promote, "challenger_ne": ne_challenger, "champion_ne": ne_champion,
            "max_ne_regression": max_regression, "reason": reason}


def promote(layout: Layout, version: str, ne: float, evaluation_window: Window, codebook_version: str | None,
            device: torch.device, max_regression: float) -> dict:
    """Score the serving champion against challenger `version` (NE `ne` on all items of the evaluation window)
    and, when the challenger wins, switch models/serving.json to it and its codebook. Returns the decision for
    metrics/ranker.json."""
    as_of = evaluation_window.end.date().isoformat()
    live = serving.read(layout)
    if live is not None and (live.champion, live.as_of) == (version, as_of):
        live = serving.before(layout, as_of)  # this day run again: it decides as its first run did
    if live is None or live.champion == version:
        decision = decide(ne, None, "no champion yet" if live is None
                          else "the challenger is the champion (same weights)", max_regression)
    else:
        ne_champion, reason = champion_ne(layout, live, evaluation_window, device)
        decision = decide(ne, ne_champion, reason, max_regression)
    if decision["promoted"] and live is not None and live.pinned:
        decision.update(promoted=False, reason=f"serving is pinned by a rollback to switch {live.seq} "
                                                f"(`semid rollback --unpin` releases it); {decision['reason']}")
    if decision["promoted"]:
        if live is None or (live.champion, live.codebook_version) != (version, codebook_version):
            serving.switch(layout, as_of, codebook_version, version)
        log.info("ranker %s is the champion (NE %.5f) under codebook %s", version, ne, codebook_version)
    else:
        log.warning("ranker %s not promoted: NE %.5f vs champion %s %s (max regression %s): %s", version, ne,
                    live.champion, decision["champion_ne"], max_regression, decision["reason"])
    decision["champion"] = version if decision["promoted"] else live.champion
    return decision

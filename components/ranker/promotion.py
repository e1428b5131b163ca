"""Champion/challenger: which trained ranker serves, and the registry of every trained one.

registry   models/ranker/<model_version>.pt, content-hashed and loaded with weights_only
           (components/checkpoints.py); a SemID model records its codebook version and refuses a store of another
champion   models/ranker/champion.json names the serving model. A challenger replaces it only when its NE on all
           items is at most the champion's NE on the same evaluation window + ranker.promotion.max_ne_regression.
           A champion that cannot be compared fairly (it was trained on data inside this evaluation window) or at
           all (it uses a codebook the store no longer holds) is replaced.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import torch

from components import checkpoints
from components.errors import CodebookVersionMismatch
from components.params import RankerParams, from_mapping
from components.ranker.evaluation import predict
from components.ranker.examples import load_examples
from components.ranker.metrics import normalized_entropy
from components.ranker.model import Ranker
from components.semid.store import SemIdStore, open_store, read_store
from components.storage import Layout
from components.window import Window

log = logging.getLogger(__name__)

RANKER = checkpoints.Kind("ranker", "model_version", "champion.json", "semid train_ranker")


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


def read_champion(directory: Path) -> str | None:
    return checkpoints.read_pointer(RANKER, directory)


def champion_ne(layout: Layout, version: str, evaluation_window: Window, store: SemIdStore | None,
                device: torch.device) -> tuple[float | None, str]:
    """NE on all items of the champion on this evaluation window, or None and why it cannot be scored."""
    model, ckpt = load_ranker(layout.ranker / f"{version}.pt")
    champion_end = dt.datetime.fromisoformat(ckpt["window"]["train_end"])
    if champion_end > evaluation_window.start:
        return None, (f"champion {version} was trained on data up to {champion_end:%Y-%m-%d %H:%M}, inside this "
                      f"evaluation window: its NE there would not be a fair comparison")
    champion_p = from_mapping(RankerParams, ckpt["params"], where=f"champion {version} params")
    champion_store = store
    if champion_p.uses_semid:
        try:
            champion_store = open_store(store if store is not None else read_store(layout.semids),
                                        ckpt["codebook_version"])  # the store already in memory when there is one
        except CodebookVersionMismatch:
            return None, (f"champion {version} uses codebook {ckpt['codebook_version']}; the store now holds "
                          f"another version, so it cannot score today's SemIDs")
    evaluation = load_examples(layout.validated, *evaluation_window, champion_store, champion_p, "evaluation")
    probs, _ = predict(model.to(device), evaluation, champion_p.batch_size, device)
    return normalized_entropy(evaluation.label, probs), "scored on the same evaluation window"


def decide(ne_challenger: float, ne_champion: float | None, reason: str, max_regression: float) -> dict:
    promote = ne_champion is None or ne_challenger <= ne_champion + max_regression
    return {"promoted": promote, "challenger_ne": ne_challenger, "champion_ne": ne_champion,
            "max_ne_regression": max_regression, "reason": reason}


def promote(layout: Layout, version: str, ne: float, evaluation_window: Window, store: SemIdStore | None,
            device: torch.device, max_regression: float) -> dict:
    """Score the champion against challenger `version` (NE `ne` on all items of the evaluation window) and move
    models/ranker/champion.json when the challenger wins. Returns the decision for metrics/ranker.json."""
    champion = read_champion(layout.ranker)
    if champion is None or champion == version:
        decision = decide(ne, None, "no champion yet" if champion is None
                          else "the challenger is the champion (same weights)", max_regression)
    else:
        ne_champion, reason = champion_ne(layout, champion, evaluation_window, store, device)
        decision = decide(ne, ne_champion, reason, max_regression)
    decision["champion"] = version if decision["promoted"] else champion
    if decision["promoted"]:
        checkpoints.write_pointer(RANKER, layout.ranker, version)
        log.info("ranker %s is the champion (NE %.5f)", version, ne)
    else:
        log.warning("ranker %s not promoted: NE %.5f vs champion %s %.5f (max regression %s)", version, ne,
                    champion, decision["champion_ne"], max_regression)
    return decision

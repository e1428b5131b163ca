"""The topic-match probe: how much of the click signal a linear model finds in the SemID prefixes a user clicked
before. It is the yardstick for the ranker on new items, whose only knowledge comes from their codes.

    match_d   share of the user's history items whose SemID starts with the target's first d codes, d = 1..L
    features  [standardised dense features f_*, match_1..match_L, log(1 + history length)]
    model     logistic regression (scikit-learn, lbfgs, L2 C = 1) fitted on the training examples
    baseline  the same model on the dense features alone: probe minus baseline is the content signal a linear
              model finds (on the default world -0.009 NE on new items; on MovieLens latest-small +0.0006: none)

It sees no item ID and no item row, so what it scores on new items it scores from content alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components.errors import DataError
from components.params import load_params
from components.ranker.evaluation import created_at, new_items
from components.ranker.examples import PAD, Examples, load_examples, ranker_window
from components.ranker.metrics import impression_segments, ne_by_segment, segment_masks
from components.ranker.train_ranker import current_store
from components.storage import Layout


def match_features(examples: Examples) -> np.ndarray:
    """(N, L + 1): match_1..match_L and log(1 + history length) of every example."""
    L = examples.codes.shape[1]
    if L == 0:
        raise DataError("the topic-match probe needs SemID codes (a SemID store), found examples without codes")
    clicked = examples.hist_item != PAD  # (N, T)
    length = clicked.sum(1)
    same = np.ones(clicked.shape, dtype=bool)
    shares = []
    for d in range(L):
        same &= examples.hist_codes[:, :, d] == examples.codes[:, None, d]
        shares.append((same & clicked).sum(1) / np.maximum(length, 1))
    return np.column_stack([*shares, np.log1p(length)]).astype(np.float64)


def features(examples: Examples, match: bool = True) -> np.ndarray:
    dense = examples.dense.astype(np.float64)
    return np.column_stack([dense, match_features(examples)]) if match else dense


def fit_probe(train: Examples, seed: int = 0, match: bool = True):
    """The fitted probe (a scikit-learn pipeline: scaler, logistic regression); match=False: the baseline."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    return probe.fit(features(train, match), train.label)


def probe_probabilities(probe, examples: Examples, match: bool = True) -> np.ndarray:
    return probe.predict_proba(features(examples, match))[:, 1]


def main(argv: list[str] | None = None) -> None:
    """python -m components.ranker.probe [--params params.yaml]: the probe's NE by segment on the ranker's windows
    of the workspace (the data and SemID store `dvc repro` left), and the dense-only baseline's: one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m components.ranker.probe", description=main.__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    p, layout = load_params(args.params).ranker, Layout()
    train_window, eval_window = ranker_window(p, layout.validated)
    store, _, _ = current_store(dataclasses.replace(p, item_ids="semid"), layout)
    train = load_examples(layout.validated, *train_window, store, p, "training")
    evaluation = load_examples(layout.validated, *eval_window, store, p, "evaluation")
    new = new_items(created_at(layout), train_window.end)
    masks = segment_masks(evaluation.item_id, impression_segments(train.item_id), new)
    out = {}
    for key, match in (("probe_ne", True), ("dense_only_ne", False)):
        predicted = probe_probabilities(fit_probe(train, p.seed, match), evaluation, match)
        out[key] = {name: s["ne"] for name, s in ne_by_segment(evaluation.label, predicted, masks).items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

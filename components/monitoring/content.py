"""content_drift: do the items first seen in the current window look like the reference's items?

A domain classifier on PCA-reduced CU embeddings: at most drift.embedding_sample items per side (seeded), PCA to
16 dimensions fitted on both sides, logistic regression with balanced classes, out-of-fold predictions from 5
stratified folds. The value is the ROC AUC of telling the two sides apart: about 0.5 when new items come from
the reference's content distribution, towards 1 when they do not. (Evidently's EmbeddingsDrift runs the same kind
of classifier but spends most of its time drawing a t-SNE plot; scikit-learn alone takes well under a second.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from components import shards
from components.errors import DataError

MIN_ITEMS = 20  # fewer new (or reference) items with an embedding than this: not measured
COMPONENTS = 16
FOLDS = 5


def sample_ids(item_ids: pl.Series, n: int, seed: int) -> np.ndarray:
    ids = np.sort(item_ids.unique().to_numpy())
    return ids if len(ids) <= n else np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))


def read_vectors(path: Path, ids: np.ndarray) -> np.ndarray:
    """The embeddings (len(ids), D) of the sorted `ids`, in that order, read a row group at a time so memory stays
    at one group whatever the item count; every id must have one."""
    found_ids, vectors = [], []
    for batch in shards.iter_batches(path, 65_536, ["item_id", "vector"], pre_buffer=False):
        keep = np.isin(batch.column("item_id").to_numpy(), ids)
        if keep.any():
            part = pl.from_arrow(batch.filter(pa.array(keep)))
            found_ids.append(part["item_id"].to_numpy())
            vectors.append(part["vector"].to_numpy().astype(np.float32))
    found = np.concatenate(found_ids) if found_ids else np.empty(0, dtype=np.int64)
    if len(found) != len(ids):
        missing = np.setdiff1d(ids, found)[:5].tolist()
        raise DataError(f"{path}: {len(ids) - len(found)} item(s) shown in the drift windows have no embedding "
                        f"(e.g. item_id {missing}); run `semid embed`")
    return np.concatenate(vectors)[np.argsort(found)]


def domain_auc(reference: np.ndarray, new: np.ndarray, seed: int) -> float:
    """Out-of-fold ROC AUC of a classifier separating `new` rows from `reference` rows."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    x = np.concatenate([reference, new])
    y = np.r_[np.zeros(len(reference)), np.ones(len(new))]
    model = make_pipeline(PCA(min(COMPONENTS, x.shape[1]), random_state=seed),
                          LogisticRegression(class_weight="balanced", max_iter=1000))
    folds = StratifiedKFold(min(FOLDS, len(new), len(reference)), shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def content_drift(embeddings: Path, reference_items: pl.Series, new_items: pl.Series, sample: int,
                  seed: int) -> tuple[float | None, dict]:
    """The value and its details; `new_items` are the items first seen in the current window."""
    ref_ids, new_ids = sample_ids(reference_items, sample, seed), sample_ids(new_items, sample, seed + 1)
    details = {"reference_items": len(ref_ids), "new_items": len(new_ids)}
    if min(len(ref_ids), len(new_ids)) < MIN_ITEMS:
        return None, {**details, "note": f"{len(new_ids)} new and {len(ref_ids)} reference items, fewer than "
                                         f"{MIN_ITEMS} on a side: not measured"}
    return domain_auc(read_vectors(embeddings, ref_ids), read_vectors(embeddings, new_ids), seed), details

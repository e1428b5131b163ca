"""The ranker's evaluation metrics, as in PAPER.md "Metrics": pure functions of arrays, no disk.

    log loss     l(y, p)  = -mean[ y log p + (1 - y) log(1 - p) ]
    NE           NE(y, p) = l(y, p) / l(y, mean(y))          (lower is better; 1 = the base rate)
    segments     items sorted by training impressions; head covers the first 25% of impressions,
                 torso up to 75%, tail the rest; seen / unseen = had / had no training impressions;
                 new = created in the evaluation period (the paper's: first seen there), a subset of unseen
    drift        NE(48h..42h before the end of training) - NE(last 6h of training), final model
    AAR          mean 2 |p1 - p2| / (p1 + p2 + eps) over exact-copy item pairs
    bootstrap    NE(a) - NE(b) on the same impressions (also drift sensitivity and A/A differences), its 95%
                 interval from resampling users with replacement (paired: both models see the same resample;
                 one heavy user cannot decide it)
    attention    on A (rows are distributions over S keys): first-token mean a_{i,1}, padding mass,
                 entropy in bits, self-attention mean a_{i,i}
"""
from __future__ import annotations

import numpy as np
import polars as pl

SEGMENTS = ("all", "head", "torso", "tail", "seen", "unseen", "new")
HEAD_SHARE = 0.25  # head: items covering the first 25% of training impressions
TORSO_SHARE = 0.75  # torso: up to 75%; tail: the rest


def _labels_and_probabilities(y, p, where: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.size == 0 or p.size == 0:
        raise ValueError(f"{where}: expected at least one (label, prediction) pair, found "
                         f"{y.size} labels and {p.size} predictions")
    if y.shape != p.shape:
        raise ValueError(f"{where}: expected as many predictions as labels, found {y.size} labels "
                         f"and {p.size} predictions")
    if not np.isfinite(p).all():
        bad = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"{where}: expected finite predictions, found {p[bad]} at row {bad} "
                         f"({int((~np.isfinite(p)).sum())} non-finite in all)")
    if ((p < 0) | (p > 1)).any():
        bad = int(np.flatnonzero((p < 0) | (p > 1))[0])
        raise ValueError(f"{where}: expected predictions in [0, 1], found {p[bad]} at row {bad}")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = int(np.flatnonzero(~np.isin(y, (0.0, 1.0)))[0])
        raise ValueError(f"{where}: expected labels 0 or 1, found {y[bad]} at row {bad}")
    return y, p


def _log_loss(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats, p clipped to [eps, 1 - eps]."""
    y, p = _labels_and_probabilities(y, p, "log_loss")
    return _log_loss(y, p, eps)


def normalized_entropy(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """NE = log loss of p / log loss of always predicting the base rate mean(y). Lower is better."""
    y, p = _labels_and_probabilities(y, p, "normalized_entropy")
    base_rate = float(y.mean())
    if base_rate in (0.0, 1.0):
        raise ValueError(f"normalized_entropy: expected both clicks and non-clicks, found "
                         f"{int(y.sum())} clicks in {y.size} events (the base-rate entropy is 0, "
                         f"so NE is undefined)")
    # The same code path for both, so the base-rate predictor gets exactly 1.
    return _log_loss(y, p, eps) / _log_loss(y, np.full_like(p, base_rate), eps)


def impression_segments(item_ids: np.ndarray) -> pl.DataFrame:
    """item_id, impressions, segment (head | torso | tail) from the item_id of every training impression.

    Items are sorted by impressions (desc, ties by item_id asc); an item is head while the share of
    impressions of the items before it is < 25%, torso while it is < 75%, tail after.
    """
    counts = (pl.DataFrame({"item_id": np.asarray(item_ids).ravel()})
              .group_by("item_id").agg(pl.len().cast(pl.Int64).alias("impressions"))
              .sort(["impressions", "item_id"], descending=[True, False]))
    total = counts["impressions"].sum()
    before = (pl.col("impressions").cum_sum() - pl.col("impressions")) / pl.lit(max(total, 1))
    return counts.with_columns(
        pl.when(before < HEAD_SHARE).then(pl.lit("head"))
        .when(before < TORSO_SHARE).then(pl.lit("torso"))
        .otherwise(pl.lit("tail")).alias("segment"))


def segment_masks(eval_item_ids: np.ndarray, segments: pl.DataFrame,
                  new_item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A boolean mask over evaluation rows per SEGMENTS name; `segments` is impression_segments' output and
    `new_item_ids` the items created in the evaluation period."""
    eval_ids = np.asarray(eval_item_ids).ravel()
    order = np.argsort(segments["item_id"].to_numpy(), kind="stable")
    known = segments["item_id"].to_numpy()[order]
    code = segments["segment"].replace_strict({"head": 0, "torso": 1, "tail": 2},
                                              return_dtype=pl.Int8).to_numpy()[order]
    if len(known) == 0:
        seen, row_code = np.zeros(len(eval_ids), dtype=bool), np.full(len(eval_ids), -1)
    else:
        at = np.minimum(np.searchsorted(known, eval_ids), len(known) - 1)
        seen = known[at] == eval_ids
        row_code = np.where(seen, code[at], -1)
    masks = {"all": np.ones(len(eval_ids), dtype=bool)}
    masks |= {name: row_code == c for c, name in enumerate(("head", "torso", "tail"))}
    return masks | {"seen": seen, "unseen": ~seen, "new": np.isin(eval_ids, new_item_ids)}


def ne_by_segment(y: np.ndarray, p: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    """{segment: {"ne", "events", "clicks"}}; ne is None (not NaN) where a segment has no events, no
    clicks or only clicks, so the metrics stay valid JSON."""
    y, p = _labels_and_probabilities(y, p, "ne_by_segment")
    out = {}
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != y.shape:
            raise ValueError(f"ne_by_segment: expected the {name!r} mask to have one entry per event "
                             f"({y.size}), found shape {mask.shape}")
        events, clicks = int(mask.sum()), int(y[mask].sum())
        ne = normalized_entropy(y[mask], p[mask]) if 0 < clicks < events else None
        out[name] = {"ne": ne, "events": events, "clicks": clicks}
    return out


def drift_sensitivity(early: dict, late: dict) -> dict[str, float | None]:
    """NE on the early slice (48h..42h before the end of training) minus NE on the last 6h of training,
    per segment, from two ne_by_segment outputs; None where either NE is missing."""
    names = [s for s in SEGMENTS if s in early or s in late]
    names += [s for s in {**early, **late} if s not in SEGMENTS]
    out = {}
    for name in names:
        a, b = (early.get(name) or {}).get("ne"), (late.get(name) or {}).get("ne")
        out[name] = None if a is None or b is None else float(a - b)
    return out


def aar(p1: np.ndarray, p2: np.ndarray, eps: float = 1e-6) -> float:
    """A/A ratio: mean 2 |p1 - p2| / (p1 + p2 + eps) over pairs of exact-copy items."""
    p1 = np.asarray(p1, dtype=np.float64).ravel()
    p2 = np.asarray(p2, dtype=np.float64).ravel()
    if p1.size == 0 or p1.shape != p2.shape:
        raise ValueError(f"aar: expected two equally long, non-empty prediction arrays (one per copy of "
                         f"each pair), found {p1.size} and {p2.size}")
    if not (np.isfinite(p1).all() and np.isfinite(p2).all()):
        raise ValueError(f"aar: expected finite predictions, found {int((~np.isfinite(p1)).sum())} and "
                         f"{int((~np.isfinite(p2)).sum())} non-finite")
    return float(np.mean(aar_terms(p1, p2, eps)))


def user_bootstrap(users: np.ndarray, columns: np.ndarray, statistic, resamples: int = 1000, level: float = 0.95,
                   seed: int = 0) -> dict[str, float]:
    """{"difference": statistic on the data, "low", "high": its `level` percentile interval} over `resamples` draws
    of the users with replacement, each drawn user bringing all of their rows.

    `columns` (k, rows) are summed per user once; a resample is a vector of user counts w, so its sums are
    w @ per-user sums and `statistic` maps sums (k, draws) to values (draws,). Draws without a defined value
    (NaN, e.g. no clicks) are dropped."""
    _, user = np.unique(np.asarray(users).ravel(), return_inverse=True)
    per_user = np.stack([np.bincount(user, weights=c, minlength=user.max() + 1 if len(user) else 0)
                         for c in columns])  # (k, users)
    n_users = per_user.shape[1]
    point = float(statistic(per_user.sum(1)[:, None])[0])
    rng, uniform = np.random.default_rng(seed), np.full(n_users, 1 / n_users)
    draws = np.concatenate([statistic(per_user @ rng.multinomial(n_users, uniform, size=min(100, resamples - start)).T)
                            for start in range(0, resamples, 100)])  # 100 draws at a time: bounded memory
    draws = draws[np.isfinite(draws)]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": point, "low": float(low), "high": float(high)}


def _log_loss_terms(y: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _ne_difference(delta: np.ndarray, events: np.ndarray, clicks: np.ndarray, eps: float) -> np.ndarray:
    """NE(a) - NE(b) from sums of loss_a - loss_b, events and clicks (arrays of draws)."""
    rate = np.clip(clicks / events, eps, 1 - eps)
    base = -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (delta / events) / base


def _checked_users(users: np.ndarray, y: np.ndarray, where: str) -> np.ndarray:
    users = np.asarray(users).ravel()
    if users.shape != y.shape:
        raise ValueError(f"{where}: expected one user per impression ({y.size}), found {users.size}")
    return users


def _contrast_columns(y, terms, users, where: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """users and the columns [sum_i s_i loss_i, 1, y] of one set of impressions scored by several models."""
    y = _labels_and_probabilities(y, terms[0][1], where)[0]
    delta = np.zeros_like(y)
    for sign, p in terms:
        delta += sign * _log_loss_terms(y, _labels_and_probabilities(y, p, where)[1], eps)
    return _checked_users(users, y, where), np.stack([delta, np.ones_like(y), y])


def bootstrap_ne_contrast(y: np.ndarray, terms: list[tuple[float, np.ndarray]], users: np.ndarray,
                          resamples: int = 1000, level: float = 0.95, seed: int = 0, eps: float = 1e-7
                          ) -> dict[str, float]:
    """sum_i s_i NE(y, p_i) over `terms` [(s_i, p_i)] of models scored on the same impressions - [(1, p_a),
    (-1, p_b)] is NE(a) - NE(b) - and its interval from resampling users (user_bootstrap): per resample
        sum_i s_i NE_i = (w . sum_i s_i loss_i / w . events) / H(w . clicks / w . events)
    where loss_i sums a user's log-loss terms under p_i and H is the base-rate log loss of normalized_entropy."""
    users, columns = _contrast_columns(y, terms, users, "bootstrap_ne_contrast", eps)
    return user_bootstrap(users, columns, lambda s: _ne_difference(*s, eps), resamples, level, seed)


def bootstrap_drift_contrast(early: tuple, late: tuple, resamples: int = 1000, level: float = 0.95, seed: int = 0,
                             eps: float = 1e-7) -> dict[str, float]:
    """sum_i s_i DS_i, DS = NE(early) - NE(late) (drift sensitivity), and its interval from resampling users across
    both slices together; `early` and `late` are (y, terms [(s_i, p_i)], users) of each slice."""
    users, parts = [], []
    for part, (y, terms, part_users) in enumerate((early, late)):
        u, columns = _contrast_columns(y, terms, part_users, "bootstrap_drift_contrast", eps)
        zero = np.zeros_like(columns)
        users.append(u)
        parts.append(np.concatenate([columns, zero] if part == 0 else [zero, columns]))
    return user_bootstrap(np.concatenate(users), np.concatenate(parts, axis=1),
                          lambda s: _ne_difference(*s[:3], eps) - _ne_difference(*s[3:], eps), resamples, level, seed)


def bootstrap_mean_contrast(terms: list[tuple[float, np.ndarray]], users: np.ndarray, resamples: int = 1000,
                            level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """sum_i s_i mean(v_i) over the same rows (e.g. the A/A terms of models on the same copy pairs) and its
    interval from resampling users."""
    values = [np.asarray(v, dtype=np.float64).ravel() for _, v in terms]
    if not values or values[0].size == 0 or any(v.shape != values[0].shape for v in values):
        raise ValueError(f"bootstrap_mean_contrast: expected equally long, non-empty arrays, found "
                         f"{[v.size for v in values]}")
    combined = sum(sign * v for (sign, _), v in zip(terms, values))
    users = _checked_users(users, combined, "bootstrap_mean_contrast")
    with np.errstate(divide="ignore", invalid="ignore"):
        return user_bootstrap(users, np.stack([combined, np.ones_like(combined)]), lambda s: s[0] / s[1],
                              resamples, level, seed)


def aar_terms(p1: np.ndarray, p2: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """2 |p1 - p2| / (p1 + p2 + eps) of each pair: aar is their mean."""
    p1, p2 = np.asarray(p1, dtype=np.float64).ravel(), np.asarray(p2, dtype=np.float64).ravel()
    return 2 * np.abs(p1 - p2) / (p1 + p2 + eps)


def attention_diagnostics(attn: np.ndarray, pad: np.ndarray) -> dict[str, float]:
    """first_token, padding_mass, entropy (bits), self_attention of attention weights A, averaged over
    batch, heads and query rows.

    attn: (B, heads, Tq, S) or (B, Tq, S), each row a distribution over the S keys.
    pad:  (B, S) bool, True where the key is padding.
    """
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim == 3:
        a = a[:, None]  # (B, 1, Tq, S)
    pad = np.asarray(pad, dtype=bool)
    if a.ndim != 4 or pad.shape != (a.shape[0], a.shape[3]):
        raise ValueError(f"attention_diagnostics: expected attn (B, heads, Tq, S) or (B, Tq, S) and pad "
                         f"(B, S), found attn {np.shape(attn)} and pad {pad.shape}")
    if a.size == 0:
        raise ValueError(f"attention_diagnostics: expected at least one attention row, found attn {a.shape}")
    n = min(a.shape[2], a.shape[3])
    plogp = np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0)), 0.0)  # 0 log 0 = 0
    return {
        "first_token": float(a[..., 0].mean()),
        "padding_mass": float((a * pad[:, None, None, :]).sum(-1).mean()),
        "entropy": float(-plogp.sum(-1).mean()),
        "self_attention": float(a[:, :, np.arange(n), np.arange(n)].mean()),
    }

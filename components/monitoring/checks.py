"""The drift checks: what each one measures, what it means, what to do, and how its status follows from its value.

Every check has a value, a WARN and an ALERT threshold (params.yaml: drift.thresholds.<name>) and a status
OK | WARN | ALERT. For semid_coverage lower is worse (it warns and alerts below its thresholds); for every other
check higher is worse. The verdict of a run is its worst status. A check that cannot be measured on the data at
hand (no dense features, too few new items) is OK with a note that says why.
"""
from __future__ import annotations

import dataclasses

from components.errors import ParamsError
from components.params import DriftParams

STATUSES = ("OK", "WARN", "ALERT")  # index = the number in metrics/drift.json


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    measures: str  # the value, in a few words (the table's column)
    meaning: str  # one sentence: what a high status means
    action: str  # one sentence: what to do (the runbook line)
    lower_is_worse: bool = False


CHECKS = (
    Check("semid_prefix_shift", "Jensen-Shannon distance of the SemID-prefix mix of items shown (larger level)",
          "The content mix of what users are shown moved: the items shown come from other topics than before.",
          "Check for a catalogue or campaign change; if the new mix is here to stay, refresh the codebook and "
          "retrain the ranker on recent data."),
    Check("raw_id_churn", "share of current impressions on items absent from the reference window",
          "More impressions than usual go to items the reference never showed: a flood of new raw IDs.",
          "Check the item ingestion for duplicates or re-uploads under new IDs; confirm the backfill keeps up "
          "(semid_coverage) so the new IDs get SemIDs."),
    Check("content_drift", "ROC AUC of a classifier telling new items' embeddings from the reference items'",
          "Items first seen in the current window have different content from the reference items.",
          "Look at the new items and the prefixes that moved on this page; if the catalogue really changed, "
          "refresh the codebook on a recent window (`semid train_rqvae`), backfill and retrain the ranker."),
    Check("semid_coverage", "share of current impressions whose item has a SemID of the current codebook",
          "Items are being shown without a SemID: the ranker falls back to hashing their raw IDs.",
          "Run `semid backfill` (or `dvc repro backfill`) and check that embed ran on the new items.",
          lower_is_worse=True),
    Check("codebook_fit", "worst loss of code utilization or gain in collisions among current items",
          "The codebook no longer separates today's items as it did its training items.",
          "Refresh the codebook on a recent window (`semid train_rqvae` with a later rqvae.as_of), then backfill."),
    Check("codebook_age", "days since the codebook's training as_of",
          "The codebook is older than the refresh cadence.",
          "Refresh the codebook (`semid train_rqvae` with rqvae.as_of unpinned), then backfill and retrain."),
    Check("popularity_skew", "largest rise of the daily impression share of the top 0.1% / 5.6% of items",
          "Impressions concentrate on the most popular items much more than on a typical reference day.",
          "Check for a stuck or boosted campaign and for changes in the candidate or serving logic."),
    Check("label_drift", "relative change of the click-through rate, current vs reference",
          "Users click at a different rate than in the reference window.",
          "Check the click logging and the ranker's calibration (NE in metrics/ranker.json); look at CTR by prefix "
          "on this page."),
    Check("feature_drift", "largest normed Wasserstein distance of a dense f_* feature",
          "A dense feature's distribution moved: an upstream change in how it is computed or logged.",
          "Find the feature in the Evidently report and check its producer before retraining on it."),
)
BY_NAME = {c.name: c for c in CHECKS}


@dataclasses.dataclass(frozen=True)
class Limits:
    warn: float
    alert: float


def limits(p: DriftParams) -> dict[str, Limits]:
    """Each check's thresholds from drift.thresholds, checked: both set, numbers, and in the right order."""
    out = {}
    for check in CHECKS:
        t = getattr(p.thresholds, check.name)
        key = f"drift.thresholds.{check.name}"
        warn = t.warn
        if check.name == "codebook_age":
            if warn is not None:
                raise ParamsError(f"{key}.warn is set; codebook_age warns past drift.max_codebook_age_days "
                                  f"({p.max_codebook_age_days}): set that instead")
            warn = float(p.max_codebook_age_days)
        for name, value in (("warn", warn), ("alert", t.alert)):
            if value is None:
                raise ParamsError(f"{key}.{name} is null, expected a number")
        if check.lower_is_worse and warn < t.alert:
            raise ParamsError(f"{key}: warn {warn} is below alert {t.alert}; lower is worse for {check.name}, so "
                              f"expected warn >= alert (it warns first, then alerts)")
        if not check.lower_is_worse and warn > t.alert:
            raise ParamsError(f"{key}: warn {warn} is above alert {t.alert}; expected warn <= alert (a value "
                              f"first warns, then alerts)")
        out[check.name] = Limits(warn, t.alert)
    return out


def status(value: float | None, limit: Limits, lower_is_worse: bool = False) -> str:
    """OK, WARN or ALERT; a value that could not be measured (None) is OK."""
    if value is None:
        return "OK"
    if lower_is_worse:
        return "ALERT" if value < limit.alert else "WARN" if value < limit.warn else "OK"
    return "ALERT" if value > limit.alert else "WARN" if value > limit.warn else "OK"


def verdict(statuses: list[str]) -> str:
    return max(statuses, key=STATUSES.index, default="OK")

"""The typed view of params.yaml: loaded once per command, each stage receives only its own section.

Unknown keys and values of the wrong type are errors that name the key, so a typo in params.yaml (or in
`dvc exp run -S key=value`) fails loudly instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from pathlib import Path

import yaml

from components.errors import ParamsError


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: str = "synthetic"  # "synthetic" (semid generate) or "movielens" (import movielens_dir)
    movielens_dir: str | None = None  # a MovieLens release directory, for source "movielens"


@dataclasses.dataclass(frozen=True)
class StorageParams:
    root: str = "data"  # where raw partitions land (<root>/raw) and the loop publishes: a local path or s3://b/p


@dataclasses.dataclass(frozen=True)
class ShiftParams:
    """A change of the synthetic world from start_day on, so that each drift check can be seen to fire."""
    kind: str = "none"  # "none" | "topic" | "flood" | "concentration"
    start_day: int = 45  # first shifted day, counted from world.start (0-based)
    strength: float = 1.0  # how strong (per kind: components/data/world.py)


@dataclasses.dataclass(frozen=True)
class WorldParams:
    """The synthetic item/event stream; see components/data/world.py for what each knob does."""
    seed: int = 7
    scale: float = 1.0
    start: dt.date = dt.date(2026, 1, 1)
    days: int = 170  # long enough to replay 120 days across the April refresh (README, "The loop")
    active_items: int = 1000
    half_life_days: float = 6.0
    impressions_per_day: int = 20000
    users: int = 5000
    head_items_fraction: float = 0.001
    head_share: float = 0.25
    torso_items_fraction: float = 0.056
    torso_share: float = 0.75
    topics_per_user: int = 3
    targeted_fraction: float = 0.6
    base_logit: float = -3.0
    affinity_weight: float = 3.0
    item_effect_std: float = 0.5
    exact_copy_fraction: float = 0.02
    near_copy_fraction: float = 0.02
    category_null_fraction: float = 0.05
    shift: ShiftParams = ShiftParams()


@dataclasses.dataclass(frozen=True)
class ValidationParams:
    max_bad_fraction: float = 0.001
    window_start: dt.date | None = None
    window_end: dt.date | None = None
    chunk_rows: int = 1_000_000


@dataclasses.dataclass(frozen=True)
class EmbedParams:
    encoder: str = "minilm"  # "minilm" | "precomputed" | "hashing-test" (fast tests only)
    precomputed_path: str | None = None  # parquet of item_id + vector, for encoder "precomputed"
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class RQVAEParams:
    """The Semantic ID model (components/semid/rqvae.py) and its quality gates."""
    method: str = "rqvae"  # "rqvae" (PAPER.md) | "rqkmeans" (residual k-means, no autoencoder)
    as_of: dt.date | None = None  # end (exclusive) of the training window; None: loop.as_of, else the data's end
    window_days: int = 90
    levels: int = 3  # L
    codebook_size: int = 256  # K
    latent_dim: int = 32  # D'
    hidden_dims: tuple[int, ...] = (256,)
    beta: float = 0.5
    seed: int = 0
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 0.001
    warmup_steps: int = 200
    normalize_input: bool = True
    kmeans_init: bool = True
    kmeans_iterations: int = 20
    dead_code_restart: bool = True
    restart_every: int = 100
    min_utilization: float = 0.9
    max_collision_rate: float = 0.15
    refresh_months: tuple[int, ...] = (1, 4, 7, 10)  # a new codebook when as_of crosses day 1 of these months
    refresh_on_drift: bool = False  # also when the last drift verdict has codebook_fit at ALERT


@dataclasses.dataclass(frozen=True)
class BackfillParams:
    batch_size: int = 65_536  # embeddings encoded per batch: bounds memory whatever the item count
    s3_endpoint_url: str | None = None  # for S3-compatible stores (MinIO, moto); None: AWS


@dataclasses.dataclass(frozen=True)
class HistoryParams:
    """The user-history module of the ranker: the user's previous clicks, newest last."""
    length: int = 20  # T: clicks kept per example (left-padded, older ones dropped)
    item_ids: str = "semid"  # how history items are embedded: "ie" | "rh" | "semid" | "hybrid"
    aggregation: str = "bypass"  # "bypass" | "transformer" | "pma"
    seeds: int = 32  # PMA: learned query vectors d_s
    heads: int = 2  # attention heads (transformer, pma)
    lookback_days: int = 30  # clicks older than this before the training window are not history


@dataclasses.dataclass(frozen=True)
class PromotionParams:
    max_ne_regression: float = 0.002  # the challenger is promoted if NE(all) <= champion's NE + this


@dataclasses.dataclass(frozen=True)
class RankerParams:
    """The DLRM-style ranker (components/ranker/model.py) and its training window, evaluation and promotion."""
    item_ids: str = "semid"  # "ie" | "rh" | "semid" | "hybrid" (semid rows + rh row)
    parameterization: str = "prefix_ngram"  # unigram | trigram | fourgram | all_bigrams | prefix_ngram
    ngram_depth: int = 3  # n of prefix_ngram (<= L)
    collision_factor: float = 3.0  # RH and SemID tables: H = ceil(training items / collision_factor)
    missing_semid: str = "rh"  # items without a SemID: "rh" (hash their raw ID, counted) | "fail"
    train_end: dt.date | None = None  # end (exclusive) of training; None: the evaluation window's start
    train_days: int | None = 42  # None: from the data's first day
    eval_hours: int = 72
    eval_share: float | None = None  # the evaluation window holds this share of the events (instead of eval_hours)
    retrain_every_days: int = 1  # a new challenger when the champion was trained this many days before as_of
    embedding_dim: int = 64
    dense_hidden: tuple[int, ...] = (64,)
    top_hidden: tuple[int, ...] = (128, 64)
    batch_size: int = 1024
    epochs: int = 1  # passes over the training window, each in time order (the paper: one)
    lr: float = 0.002  # Adam, dense parameters
    sparse_lr: float = 0.4  # Adagrad, embedding tables (sparse gradients)
    tables: str = "torch"  # "torch" (EmbeddingBag, sparse gradients) | "torchrec" (fused row-wise Adagrad)
    sharding: str = "row_wise"  # torchrec tables on engine.kind ray: "row_wise" | "table_wise" (DMP)
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present) | "cpu" | "cuda"
    history: HistoryParams = HistoryParams()
    promotion: PromotionParams = PromotionParams()

    @property
    def uses_semid(self) -> bool:
        """Whether target or history items are embedded through SemIDs, so the SemID store is needed."""
        return bool({"semid", "hybrid"} & {self.item_ids, self.history.item_ids})


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Where a drift check turns WARN and ALERT (for semid_coverage, where lower is worse: below them)."""
    warn: float | None = None  # codebook_age: drift.max_codebook_age_days
    alert: float | None = None


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
    """One entry per drift check (components/monitoring/checks.py), calibrated on no-drift window pairs."""
    semid_prefix_shift: Thresholds = Thresholds(0.23, 0.27)
    raw_id_churn: Thresholds = Thresholds(0.2, 0.27)
    content_drift: Thresholds = Thresholds(0.62, 0.7)
    semid_coverage: Thresholds = Thresholds(0.9999, 0.999)
    codebook_fit: Thresholds = Thresholds(0.3, 0.6)
    codebook_age: Thresholds = Thresholds(None, 182)
    popularity_skew: Thresholds = Thresholds(0.2, 0.27)
    label_drift: Thresholds = Thresholds(0.22, 0.3)
    feature_drift: Thresholds = Thresholds(0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class DriftParams:
    """The drift stage (components/monitoring/): a current window against a reference window before it."""
    as_of: dt.date | None = None  # end (exclusive) of the current window; None: loop.as_of, else the data's end
    current_days: int = 1
    reference_days: int = 28
    gap_days: int = 0  # days between the reference window's end and the current window's start
    embedding_sample: int = 2000  # items per side of the content_drift test
    sample_rows: int = 100_000  # impressions per window given to Evidently
    prefix_buckets: int = 256  # SemID prefixes per level kept by name for Evidently (the rest: "other")
    churn_lag_days: int = 6  # the churn picture: impressions on items (prefixes) not seen this many days earlier
    max_codebook_age_days: int = 91  # codebook_age WARNs past this: the quarterly refresh is overdue
    seed: int = 0
    thresholds: DriftThresholds = DriftThresholds()


@dataclasses.dataclass(frozen=True)
class EngineParams:
    """Where validate, embed, backfill and train_ranker run (components/engine.py)."""
    kind: str = "local"  # "local" (this process, one-file tables) | "ray" (Ray actors, sharded tables)
    address: str | None = None  # Ray: None starts a local Ray on demand; "auto" or ray://host:10001 joins a cluster
    workers: int | None = None  # Ray actors per stage; None: one per CPU of the cluster
    shard_rows: int = 50_000  # Ray: rows per shard task (and per part of a sharded table): many shards per worker


@dataclasses.dataclass(frozen=True)
class LoopParams:
    """The loop's clock: every dated stage runs as of this day (exclusive end of what it reads)."""
    as_of: dt.date | None = None  # None: the day after the last events day; `semid <stage> --as-of` overrides


@dataclasses.dataclass(frozen=True)
class Params:
    storage: StorageParams = StorageParams()
    data: DataParams = DataParams()
    loop: LoopParams = LoopParams()
    engine: EngineParams = EngineParams()
    world: WorldParams = WorldParams()
    validation: ValidationParams = ValidationParams()
    embed: EmbedParams = EmbedParams()
    rqvae: RQVAEParams = RQVAEParams()
    backfill: BackfillParams = BackfillParams()
    ranker: RankerParams = RankerParams()
    drift: DriftParams = DriftParams()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml into a Params; keys left out take the defaults above."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found (expected a YAML file with sections "
                          f"{', '.join(f.name for f in dataclasses.fields(Params))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return from_mapping(Params, raw, where=str(path))


def from_mapping(cls: type, raw: object, where: str):
    """Build dataclass `cls` from a plain mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, found {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], f"{where}:{name}") for name in raw}
    return cls(**values)


def _coerce(kind, value, where: str):
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, where)
    if isinstance(kind, types.UnionType):  # only `X | None` is used
        if value is None:
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        (item,) = {k for k in typing.get_args(kind) if k is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is dt.date:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
    raise ParamsError(f"{where}: expected {getattr(kind, '__name__', kind)}, found {value!r}")

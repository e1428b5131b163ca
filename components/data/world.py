"""The synthetic world: a seeded ads/product item stream with the statistics the paper reports.

What it models, and why each piece is there:
- a 3-level topic taxonomy (components/data/taxonomy.yaml); every item belongs to one leaf and its text is an
  ad-like title built from that leaf's nouns and selling points, so a real text encoder groups items by topic;
- ID churn: items arrive every day (Poisson) and live an exponential time with mean half_life / ln 2, so half
  of the items active on any day have retired half_life days later (memorylessness makes this exact);
- impression skew: items are ranked by visible lifetime x lognormal noise (popular items stay longer) and the
  ranks take impression shares from a log-log curve through the paper's points (top 0.1% -> 25%, top 5.6% ->
  75%); each item spreads its impressions evenly over its visible life;
- users favour a few leaf topics (mostly inside one top-level topic); most impressions of an item go to users
  who favour its top-level topic, the rest to anyone;
- clicks: logit = base + affinity_weight * affinity(user, item leaf) + item effect + user bias + dense effects,
  with affinity 1 / 0.6 / 0.3 / 0 for a favoured leaf / sibling leaf / same top-level topic / other, so what is
  learned on one item transfers to items of the same topic;
- exact copies (same text, new raw ID, created later) and near-copies (slightly edited text) for A/A tests;
- optionally a drift scenario from shift.start_day on (`world.shift`): `topic` draws new items from 1 of the 8
  top-level topics only (with probability strength), `flood` brings (1 + 4 strength) times as many new items a
  day, `concentration` multiplies the impressions of each day's most popular items (the top torso fraction of
  the items alive) by (1 + 19 strength). The scenario draws
  from its own random stream, so the world before it is the same as without it (but for flood, whose extra
  items join the popularity ranking).

Ground truth (taxonomy, item topics and effects, copies, users) goes to data/world/ and is never a model input.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from rich.progress import track

from components.data import contracts
from components.errors import ParamsError
from components.params import WorldParams
from components.storage import DataDir, Layout, staged_dir, write_json, write_parquet

log = logging.getLogger(__name__)

TAXONOMY_FILE = Path(__file__).with_name("taxonomy.yaml")
AFFINITY_BY_SHARED_DEPTH = np.array([0.0, 0.3, 0.6, 1.0], dtype=np.float32)  # shared levels: 0, 1, 2, 3
US_PER_DAY = 86_400 * 1_000_000
TITLE_TEMPLATES = (
    "{brand} {noun} - {feature}",
    "{adjective} {noun} by {brand} | {feature}",
    "Save {pct}% on the {brand} {noun}, {feature}",
    "{brand} {model} {noun} with {feature}",
    "New: {adjective} {noun} from {brand} ({feature})",
    "{noun} | {brand} {model} | {feature}",
    "Shop the {adjective} {brand} {noun} - {feature}",
)
ADJECTIVES = ("premium", "compact", "best-selling", "lightweight", "durable", "classic", "modern", "affordable",
              "professional", "everyday", "limited edition", "eco-friendly")
NEAR_COPY_EDITS = ("{text} - free shipping", "{text} (2 pack)", "Sale: {text}", "{text} - now in stock")
SHIFTS = ("none", "topic", "flood", "concentration")
SHIFTED_TOPICS = 1  # topic shift: new items come from this many top-level topics


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """Leaves of the topic tree with their path; leaf i has level-1 id l1[i] and level-2 id l2[i]."""
    names: list[tuple[str, str, str]]  # (level 1, level 2, leaf) per leaf
    l1: np.ndarray  # (n_leaves,) int
    l2: np.ndarray  # (n_leaves,) int, unique across the tree
    nouns: list[list[str]]
    features: list[list[str]]
    brands: list[list[str]]  # per level-1 topic


def load_taxonomy(path: Path = TAXONOMY_FILE) -> Taxonomy:
    topics = yaml.safe_load(path.read_text())["topics"]
    names, l1, l2, nouns, features = [], [], [], [], []
    n_l2 = 0
    for i, top in enumerate(topics):
        for mid in top["children"]:
            for leaf in mid["children"]:
                names.append((top["name"], mid["name"], leaf["name"]))
                l1.append(i)
                l2.append(n_l2)
                nouns.append(leaf["nouns"])
                features.append(leaf["features"])
            n_l2 += 1
    return Taxonomy(names, np.array(l1), np.array(l2), nouns, features, [t["brands"] for t in topics])


def shared_depth(tax: Taxonomy, leaf_a: np.ndarray, leaf_b: np.ndarray) -> np.ndarray:
    """How many taxonomy levels two leaves share: 3 same leaf, 2 siblings, 1 same top level, 0 none."""
    return ((leaf_a == leaf_b).astype(np.int8) + (tax.l2[leaf_a] == tax.l2[leaf_b])
            + (tax.l1[leaf_a] == tax.l1[leaf_b]))


def click_probability(p: WorldParams, affinity: np.ndarray, effect: np.ndarray, bias: np.ndarray,
                      position: np.ndarray, age_days: np.ndarray) -> np.ndarray:
    """The world's click model: sigmoid(base + w affinity + item effect + user bias - 0.12 (position - 1)
    - 0.03 age in days)."""
    logit = (p.base_logit + p.affinity_weight * affinity + effect + bias - 0.12 * (position - 1) - 0.03 * age_days)
    return 1 / (1 + np.exp(-logit))


def impression_shares(n: int, p: WorldParams) -> np.ndarray:
    """Share of all impressions for popularity ranks 1..n: differences of a cumulative curve S(q) that is
    piecewise linear in log-log space through (head fraction, head share), (torso fraction, torso share), (1, 1)."""
    q = np.arange(0, n + 1) / n
    log_q = np.log(np.maximum(q, 1e-300))
    x = np.log([p.head_items_fraction, p.torso_items_fraction, 1.0])
    y = np.log([p.head_share, p.torso_share, 1.0])
    head_slope = (y[1] - y[0]) / (x[1] - x[0])
    log_s = np.where(log_q < x[0], y[0] + head_slope * (log_q - x[0]), np.interp(log_q, x, y))
    s = np.where(q > 0, np.exp(log_s), 0.0)
    return np.diff(s)


def _day_float(ts: dt.date | dt.datetime) -> float:
    """Days since the Unix epoch (UTC) as a float: the world's internal clock."""
    if not isinstance(ts, dt.datetime):
        ts = dt.datetime(ts.year, ts.month, ts.day, tzinfo=dt.timezone.utc)
    return ts.timestamp() / 86_400


def _to_utc(days: np.ndarray) -> pl.Series:
    return pl.Series(np.round(days * US_PER_DAY).astype(np.int64)).cast(contracts.UTC)


def _where(keep: np.ndarray, values: pl.Series) -> pl.Series:
    """`values` with null wherever `keep` is false."""
    return pl.select(pl.when(pl.Series(keep)).then(values)).to_series().alias(values.name)


def make_items(p: WorldParams, tax: Taxonomy, rng: np.random.Generator) -> pl.DataFrame:
    """Every item of the world with its hidden truth: leaf, item effect, copy-of, visible life and rate."""
    t0 = _day_float(p.start)
    t1 = t0 + p.days
    mean_life = p.half_life_days / math.log(2)
    active = p.active_items * p.scale
    # Stationary start: ages and remaining lives of the items alive at t0 are both exponential.
    n0 = rng.poisson(active)
    born0 = t0 - rng.exponential(mean_life, n0)
    retire0 = t0 + rng.exponential(mean_life, n0)
    n_new = rng.poisson(active / mean_life * p.days)
    born_new = np.sort(rng.uniform(t0, t1, n_new))
    shift, shift_rng = p.shift, np.random.default_rng([p.seed, 1])
    if shift.kind == "flood":  # the extra arrivals of (1 + 4 strength) times as many new items a day
        extra = shift_rng.poisson(4 * shift.strength * active / mean_life * (p.days - shift.start_day))
        born_new = np.sort(np.concatenate([born_new, shift_rng.uniform(t0 + shift.start_day, t1, extra)]))
        n_new = len(born_new)
    born = np.concatenate([born0, born_new])
    retire = np.concatenate([retire0, born_new + rng.exponential(mean_life, n_new)])
    n = len(born)
    leaf_weights = rng.lognormal(0.0, 0.5, len(tax.names))
    leaf = rng.choice(len(tax.names), n, p=leaf_weights / leaf_weights.sum())
    if shift.kind == "topic":
        topics = shift_rng.choice(tax.l1.max() + 1, SHIFTED_TOPICS, replace=False)
        pool = np.flatnonzero(np.isin(tax.l1, topics))
        moved = (born >= t0 + shift.start_day) & (shift_rng.random(n) < shift.strength)
        leaf[moved] = shift_rng.choice(pool, moved.sum(), p=leaf_weights[pool] / leaf_weights[pool].sum())
    effect = rng.normal(0.0, p.item_effect_std, n)
    texts = make_titles(tax, leaf, rng)
    copy_of = np.full(n, -1)
    copy_kind = [""] * n
    # Copies: re-uploads of an existing item's content under a new raw ID, born during the original's life.
    n_exact, n_near = int(round(p.exact_copy_fraction * n)), int(round(p.near_copy_fraction * n))
    originals = rng.choice(n, n_exact + n_near, replace=False)
    copy_born = rng.uniform(np.maximum(born[originals], t0), np.minimum(retire[originals], t1))
    copy_retire = copy_born + rng.exponential(mean_life, len(originals))
    edits = rng.integers(0, len(NEAR_COPY_EDITS), n_near)
    copy_texts = [texts[o] for o in originals[:n_exact]] + [
        NEAR_COPY_EDITS[e].format(text=texts[o]) for o, e in zip(originals[n_exact:], edits)]
    born = np.concatenate([born, copy_born])
    retire = np.concatenate([retire, copy_retire])
    leaf = np.concatenate([leaf, leaf[originals]])
    effect = np.concatenate([effect, effect[originals]])
    texts += copy_texts
    copy_of = np.concatenate([copy_of, originals])
    copy_kind += ["exact"] * n_exact + ["near"] * n_near
    n = len(born)
    # Popularity: rank by visible life x noise, so head items tend to be long-lived, then spread each item's
    # share of all impressions evenly over its visible life (impressions per day = rate).
    visible = np.minimum(retire, t1) - np.maximum(born, t0)
    rank = np.argsort(-(visible * rng.lognormal(0.0, 1.0, n)), kind="stable")
    share = np.empty(n)
    share[rank] = impression_shares(n, p)
    rate = share * p.impressions_per_day * p.scale * p.days / visible
    ids = rng.choice(np.int64(10**12), n, replace=False) + 10**12  # raw IDs look like production IDs: 13 digits
    category = np.array([tax.names[leaf_i][0] for leaf_i in leaf], dtype=object)
    category[rng.random(n) < p.category_null_fraction] = None
    return pl.DataFrame({
        "item_id": ids,
        "created_at": _to_utc(born),
        "text": texts,
        "category": category.tolist(),
        "retired_at": _where(retire < t1, _to_utc(retire)),
        "leaf": leaf,
        "effect": effect,
        "copy_of": _where(copy_of >= 0, pl.Series(ids[np.maximum(copy_of, 0)])),
        "copy_kind": _where(copy_of >= 0, pl.Series(copy_kind)),
        "born": born,
        "retire": retire,
        "rate": rate,
    }).sort("born")


def make_titles(tax: Taxonomy, leaf: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Ad-like titles: a template filled with the leaf's noun and selling point and its top level's brand."""
    n = len(leaf)
    template = rng.integers(0, len(TITLE_TEMPLATES), n)
    pick = rng.integers(0, 1 << 30, (n, 4))
    pct = rng.choice([10, 15, 20, 25, 30, 40, 50], n)
    model = rng.integers(100, 1000, n)
    titles = []
    for i in range(n):
        lf = leaf[i]
        nouns, features, brands = tax.nouns[lf], tax.features[lf], tax.brands[tax.l1[lf]]
        titles.append(TITLE_TEMPLATES[template[i]].format(
            brand=brands[pick[i, 0] % len(brands)], noun=nouns[pick[i, 1] % len(nouns)],
            feature=features[pick[i, 2] % len(features)], adjective=ADJECTIVES[pick[i, 3] % len(ADJECTIVES)],
            pct=pct[i], model=f"{chr(65 + model[i] % 26)}{model[i]}"))
    return [t[0].upper() + t[1:] for t in titles]


def make_users(p: WorldParams, tax: Taxonomy, rng: np.random.Generator) -> pl.DataFrame:
    """Users with favoured leaves (mostly inside one top-level topic), activity weight and click bias."""
    n = int(round(p.users * p.scale))
    n_leaves = len(tax.names)
    home = rng.integers(0, tax.l1.max() + 1, n)
    by_l1 = np.argsort(tax.l1, kind="stable")  # leaves grouped by top-level topic
    first = np.searchsorted(tax.l1[by_l1], home)
    size = np.bincount(tax.l1)[home]
    in_home = by_l1[first[:, None] + rng.integers(0, 1 << 30, (n, p.topics_per_user)) % size[:, None]]
    anywhere = rng.integers(0, n_leaves, (n, p.topics_per_user))
    favourites = np.where(rng.random((n, p.topics_per_user)) < 0.8, in_home, anywhere)
    return pl.DataFrame({
        "user_id": np.arange(n, dtype=np.int64) + 1_000_000,
        "home_topic": home,
        "favourite_leaves": favourites,
        "activity": rng.lognormal(0.0, 0.8, n),
        "bias": rng.normal(0.0, 0.3, n),
    })


def make_day(day: int, p: WorldParams, tax: Taxonomy, items: pl.DataFrame, users: pl.DataFrame,
             rng: np.random.Generator) -> pl.DataFrame:
    """One day's impressions and clicks, following the contract's events columns plus three dense features."""
    start = _day_float(p.start) + day
    end = start + 1
    alive = items.filter((pl.col("born") < end) & (pl.col("retire") > start))
    lo = np.maximum(alive["born"].to_numpy(), start)
    overlap = np.minimum(alive["retire"].to_numpy(), end) - lo
    rate = alive["rate"].to_numpy()
    if p.shift.kind == "concentration" and day >= p.shift.start_day:  # the day's most popular items take more
        top = np.argsort(-rate, kind="stable")[:max(1, int(round(p.torso_items_fraction * len(rate))))]
        rate = rate.copy()
        rate[top] *= 1 + 19 * p.shift.strength
    counts = rng.poisson(rate * overlap)
    idx = np.repeat(np.arange(len(alive)), counts)  # (E,) row in `alive` per impression
    ts = lo[idx] + rng.random(len(idx)) * overlap[idx]
    leaf = alive["leaf"].to_numpy()[idx]
    # Who sees it: a user who favours the item's top-level topic (targeted) or anyone, by activity.
    activity = users["activity"].to_numpy()
    user = rng.choice(len(users), len(idx), p=activity / activity.sum())
    targeted = rng.random(len(idx)) < p.targeted_fraction
    home = users["home_topic"].to_numpy()
    for topic in range(tax.l1.max() + 1):
        pool = np.flatnonzero(home == topic)
        rows = np.flatnonzero(targeted & (tax.l1[leaf] == topic))
        if len(pool) and len(rows):
            user[rows] = rng.choice(pool, len(rows), p=activity[pool] / activity[pool].sum())
    favourites = users["favourite_leaves"].to_numpy()[user]  # (E, topics_per_user)
    depth = shared_depth(tax, favourites, leaf[:, None]).max(axis=1)
    affinity = AFFINITY_BY_SHARED_DEPTH[depth]
    bias = users["bias"].to_numpy()[user]
    position = rng.integers(1, 11, len(idx)).astype(np.float32)
    age_days = (ts - alive["born"].to_numpy()[idx]).astype(np.float32)
    ctr = click_probability(p, affinity, alive["effect"].to_numpy()[idx], bias, position, age_days)
    clicked = rng.random(len(idx)) < ctr
    order = np.argsort(ts, kind="stable")
    return pl.DataFrame({
        "ts": _to_utc(ts[order]),
        "user_id": users["user_id"].to_numpy()[user[order]],
        "item_id": alive["item_id"].to_numpy()[idx[order]],
        "clicked": clicked[order].astype(np.int8),
        "f_position": position[order],
        "f_user_prior": (bias + rng.normal(0.0, 0.3, len(idx))).astype(np.float32)[order],
        "f_item_age_days": age_days[order],
        "shared_depth": depth[order],  # truth for the stats; conform_events drops it
    })


def check_shift(p: WorldParams) -> None:
    s = p.shift
    if s.kind not in SHIFTS:
        raise ParamsError(f"world.shift.kind is {s.kind!r}, expected one of {', '.join(SHIFTS)}")
    if s.kind != "none" and not 0 <= s.start_day < p.days:
        raise ParamsError(f"world.shift.start_day is {s.start_day}, expected a day in 0..{p.days - 1} (world.days)")
    if not s.strength > 0 or (s.kind == "topic" and s.strength > 1):
        raise ParamsError(f"world.shift.strength is {s.strength}, expected > 0 (at most 1 for kind topic)")


def run_generate(p: WorldParams, layout: Layout, into: DataDir | None = None) -> dict:
    """Write data/raw (or `into`: `semid replay` generates into data/stream and lands it day by day) with items
    and daily event partitions, and data/world (ground truth); return the stats."""
    into = into or layout.raw
    check_shift(p)
    rng = np.random.default_rng(p.seed)
    tax = load_taxonomy()
    items = make_items(p, tax, rng)
    users = make_users(p, tax, rng)
    log.info("world: %d items, %d users, %d days from %s", len(items), len(users), p.days, p.start)
    shown, clicks = np.zeros(4), np.zeros(4)  # per shared taxonomy depth between user and item
    with staged_dir(into.root) as tmp:
        raw = DataDir(tmp)
        raw.write_items(contracts.conform_items(items))
        for day in track(range(p.days), description="generating events"):
            events = make_day(day, p, tax, items, users, rng)
            depth = events["shared_depth"].to_numpy()
            shown += np.bincount(depth, minlength=4)
            clicks += np.bincount(depth, weights=events["clicked"].to_numpy(), minlength=4)
            raw.write_events(p.start + dt.timedelta(days=day), contracts.conform_events(events))
    stats = world_stats(into, items, users, p)
    stats["ctr_by_shared_depth"] = (clicks / np.maximum(shown, 1)).round(5).tolist()
    stats["impressions_by_shared_depth"] = shown.astype(int).tolist()
    with staged_dir(layout.world) as tmp:
        write_parquet(pl.DataFrame({"leaf": np.arange(len(tax.names)), "level1": [n[0] for n in tax.names],
                                    "level2": [n[1] for n in tax.names], "level3": [n[2] for n in tax.names]}),
                      tmp / "taxonomy.parquet")
        write_parquet(items.select("item_id", "leaf", "effect", "copy_of", "copy_kind", "rate"),
                      tmp / "item_truth.parquet")
        write_parquet(users, tmp / "users.parquet")
        write_json({"source": "synthetic", "params": dataclasses.asdict(p), "stats": stats}, tmp / "world.json")
    return stats


def world_stats(raw: DataDir, items: pl.DataFrame, users: pl.DataFrame, p: WorldParams) -> dict:
    """Realised skew, churn and topic->click relation, measured on what was written."""
    events = pl.scan_parquet(raw.events / "**" / "*.parquet")
    counts = (events.group_by("item_id").len().sort("len", descending=True).collect()["len"].to_numpy())
    n_items = len(items)  # shares over all items of the world, impressions or not
    total = counts.sum()
    top = lambda frac: float(counts[: max(1, int(round(frac * n_items)))].sum() / total)  # noqa: E731
    t0 = _day_float(p.start)
    born, retire = items["born"].to_numpy(), items["retire"].to_numpy()
    survived = []
    for day in range(p.days - int(math.ceil(p.half_life_days))):
        t = t0 + day + 0.5
        alive = (born <= t) & (retire > t)
        survived.append((retire[alive] > t + p.half_life_days).mean())
    survival = float(np.mean(survived))
    return {
        "items": n_items,
        "users": len(users),
        "events": int(total),
        "ctr": float(events.select(pl.col("clicked").cast(pl.Float64).mean()).collect().item()),
        "head_share": top(p.head_items_fraction),
        "torso_share": top(p.torso_items_fraction),
        "survival_after_half_life": survival,
        "realised_half_life_days": float(p.half_life_days * math.log(2) / -math.log(survival)),
        "exact_copies": int((items["copy_kind"] == "exact").sum()),
        "near_copies": int((items["copy_kind"] == "near").sum()),
    }

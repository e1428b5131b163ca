"""`semid paper-report [--quick]`: PAPER.md's findings measured on the default world, each with a 95% interval
and a verdict, in reports/paper/README.md (generated: never edit it by hand) with its PNG plots.

    baseline  `dvc repro`: the pipeline's outputs in the DVC cache, which every experiment starts from
    run       every setting x seed through `dvc exp run --queue -S ...` and `dvc queue start -j N`
              (components/paper/experiments.py): params.yaml and the workspace are left alone
    read      each run's metrics, and its reports/ranker/predictions.parquet from the DVC cache by the hash
              `dvc exp show --json` gives
    compare   a finding is a signed sum of settings' NE (or drift sensitivity, or A/A ratio) that the paper says is
              below 0 (or, for "neutral", is 0); its 95% interval comes from a paired bootstrap over users on the
              same evaluation impressions, one per seed
    verdict   holds: every seed's interval excludes 0 on the paper's side; contradicts: every seed's excludes 0 on
              the other side; within noise: otherwise ("neutral": holds when every interval holds 0)
    write     reports/paper/README.md, reports/paper/*.png, reports/paper/results.json (the raw figures)

The click loss of a swap (components/paper/click_loss.py) needs no experiment: it reads the world's ground truth.
"""
from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl

from components.errors import DataError
from components.paper.click_loss import click_loss
from components.paper.experiments import run_experiments
from components.params import load_params
from components.ranker.examples import ranker_window
from components.ranker.metrics import (
    SEGMENTS,
    aar_terms,
    bootstrap_drift_contrast,
    bootstrap_mean_contrast,
    bootstrap_ne_contrast,
)
from components.ranker.train_ranker import current_store
from components.storage import Layout, write_json, write_text

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402


OUT = Path("reports/paper")
SHORT_TRAIN_DAYS = 8  # Table 4: the paper's 4 vs 20 training days, scaled to the default world's 42
NO_CODEBOOK_GATES = {"rqvae.min_utilization": "0", "rqvae.max_collision_rate": "1"}  # measure, do not refuse


def _rows(kind: str) -> dict[str, str]:
    return {"ranker.item_ids": kind, "ranker.history.item_ids": kind}


SETTINGS: dict[str, dict[str, str]] = {
    "semid": {},
    "rh": _rows("rh"),
    "ie": _rows("ie"),
    "hybrid": _rows("hybrid"),
    "semid_unigram": {"ranker.parameterization": "unigram"},
    "semid_trigram": {"ranker.parameterization": "trigram"},
    "semid_all_bigrams": {"ranker.parameterization": "all_bigrams"},
    **{f"semid_K{K}": {"rqvae.codebook_size": str(K), **NO_CODEBOOK_GATES} for K in (512, 1024, 2048)},
    **{f"semid_L6_n{n}": {"rqvae.levels": "6", "ranker.ngram_depth": str(n), **NO_CODEBOOK_GATES}
       for n in (3, 4, 5, 6)},
    "semid_L6_fourgram": {"rqvae.levels": "6", "ranker.parameterization": "fourgram", **NO_CODEBOOK_GATES},
    "semid_short": {"ranker.train_days": str(SHORT_TRAIN_DAYS)},
    "rh_short": {**_rows("rh"), "ranker.train_days": str(SHORT_TRAIN_DAYS)},
    **{f"{kind}_{module}": {**(_rows(kind) if kind == "rh" else {}), "ranker.history.aggregation": module}
       for kind in ("semid", "rh") for module in ("transformer", "pma")},
}
QUICK = ("semid", "rh", "ie", "hybrid", "semid_trigram")  # one seed: Table 3, A/A and one parameterization


@dataclasses.dataclass(frozen=True)
class Finding:
    """One direction of the paper: sum of sign x metric(setting) over `terms` is below 0 ("lower") or is 0
    ("neutral"). metric: "ne:<segment>", "drift:all" or "aar". paper: the size PAPER.md reports, relative to the
    second setting's metric (-0.0041: NE 0.41% lower), or absolute for drift sensitivity; None where it gives
    none."""
    table: str
    claim: str
    metric: str
    terms: tuple[tuple[int, str], ...]
    expect: str = "lower"
    paper: float | None = None

    @property
    def settings(self) -> list[str]:
        return [name for _, name in self.terms]


def _versus(table: str, claim: str, metric: str, ours: str, theirs: str, expect: str = "lower",
            paper: float | None = None) -> Finding:
    return Finding(table, claim, metric, ((1, ours), (-1, theirs)), expect, paper)


FINDINGS = (
    # Table 2: parameterizations, codebook size, prefix depth (the paper's train NE gains at K = 2048: prefix-3gram
    # -0.141%, trigram -0.028%, all bigrams -0.091%; prefix-3gram at K 512 -0.034%, 1024 -0.097%, 2048 -0.141%)
    _versus("2", "prefix-ngram beats unigram", "ne:all", "semid", "semid_unigram"),
    _versus("2", "prefix-ngram beats trigram", "ne:all", "semid", "semid_trigram", paper=-0.00113),
    _versus("2", "prefix-ngram beats all bigrams", "ne:all", "semid", "semid_all_bigrams", paper=-0.0005),
    _versus("2", "prefix-4gram beats fourgram (L = 6)", "ne:all", "semid_L6_n4", "semid_L6_fourgram"),
    _versus("2", "K = 512 beats K = 256", "ne:all", "semid_K512", "semid"),
    _versus("2", "K = 1024 beats K = 512", "ne:all", "semid_K1024", "semid_K512", paper=-0.00063),
    _versus("2", "K = 2048 beats K = 1024", "ne:all", "semid_K2048", "semid_K1024", paper=-0.00044),
    *[_versus("2", f"prefix depth {n + 1} beats {n} (L = 6)", "ne:all", f"semid_L6_n{n + 1}", f"semid_L6_n{n}")
      for n in (3, 4, 5)],
    # Table 3: segments and drift
    _versus("3", "SemID is neutral to RH on head items", "ne:head", "semid", "rh", expect="neutral"),
    _versus("3", "SemID beats RH on tail items", "ne:tail", "semid", "rh"),
    _versus("3", "SemID beats RH on new items", "ne:new", "semid", "rh", paper=-0.0041),
    _versus("3", "SemID beats IE on new items", "ne:new", "semid", "ie", paper=-0.0033),
    _versus("3", "SemID beats RH on all items", "ne:all", "semid", "rh", paper=-0.0005),
    _versus("3", "SemID is less sensitive to drift than RH", "drift:all", "semid", "rh", paper=-0.0010),
    # Table 4: the longer window helps SemID more: (long - short) for SemID below (long - short) for RH
    Finding("4", f"{SHORT_TRAIN_DAYS} -> 42 training days helps SemID more than RH", "ne:all",
            ((1, "semid"), (-1, "semid_short"), (-1, "rh"), (1, "rh_short")), paper=-0.0005),
    # Table 6: SemID's gain over RH is larger with a contextualising history module than with bypass
    *[Finding("6", f"SemID's gain over RH is larger with {module} than with bypass", "ne:all",
              ((1, f"semid_{module}"), (-1, f"rh_{module}"), (-1, "semid"), (1, "rh")), paper=paper)
      for module, paper in (("transformer", -0.00025), ("pma", -0.00015))],
    # A/A: the copy of an item moves the prediction less
    _versus("A/A", "SemID has a lower A/A ratio than RH", "aar", "semid", "rh"),
    _versus("A/A", "SemID has a lower A/A ratio than IE", "aar", "semid", "ie"),
    _versus("A/A", "SemID features next to the raw ID (hybrid) lower RH's A/A ratio", "aar", "hybrid", "rh",
            paper=-0.43),
)
ATTENTION = ("entropy", "padding_mass", "first_token", "self_attention")  # Table 7, per run (summaries only)
LESS_DIFFUSE = ("entropy", "padding_mass")  # the paper: SemID's attention has lower entropy and less padding mass


# --- reading the runs ---

def cache_dir(runner: Callable = subprocess.run) -> Path:
    return Path(runner(["dvc", "cache", "dir"], check=True, capture_output=True, text=True).stdout.strip())


def cached(cache: Path, md5: str | None, run: str) -> Path:
    """The file of DVC hash `md5` in the cache (DVC 3 layout: files/md5/ab/cdef...)."""
    path = cache / "files" / "md5" / str(md5)[:2] / str(md5)[2:]
    if md5 is None or not path.exists():
        raise DataError(f"experiment {run}: its reports/ranker/predictions.parquet (hash {md5}) is not in the DVC "
                        f"cache {cache}")
    return path


def read_predictions(results: list[dict], cache: Path) -> dict[tuple[str, int], pl.DataFrame]:
    return {(r["experiment"], r["seed"]): pl.read_parquet(cached(cache, r.get("predictions"),
                                                                 f"{r['experiment']}-s{r['seed']}"))
            for r in results}


# --- comparing ---

def _aligned(frames: list[pl.DataFrame], part: str) -> list[pl.DataFrame]:
    """The rows of `part` of each run, checked to be the same impressions in the same order."""
    parts = [f.filter(pl.col("part") == part) for f in frames]
    keys = [p.select("ts", "user_id", "item_id") for p in parts]
    if any(not k.equals(keys[0]) for k in keys[1:]):
        raise DataError(f"the runs compared scored different {part} impressions (another window or data?)")
    return parts


def measure(finding: Finding, frames: list[pl.DataFrame], seed: int, resamples: int = 1000) -> dict:
    """The finding's contrast and its interval on one seed's runs (`frames` in the order of finding.terms)."""
    signs = [s for s, _ in finding.terms]
    kind, _, segment = finding.metric.partition(":")
    if kind == "drift":
        early, late = (_aligned(frames, part) for part in ("early", "late"))
        slices = [(e[0]["clicked"].to_numpy(), [(s, e_i["p"].to_numpy()) for s, e_i in zip(signs, e)],
                   e[0]["user_id"].to_numpy()) for e in (early, late)]
        return bootstrap_drift_contrast(*slices, resamples=resamples, seed=seed)
    scored = _aligned(frames, "eval")
    if kind == "aar":
        has_copy = scored[0]["p_copy"].is_not_null()
        if any(not f["p_copy"].is_not_null().equals(has_copy) for f in scored[1:]):
            raise DataError("the runs compared have exact copies on different impressions")
        pairs = [f.filter(has_copy) for f in scored]
        terms = [(s, aar_terms(f["p"].to_numpy(), f["p_copy"].to_numpy())) for s, f in zip(signs, pairs)]
        return bootstrap_mean_contrast(terms, pairs[0]["user_id"].to_numpy(), resamples=resamples, seed=seed)
    mask = segment_mask(scored[0], segment)
    rows = [f.filter(mask) for f in scored]
    return bootstrap_ne_contrast(rows[0]["clicked"].to_numpy(), [(s, f["p"].to_numpy()) for s, f in zip(signs, rows)],
                                 rows[0]["user_id"].to_numpy(), resamples=resamples, seed=seed)


def segment_mask(frame: pl.DataFrame, segment: str) -> pl.Series:
    if segment == "all":
        return pl.Series([True] * len(frame))
    if segment == "new":
        return frame["new"]
    if segment == "seen":
        return frame["segment"] != "unseen"
    return frame["segment"] == segment


def verdict(finding: Finding, intervals: list[dict]) -> str:
    if finding.expect == "neutral":
        if all(i["low"] <= 0 <= i["high"] for i in intervals):
            return "holds"
    elif all(i["high"] < 0 for i in intervals):
        return "holds"
    if all(i["low"] > 0 for i in intervals) or (finding.expect == "neutral" and all(i["high"] < 0
                                                                                     for i in intervals)):
        return "contradicts"
    return "within noise"


def paper_effect(finding: Finding, results: list[dict]) -> float | None:
    """The paper's size of the finding on our scale: relative sizes times the second setting's metric here."""
    if finding.paper is None or finding.metric.startswith("drift"):
        return finding.paper
    kind, _, segment = finding.metric.partition(":")
    base = _mean(results, finding.terms[1][1], *(("aar",) if kind == "aar" else ("ne", segment)))
    return None if base is None else finding.paper * base


def explanation(finding: Finding, intervals: list[dict], effect: float | None) -> str:
    """What the measurement says about a verdict other than holds: whether these impressions could resolve the
    paper's effect at all (the interval's half-width against it)."""
    width = max((i["high"] - i["low"]) / 2 for i in intervals)
    if effect is None:
        return f"the interval's half-width is {width:.4f}; PAPER.md gives no size for this effect"
    ratio = width / abs(effect) if effect else float("inf")
    if ratio > 1:
        return (f"unresolvable here: the interval's half-width ({width:.4f}) is {ratio:.1f}x the paper's effect "
                f"({effect:+.4f}), so even the paper's model would not show it on these impressions")
    return (f"resolvable here (half-width {width:.4f} against the paper's effect {effect:+.4f}): our models differ "
            f"from the paper's, not the test")


def judge(results: list[dict], frames: dict[tuple[str, int], pl.DataFrame], resamples: int = 1000,
          findings: Sequence[Finding] = FINDINGS) -> list[dict]:
    """Each finding whose settings all ran: its per-seed intervals, verdict, the paper's effect on our scale
    and, for a verdict other than holds, what the measurement says about it."""
    seeds = sorted({r["seed"] for r in results})
    judged = []
    for finding in findings:
        if not all((name, s) in frames for name in finding.settings for s in seeds):
            continue
        intervals = [measure(finding, [frames[(name, s)] for name in finding.settings], s, resamples) for s in seeds]
        effect, found = paper_effect(finding, results), verdict(finding, intervals)
        judged.append({**dataclasses.asdict(finding), "seeds": seeds, "intervals": intervals, "verdict": found,
                       "paper_effect": effect,
                       "explanation": None if found == "holds" else explanation(finding, intervals, effect)})
    return judged


def attention_verdicts(results: list[dict]) -> list[dict]:
    """Table 7's direction, SemID's attention less diffuse than RH's, per module and diagnostic: the difference
    on each seed. A run's diagnostic is one mean over its evaluation, so there is no interval: holds when every
    seed's difference is below 0, contradicts when every one is above, within noise otherwise."""
    seeds = sorted({r["seed"] for r in results})
    found = []
    for module in ("transformer", "pma"):
        for diagnostic in LESS_DIFFUSE:
            by_seed = {(r["experiment"], r["seed"]): (r.get("attention") or {}).get(diagnostic) for r in results}
            pairs = [(by_seed.get((f"semid_{module}", s)), by_seed.get((f"rh_{module}", s))) for s in seeds]
            if any(not isinstance(a, (int, float)) or not isinstance(b, (int, float)) for a, b in pairs):
                continue
            differences = [a - b for a, b in pairs]
            verdict = ("holds" if all(d < 0 for d in differences) else
                       "contradicts" if all(d > 0 for d in differences) else "within noise")
            found.append({"module": module, "diagnostic": diagnostic, "seeds": seeds, "differences": differences,
                          "verdict": verdict})
    return found


# --- writing ---

def _mean(results: list[dict], name: str, *path: str) -> float | None:
    values = []
    for r in results:
        if r["experiment"] != name:
            continue
        value = r
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)):
            return None
        values.append(float(value))
    return float(np.mean(values)) if values else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(i: dict) -> str:
    return f"{i['difference']:+.4f} [{i['low']:+.4f}, {i['high']:+.4f}]"


def verdict_lines(judged: list[dict], seeds: list[int]) -> list[str]:
    """The verdicts table (the paper's size, each seed's interval, the verdict) and the measured explanation of
    every verdict other than holds."""
    lines = ["| table | the paper's direction | the paper's size here | "
             + " | ".join(f"seed {s}: difference [95% interval]" for s in seeds) + " | verdict |",
             "|---|---|---:|" + "---|" * len(seeds) + "---|"]
    for j in judged:
        effect = "n/a" if j["paper_effect"] is None else f"{j['paper_effect']:+.4f}"
        lines.append(f"| {j['table']} | {j['claim']} ({j['metric']}) | {effect} | "
                     + " | ".join(_interval(i) for i in j["intervals"]) + f" | **{j['verdict']}** |")
    unresolved = [j for j in judged if j["explanation"]]
    if unresolved:
        lines += ["", "Verdicts other than holds, measured:", ""]
        lines += [f"- {j['claim']} (**{j['verdict']}**): {j['explanation']}." for j in unresolved]
    return lines


def default_seeds(quick: bool) -> list[int]:
    return [0] if quick else [0, 1, 2]


def command_flags(quick: bool, seeds: list[int]) -> str:
    """The paper-report flags that give these settings and seeds (none for the full default run)."""
    flags = " --quick" if quick else ""
    if seeds != default_seeds(quick):
        flags += "".join(f" --seed {seed}" for seed in seeds)
    return flags


def render(results: list[dict], judged: list[dict], click: dict | None, quick: bool, seconds: float) -> str:
    names = [n for n in SETTINGS if any(r["experiment"] == n for r in results)]
    seeds = sorted({r["seed"] for r in results})
    reused = sum(bool(r.get("reused")) for r in results)
    resumed = f" ({reused} of {len(results)} experiments finished by an earlier run of this commit)" if reused else ""
    lines = [
        "# PAPER.md's findings on the default world",
        "",
        f"Generated by `semid paper-report{command_flags(quick, seeds)}` (never edit by hand) in {seconds / 60:.0f} "
        f"minutes on this machine{resumed}; seeds {', '.join(map(str, seeds))}. NE is normalized entropy (lower is "
        "better; 1 = the base rate). A finding is a difference the paper says is below 0; its interval is the "
        "95% interval of a paired bootstrap over users (one heavy user cannot decide it) on the same evaluation "
        "impressions, one per seed. **holds**: every seed's interval excludes 0 on the paper's side; "
        "**contradicts**: every seed's excludes 0 on the other side; **within noise**: otherwise.",
        "",
        "## Verdicts",
        "",
        *verdict_lines(judged, seeds),
    ]
    lines += ["", "## NE by segment, drift sensitivity, A/A (mean over seeds)", "",
              "![NE by segment](ne_by_segment.png)", "",
              "| setting | " + " | ".join(f"NE {s}" for s in SEGMENTS) + " | drift sensitivity | AAR |",
              "|---|" + "---:|" * (len(SEGMENTS) + 2)]
    for name in names:
        cells = [_fmt(_mean(results, name, "ne", s)) for s in SEGMENTS]
        cells += [_fmt(_mean(results, name, "drift_sensitivity", "all")), _fmt(_mean(results, name, "aar"), 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    attention = [n for n in names if _mean(results, n, "attention", "entropy") is not None]
    if attention:
        lines += ["", "## Attention diagnostics (Table 7; mean over seeds, summaries per run: no interval)", "",
                  "| setting | " + " | ".join(ATTENTION) + " |", "|---|" + "---:|" * len(ATTENTION)]
        lines += [f"| {n} | " + " | ".join(_fmt(_mean(results, n, "attention", a)) for a in ATTENTION) + " |"
                  for n in attention]
        verdicts = attention_verdicts(results)
        if verdicts:
            lines += ["", "The paper: SemID's attention is less diffuse than RH's (lower entropy, less padding mass). "
                      "SemID minus RH per seed; a run's diagnostic is one mean, so the verdict is the seeds' "
                      "agreement (holds: every seed below 0), not an interval.", "",
                      "| module | diagnostic | " + " | ".join(f"seed {s}" for s in seeds) + " | verdict |",
                      "|---|---|" + "---:|" * len(seeds) + "---|"]
            lines += [f"| {v['module']} | {v['diagnostic']} | " + " | ".join(f"{d:+.4f}" for d in v["differences"])
                      + f" | **{v['verdict']}** |" for v in verdicts]
    if click is not None:
        lines += ["", "## Click loss of a swap by shared SemID prefix depth", "",
                  f"On {click['impressions']:,} evaluation impressions whose item has another item alive that day "
                  "with its whole SemID; CTR from the world's ground-truth click model "
                  "(components/paper/click_loss.py). Depth 0: any item alive.", "",
                  "![click loss](click_loss.png)", "",
                  "| shared depth | click loss (CTR(S') - CTR(S)) / CTR(S) [95% interval] |", "|---|---|"]
        lines += [f"| {d} | {_interval(i)} |" for d, i in click["loss"].items()]
        lines += ["", "| one level more | gain [95% interval] | the paper: deeper loses less |", "|---|---|---|"]
        for step, i in click["deeper_loses_less"].items():
            lines.append(f"| {step} | {_interval(i)} | "
                         f"**{'holds' if i['low'] > 0 else 'contradicts' if i['high'] < 0 else 'within noise'}** |")
        if click.get("by_factor"):
            factors = list(click["by_factor"])
            lines += ["", "Where the change comes from: the same swaps with one attribute of the replacement at a "
                      "time, the rest of the shown item kept (click loss [95% interval]).", "",
                      "| shared depth | " + " | ".join(factors) + " |", "|---|" + "---|" * len(factors)]
            lines += [f"| {d} | " + " | ".join(_interval(click["by_factor"][f][d]) for f in factors) + " |"
                      for d in click["loss"]]
    lines += ["", "## Settings", "", "Each is `dvc exp run --queue` with these overrides and `-S ranker.seed=S`:",
              ""]
    lines += [f"- {n}: " + (" ".join(f"`-S {k}={v}`" for k, v in SETTINGS[n].items()) or "params.yaml as it is")
              for n in names]
    return "\n".join(lines) + "\n"


def plot_segments(results: list[dict], path: Path) -> None:
    names = [n for n in ("semid", "hybrid", "rh", "ie") if any(r["experiment"] == n for r in results)]
    segments = [s for s in SEGMENTS if s != "seen"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        values = [_mean(results, name, "ne", s) or np.nan for s in segments]
        ax.bar(np.arange(len(segments)) + k * width, values, width, label=name)
    ax.set_xticks(np.arange(len(segments)) + width * (len(names) - 1) / 2, segments)
    ax.set_ylabel("NE (lower is better)")
    ax.set_ylim(0.8, 1.05)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_click_loss(click: dict, path: Path) -> None:
    depths = list(click["loss"])
    mid = [click["loss"][d]["difference"] for d in depths]
    err = [[m - click["loss"][d]["low"] for d, m in zip(depths, mid)],
           [click["loss"][d]["high"] - m for d, m in zip(depths, mid)]]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(d) for d in depths], mid, yerr=err, capsize=4, color="#6a9fdc")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("shared SemID prefix depth")
    ax.set_ylabel("click loss of the swap")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[dict], frames: dict, click: dict | None, quick: bool, seconds: float,
                 out: Path = OUT, resamples: int = 1000) -> list[dict]:
    judged = judge(results, frames, resamples)
    out.mkdir(parents=True, exist_ok=True)
    plot_segments(results, out / "ne_by_segment.png")
    if click is not None:
        plot_click_loss(click, out / "click_loss.png")
    write_json({"results": results, "findings": judged, "attention": attention_verdicts(results),
                "click_loss": click}, out / "results.json")
    write_text(render(results, judged, click, quick, seconds), out / "README.md")
    return judged


def run(quick: bool, jobs: int, seeds: Sequence[int], out: Path = OUT, runner: Callable = subprocess.run) -> None:
    """The whole report: the baseline, the experiments, the comparisons, the files."""
    started = time.perf_counter()
    runner(["dvc", "repro"], check=True)
    names = list(QUICK if quick else SETTINGS)
    results = run_experiments(SETTINGS, names, seeds, jobs=jobs, runner=runner)
    frames = read_predictions(results, cache_dir(runner))
    p, layout = load_params().ranker, Layout()
    store, K, _ = current_store(dataclasses.replace(p, item_ids="semid"), layout)
    click = None
    if (layout.world / "world.json").exists():
        _, evaluation = ranker_window(p, layout.validated)
        click = click_loss(layout, store, K, evaluation.start, evaluation.end)
    write_report(results, frames, click, quick, time.perf_counter() - started, out)

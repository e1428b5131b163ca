"""The "paper directions" report: do PAPER.md's qualitative findings hold on our data?

Runs a fixed set of ranker experiments with `dvc exp run -S ...` (several seeds each), reads the
metrics/ranker.json each leaves in the workspace, and writes a short markdown table that checks:

    (a) SemID prefix-ngram beats RH and IE on new items (lower NE)
    (b) SemID prefix-ngram beats RH on tail items
    (c) prefix-ngram beats trigram and all-bigrams (NE on all items)
    (d) SemID has a lower A/A ratio (AAR) than RH

    python -m components.ranker.directions [--seeds 0 1 2] [--out reports/ranker/directions.md]
    python -m components.ranker.directions --from-json reports/ranker/directions.json   # table only

Experiments run one after another in the workspace: each derives from the workspace the previous one
left, so every experiment sets all the keys any of them changes. DVC names experiments per baseline
commit: to run the set again on the same commit, `dvc exp remove` the earlier ones first.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from components.errors import DataError, SemidError
from components.ranker.metrics import SEGMENTS
from components.storage import Layout, write_json, write_text

log = logging.getLogger(__name__)


def _item_ids(kind: str, parameterization: str = "prefix_ngram") -> dict[str, str]:
    # The history module embeds clicked items the same way as the candidate, so an experiment compares the
    # item representation as a whole. RH and IE ignore the parameterization; it is set anyway so the value
    # the previous experiment left in params.yaml does not leak into this one.
    return {"ranker.item_ids": kind, "ranker.history.item_ids": kind, "ranker.parameterization": parameterization}


EXPERIMENTS: dict[str, dict[str, str]] = {
    "semid_prefix_ngram": _item_ids("semid", "prefix_ngram"),
    "rh": _item_ids("rh"),
    "ie": _item_ids("ie"),
    "semid_trigram": _item_ids("semid", "trigram"),
    "semid_all_bigrams": _item_ids("semid", "all_bigrams"),
}


# --- running the experiments ---

def experiment_command(name: str, seed: int) -> list[str]:
    """The `dvc exp run` command line of one experiment and seed."""
    cmd = ["dvc", "exp", "run"]
    for key, value in {**EXPERIMENTS[name], "ranker.seed": str(seed)}.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd + ["--name", f"{name}-s{seed}"]


def read_ranker_metrics(path: Path, name: str, seed: int) -> dict:
    """metrics/ranker.json as the run of (name, seed) left it; its config must match the overrides."""
    run = f"experiment {name}-s{seed}"
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found after {run} (expected the train_ranker stage to write it)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable after {run} (expected a JSON object): {exc}") from None
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: expected a JSON object after {run}, found {type(metrics).__name__}")
    config = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
    for key, value in {**EXPERIMENTS[name], "ranker.seed": str(seed)}.items():
        found = _lookup(config, key.removeprefix("ranker.").split("."))
        if found is not None and str(found) != value:
            raise DataError(f"{path}: config.{key.removeprefix('ranker.')} is {found!r} after {run}, expected "
                            f"{value!r} (a stale metrics file, or params not applied?)")
    return metrics


def run_experiments(names: Sequence[str], seeds: Sequence[int], runner: Callable = subprocess.run,
                    on_result: Callable[[list[dict]], None] | None = None,
                    layout: Layout = Layout()) -> list[dict]:
    """Run every experiment of `names` with every seed (all experiments of one seed, then the next seed),
    each with `dvc exp run` in the current directory; collect {"experiment", "seed", **metrics}.

    on_result(results so far) is called after each run, so an interrupted session keeps what it ran.
    """
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SemidError(f"unknown experiment(s) {unknown}; expected some of {list(EXPERIMENTS)}")
    console = Console(stderr=True)
    runs = [(name, seed) for seed in seeds for name in names]
    results = []
    for i, (name, seed) in enumerate(runs, 1):
        cmd = experiment_command(name, seed)
        # A rule, not a live bar: dvc and the stage print their own output (and bars) to the same terminal.
        console.rule(f"[bold]experiment {i}/{len(runs)}: {name}-s{seed}")
        log.info("running %s", " ".join(cmd))
        runner(cmd, check=True)
        metrics = read_ranker_metrics(layout.metrics / "ranker.json", name, seed)
        results.append({"experiment": name, "seed": seed,
                        **{k: v for k, v in metrics.items() if k not in ("experiment", "seed")}})
        if on_result is not None:
            on_result(results)
    return results


# --- the report ---

@dataclasses.dataclass(frozen=True)
class Stat:
    """One metric of one experiment over its seeds."""
    mean: float
    lo: float
    hi: float
    n: int

    def cell(self, digits: int) -> str:
        text = f"{self.mean:.{digits}f}"
        return text + (f" ±{(self.hi - self.lo) / 2:.{digits}f}" if self.n > 1 else "")


def _lookup(d: object, path: Sequence[str]) -> object:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _stat(results: list[dict], name: str, path: Sequence[str]) -> Stat | None:
    """Mean and min..max over the seeds of `name`; None (n/a) when a seed lacks the figure."""
    values = [_number(_lookup(r, path)) for r in results if r.get("experiment") == name]
    if not values or any(v is None for v in values):
        return None
    return Stat(sum(values) / len(values), min(values), max(values), len(values))


def _cell(stat: Stat | None, digits: int = 5) -> str:
    return "n/a" if stat is None else stat.cell(digits)


def _relative(a: Stat | None, b: Stat | None) -> str:
    if a is None or b is None or b.mean == 0:
        return "n/a"
    return f"{100 * (a.mean - b.mean) / b.mean:+.3f}%"


def _compare(a: Stat | None, b: Stat | None) -> str:
    """Whether `a` is lower than `b`: on the means, and beyond the seed spread (the min..max ranges are apart)."""
    if a is None or b is None:
        return "n/a"
    if a.mean >= b.mean:
        return "does not hold"
    return "holds" if a.hi < b.lo else "within seed noise"


def _combine(statuses: list[str]) -> str:
    for status in ("does not hold", "n/a", "within seed noise"):
        if status in statuses:
            return status
    return "holds"


@dataclasses.dataclass(frozen=True)
class Direction:
    label: str
    claim: str
    metric: tuple[str, ...]  # path into a result, e.g. ("ne", "new")
    ours: str
    baselines: tuple[str, ...]
    also: tuple[tuple[str, ...], ...] = ()  # further metrics shown for context, not judged


DIRECTIONS = (
    Direction("a", "SemID prefix-ngram beats RH and IE on new items", ("ne", "new"), "semid_prefix_ngram",
              ("rh", "ie")),
    Direction("b", "SemID prefix-ngram beats RH on tail items", ("ne", "tail"), "semid_prefix_ngram", ("rh",)),
    Direction("c", "prefix-ngram beats trigram and all-bigrams", ("ne", "all"), "semid_prefix_ngram",
              ("semid_trigram", "semid_all_bigrams"), also=(("ne", "tail"), ("ne", "new"))),
    Direction("d", "SemID has a lower A/A ratio than RH", ("aar",), "semid_prefix_ngram", ("rh",)),
)


def _metric_name(path: Sequence[str]) -> str:
    return "AAR" if tuple(path) == ("aar",) else f"NE({path[-1]})"


def _digits(path: Sequence[str]) -> int:
    return 4 if tuple(path) == ("aar",) else 5


def _direction_line(d: Direction, results: list[dict]) -> str:
    ours = _stat(results, d.ours, d.metric)
    figures, statuses = [], []
    for base in d.baselines:
        theirs = _stat(results, base, d.metric)
        status = _compare(ours, theirs)
        statuses.append(status)
        figures.append(f"vs {base} {_cell(theirs, _digits(d.metric))}: {_relative(ours, theirs)} ({status})")
    line = (f"- **({d.label})** {d.claim}: **{_combine(statuses)}**. {_metric_name(d.metric)} {d.ours} "
            f"{_cell(ours, _digits(d.metric))}; " + "; ".join(figures) + ".")
    for path in d.also:
        rel = [f"{_relative(_stat(results, d.ours, path), _stat(results, b, path))} vs {b}" for b in d.baselines]
        line += f" {_metric_name(path)}: " + ", ".join(rel) + "."
    return line


def directions_table(results: list[dict]) -> str:
    """The markdown report of `results` (one dict per experiment and seed): a table, then (a)-(d)."""
    names = [n for n in EXPERIMENTS if any(r.get("experiment") == n for r in results)]
    names += list(dict.fromkeys(r.get("experiment") for r in results if r.get("experiment") not in EXPERIMENTS))
    lines = [
        "# Paper directions on our data",
        "",
        "NE is normalized entropy (lower is better; 1 = predicting the base rate). A cell is the mean over "
        "seeds, ± half the min..max range when there are several. A direction holds when it holds on the means "
        "and the seed ranges are apart (every seed beats every seed of the baseline); when only the means agree "
        "it is within seed noise. n/a: a figure is missing for some seed.",
        "",
        "| experiment | seeds | " + " | ".join(f"NE {s}" for s in SEGMENTS) + " | AAR | drift sensitivity (all) |",
        "|---|---|" + "---:|" * (len(SEGMENTS) + 2),
    ]
    for name in names:
        seeds = ", ".join(str(r.get("seed")) for r in results if r.get("experiment") == name)
        cells = [_cell(_stat(results, name, ("ne", s))) for s in SEGMENTS]
        cells += [_cell(_stat(results, name, ("aar",)), 4), _cell(_stat(results, name, ("drift_sensitivity", "all")))]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "## Directions (PAPER.md)", ""]
    lines += [_direction_line(d, results) for d in DIRECTIONS]
    lines += ["", "## Experiments", ""]
    lines += [f"- {name}: " + " ".join(f"`-S {k}={v}`" for k, v in EXPERIMENTS[name].items())
              for name in names if name in EXPERIMENTS]
    return "\n".join(lines) + "\n"


# --- command line ---

def read_results(path: Path) -> list[dict]:
    """Results written by an earlier run (the json beside the report)."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: results file not found (expected the json an earlier run wrote "
                        f"beside its report)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable (expected a JSON list of results): {exc}") from None
    if not isinstance(results, list):
        raise DataError(f"{path}: expected a JSON list of results, found {type(results).__name__}")
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "experiment" not in r or "seed" not in r:
            raise DataError(f"{path}: result {i} should be an object with 'experiment' and 'seed', found {r!r:.80}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m components.ranker.directions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="ranker.seed values; each experiment runs once per seed (default: 0 1 2)")
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS),
                        metavar="NAME", help=f"which experiments to run (default: all of {', '.join(EXPERIMENTS)})")
    parser.add_argument("--out", type=Path, default=Layout().reports / "ranker" / "directions.md",
                        help="the markdown report; the raw results json is written beside it (same name, .json)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="build the report from results an earlier run wrote, instead of running experiments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raw = args.out.with_suffix(".json")
    try:
        if args.from_json is not None:
            results = read_results(args.from_json)
        else:
            results = run_experiments(args.experiments, args.seeds, on_result=lambda rs: write_json(rs, raw))
        write_json(results, raw)
        write_text(directions_table(results), args.out)
    except SemidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as exc:
        kept = f"; the runs before it are in {raw}" if raw.exists() else ""
        print(f"error: `{' '.join(map(str, exc.cmd))}` exited with {exc.returncode}{kept}", file=sys.stderr)
        sys.exit(1)
    log.info("wrote %s and %s", args.out, raw)


if __name__ == "__main__":
    main()

"""The "paper directions" report: do PAPER.md's qualitative findings hold on our data?

Queues a fixed set of ranker experiments with `dvc exp run --queue -S ...` (several seeds each), runs the queue
with `dvc queue start -j N`, reads each experiment's params and metrics/ranker.json from `dvc exp show --json`,
and writes a short markdown table that checks:

    (a) SemID prefix-ngram beats RH and IE on new items (lower NE)
    (b) SemID prefix-ngram beats RH on tail items
    (c) prefix-ngram beats trigram and all-bigrams (NE on all items)
    (d) SemID has a lower A/A ratio (AAR) than RH

    python -m components.ranker.directions [--seeds 0 1 2] [--jobs 2] [--out reports/ranker/directions.md]
    python -m components.ranker.directions --from-json reports/ranker/directions.json   # table only

Queued experiments run in temporary copies of the last commit, so the workspace and params.yaml stay as they
are; the metrics come back because metrics/ is tracked by git. Every experiment sets all the keys any of them
changes. DVC names experiments per baseline commit: running the set again on the same commit replaces the
earlier experiments of the same names.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from components.errors import DataError, SemidError
from components.ranker.metrics import SEGMENTS
from components.ranker.train_ranker import PREDICTIONS as PREDICTIONS_FILE
from components.storage import Layout, write_json, write_text

log = logging.getLogger(__name__)
PREDICTIONS = f"reports/ranker/{PREDICTIONS_FILE}"  # a train_ranker output, DVC-cached


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

def experiment_command(name: str, seed: int, experiments: dict[str, dict[str, str]] = EXPERIMENTS) -> list[str]:
    """The `dvc exp run --queue` command line of one experiment and seed."""
    cmd = ["dvc", "exp", "run", "--queue"]
    for key, value in {**experiments[name], "ranker.seed": str(seed)}.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd + ["--name", f"{name}-s{seed}"]


def queue_status(runner: Callable) -> dict[str, str]:
    """Experiment name -> Queued | Running | Success | Failed, from `dvc queue status` (it has no JSON). A name
    with a task still queued or running is not done, whatever tasks of it finished before."""
    out = runner(["dvc", "queue", "status"], check=True, capture_output=True, text=True).stdout
    status: dict[str, str] = {}
    for row in out.splitlines()[1:]:  # Task  Name  Created  Status
        fields = row.split()
        if len(fields) >= 4 and fields[-1] in ("Queued", "Running", "Success", "Failed"):
            if status.get(fields[1]) not in ("Queued", "Running"):
                status[fields[1]] = fields[-1]
    return status


def collect(shown: list, runs: list[tuple[str, int]], experiments: dict[str, dict[str, str]] = EXPERIMENTS
            ) -> list[dict]:
    """{"experiment", "seed", **metrics/ranker.json, "predictions": the DVC hash of its
    reports/ranker/predictions.parquet (None without one)} of each run, from `dvc exp show --json`; the run's
    params must carry its overrides."""
    revs = {rev["name"]: rev for baseline in shown for exp in baseline.get("experiments") or []
            for rev in exp["revs"]}
    results = []
    for name, seed in runs:
        run = f"{name}-s{seed}"
        if run not in revs or not revs[run].get("data"):
            raise DataError(f"`dvc exp show` has no experiment {run} (expected the queue to have run it)")
        data = revs[run]["data"]
        params = _lookup(data, ("params", "params.yaml", "data")) or {}
        for key, value in {**experiments[name], "ranker.seed": str(seed)}.items():
            found = _lookup(params, key.split("."))
            if str(found) != value:
                raise DataError(f"experiment {run}: params.yaml has {key} = {found!r}, expected {value!r}")
        metrics = _lookup(data, ("metrics", "metrics/ranker.json", "data"))
        if not isinstance(metrics, dict):
            raise DataError(f"experiment {run}: no metrics/ranker.json (is metrics/ tracked by git?)")
        predictions = _lookup(data, ("outs", PREDICTIONS, "hash"))
        results.append({"experiment": name, "seed": seed, **metrics, "predictions": predictions})
    return results


def remove_earlier(names: list[str], runner: Callable) -> None:
    """`dvc exp remove` the experiments of this baseline that carry one of `names` (a run of the same set
    before): DVC refuses a second experiment of a name, and the new run replaces the old."""
    shown = json.loads(runner(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout)
    existing = {rev.get("name") for baseline in shown for exp in baseline.get("experiments") or []
                for rev in exp["revs"]}
    earlier = [name for name in names if name in existing]
    if earlier:
        log.info("replacing the earlier experiments %s", ", ".join(earlier))
        runner(["dvc", "exp", "remove", *earlier], check=True)


def run_experiments(names: Sequence[str], seeds: Sequence[int], jobs: int = 2, runner: Callable = subprocess.run,
                    poll_seconds: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                    experiments: dict[str, dict[str, str]] = EXPERIMENTS) -> list[dict]:
    """Queue every experiment of `names` (keys of `experiments`) with every seed (all experiments of one seed,
    then the next seed), run the queue with `jobs` workers, wait until it is done, and collect
    {"experiment", "seed", **metrics, "predictions"}."""
    unknown = [n for n in names if n not in experiments]
    if unknown:
        raise SemidError(f"unknown experiment(s) {unknown}; expected some of {list(experiments)}")
    runs = [(name, seed) for seed in seeds for name in names]
    remove_earlier([f"{name}-s{seed}" for name, seed in runs], runner)
    runner(["dvc", "queue", "remove", "--success", "--failed"], check=True)  # earlier runs' tasks (not their data)
    for name, seed in runs:
        log.info("queueing %s-s%s", name, seed)
        runner(experiment_command(name, seed, experiments), check=True)
    runner(["dvc", "queue", "start", "-j", str(jobs)], check=True)
    wanted = {f"{name}-s{seed}" for name, seed in runs}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task(f"{len(runs)} experiments, {jobs} at a time", total=len(runs))
        while True:
            status = queue_status(runner)
            done = [run for run in wanted if status.get(run) in ("Success", "Failed")]
            progress.update(task, completed=len(done))
            if len(done) == len(wanted):
                break
            sleep(poll_seconds)
    failed = sorted(run for run in wanted if status.get(run) != "Success")
    if failed:
        raise SemidError(f"experiment(s) {failed} failed; see `dvc queue logs NAME`")
    shown = runner(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout
    return collect(json.loads(shown), runs, experiments)


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
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at a time (dvc queue start -j)")
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
            results = run_experiments(args.experiments, args.seeds, jobs=args.jobs)
        write_json(results, raw)
        write_text(directions_table(results), args.out)
    except SemidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as exc:
        print(f"error: `{' '.join(map(str, exc.cmd))}` exited with {exc.returncode}", file=sys.stderr)
        sys.exit(1)
    log.info("wrote %s and %s", args.out, raw)


if __name__ == "__main__":
    main()

"""Run ranker experiments on DVC's queue and read their results back: the paper report's runner.

Each experiment is a set of `-S key=value` overrides, run once per seed as `dvc exp run --queue ... --name
NAME-sSEED`; `dvc queue start -j N` runs them in temporary copies of the last commit, so the workspace and
params.yaml stay as they are; metrics/ranker.json comes back through git and the predictions' DVC hash through
`dvc exp show --json`. DVC names experiments per baseline commit: running a set again on the same commit reuses
the finished experiments of the same names and params (a long report stopped half-way resumes) and replaces the
others.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence

import yaml
from rich.console import Console
from rich.progress import Progress

from components.errors import DataError, SemidError
from components.ranker.train_ranker import PREDICTIONS as PREDICTIONS_FILE

log = logging.getLogger(__name__)
PREDICTIONS = f"reports/ranker/{PREDICTIONS_FILE}"  # a train_ranker output, DVC-cached



def experiment_command(name: str, seed: int, experiments: dict[str, dict[str, str]]) -> list[str]:
    """The `dvc exp run --queue` command line of one experiment and seed."""
    cmd = ["dvc", "exp", "run", "--queue"]
    for key, value in {**experiments[name], "ranker.seed": str(seed)}.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd + ["--name", f"{name}-s{seed}"]


def queue_status(runner: Callable) -> tuple[dict[str, str], int | None]:
    """Experiment name -> Queued | Running | Success | Failed, from `dvc queue status` (it has no JSON), and the
    number of workers, active or idle (None when DVC does not say). A name with a task still queued or running is
    not done, whatever tasks of it finished before."""
    out = runner(["dvc", "queue", "status"], check=True, capture_output=True, text=True).stdout
    status: dict[str, str] = {}
    for row in out.splitlines()[1:]:  # Task  Name  Created  Status
        fields = row.split()
        if len(fields) >= 4 and fields[-1] in ("Queued", "Running", "Success", "Failed"):
            if status.get(fields[1]) not in ("Queued", "Running"):
                status[fields[1]] = fields[-1]
    workers = re.search(r"Worker status: (\d+) active(?:, (\d+) idle)?", out)
    return status, int(workers[1]) + int(workers[2] or 0) if workers else None


def collect(shown: list, runs: list[tuple[str, int]], experiments: dict[str, dict[str, str]]) -> list[dict]:
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
            if str(found) != value and found != yaml.safe_load(value):  # -S k=null gives None
                raise DataError(f"experiment {run}: params.yaml has {key} = {found!r}, expected {value!r}")
        metrics = _lookup(data, ("metrics", "metrics/ranker.json", "data"))
        if not isinstance(metrics, dict):
            raise DataError(f"experiment {run}: no metrics/ranker.json (is metrics/ tracked by git?)")
        predictions = _lookup(data, ("outs", PREDICTIONS, "hash"))
        results.append({"experiment": name, "seed": seed, **metrics, "predictions": predictions})
    return results


def finished(shown: list, runs: list[tuple[str, int]], experiments: dict[str, dict[str, str]]) -> set[str]:
    """The runs this baseline already holds with their overrides applied and their metrics written: the same
    commit and params give the same results, so a report stopped half-way resumes where it stopped."""
    done = set()
    for name, seed in runs:
        try:
            collect(shown, [(name, seed)], experiments)
        except DataError:
            continue
        done.add(f"{name}-s{seed}")
    return done


def remove_earlier(names: list[str], shown: list, runner: Callable) -> None:
    """`dvc exp remove` the experiments of this baseline that carry one of `names` (an unfinished or different
    run of the same name before): DVC refuses a second experiment of a name, and the new run replaces the old."""
    existing = {rev.get("name") for baseline in shown for exp in baseline.get("experiments") or []
                for rev in exp["revs"]}
    earlier = [name for name in names if name in existing]
    if earlier:
        log.info("replacing the earlier experiments %s", ", ".join(earlier))
        runner(["dvc", "exp", "remove", *earlier], check=True)


def clear_orphans(runner: Callable) -> None:
    """Kill and remove the tasks DVC lists as Running while no queue worker is alive: a run killed mid-experiment
    (its workers stopped with the machine) leaves one behind, and `dvc exp show` fails until it is gone. Its
    experiment is not finished, so it is queued again like any other."""
    status, workers = queue_status(runner)
    orphans = sorted(name for name, state in status.items() if state == "Running")
    if orphans and workers == 0:
        log.warning("clearing task(s) left Running without a queue worker: %s", ", ".join(orphans))
        for name in orphans:
            runner(["dvc", "queue", "kill", name], check=True)
            runner(["dvc", "queue", "remove", name], check=True)


def show(runner: Callable) -> list:
    return json.loads(runner(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout)


def run_experiments(experiments: dict[str, dict[str, str]], names: Sequence[str], seeds: Sequence[int],
                    jobs: int = 2, runner: Callable = subprocess.run, poll_seconds: float = 10.0,
                    sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """Queue every experiment of `names` (keys of `experiments`) with every seed (all experiments of one seed,
    then the next seed) that this baseline does not already hold finished, run the queue with `jobs` workers, wait
    until it is done, and collect {"experiment", "seed", **metrics, "predictions", "reused"} of them all."""
    unknown = [n for n in names if n not in experiments]
    if unknown:
        raise SemidError(f"unknown experiment(s) {unknown}; expected some of {list(experiments)}")
    runs = [(name, seed) for seed in seeds for name in names]
    clear_orphans(runner)
    earlier = show(runner)
    done = finished(earlier, runs, experiments)
    if done:
        log.info("reusing %d finished experiment(s) of this commit: %s", len(done), ", ".join(sorted(done)))
    todo = [(name, seed) for name, seed in runs if f"{name}-s{seed}" not in done]
    if todo:
        remove_earlier([f"{name}-s{seed}" for name, seed in todo], earlier, runner)
        runner(["dvc", "queue", "remove", "--success", "--failed"], check=True)  # earlier tasks (not their data)
        for name, seed in todo:
            log.info("queueing %s-s%s", name, seed)
            runner(experiment_command(name, seed, experiments), check=True)
        runner(["dvc", "queue", "start", "-j", str(jobs)], check=True)
        wait(todo, len(done), len(runs), jobs, runner, poll_seconds, sleep)
    results = collect(show(runner), runs, experiments)
    return [{**r, "reused": f"{r['experiment']}-s{r['seed']}" in done} for r in results]


def wait(todo: list[tuple[str, int]], done: int, total: int, jobs: int, runner: Callable, poll_seconds: float,
         sleep: Callable[[float], None]) -> None:
    """Poll `dvc queue status` until every run of `todo` has finished; fail naming the runs that failed."""
    wanted = {f"{name}-s{seed}" for name, seed in todo}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task(f"{total} experiments, {jobs} at a time", total=total, completed=done)
        idle_polls = 0  # polls in a row that found runs queued and no worker at all
        while True:
            status, workers = queue_status(runner)
            ended = [run for run in wanted if status.get(run) in ("Success", "Failed")]
            progress.update(task, completed=done + len(ended))
            if len(ended) == len(wanted):
                break
            idle_polls = idle_polls + 1 if workers == 0 and any(status.get(r) == "Queued" for r in wanted) else 0
            if idle_polls == 2:  # not a start-up moment: workers died, or obeyed an earlier `dvc queue stop`
                log.warning("no queue worker is running and experiments are queued: starting %d again", jobs)
                runner(["dvc", "queue", "start", "-j", str(jobs)], check=True)
                idle_polls = 0
            sleep(poll_seconds)
    failed = sorted(run for run in wanted if status.get(run) != "Success")
    if failed:
        raise SemidError(f"experiment(s) {failed} failed; see `dvc queue logs NAME`")


def _lookup(d: object, path: Sequence[str]) -> object:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d

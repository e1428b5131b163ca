"""The daily flow (deployment semid-daily, 02:00 UTC): land -> validate -> embed -> train_rqvae -> backfill ->
drift -> train_ranker, each a DVC stage run as a task (flows/stages.py).

land          with `as_of`, the raw lake (storage.root) as it stood that day, cut from the generated stream
              data/stream (`semid replay` makes it); without, the generate stage (the synthetic world or MovieLens)
train_rqvae   keeps the current codebook unless a refresh is due (quarterly, forced, drift): then the same run
              does the switch of flows/codebook_refresh.py, since backfill and train_ranker follow
train_ranker  trains a challenger when one is due (ranker.retrain_every_days) and switches models/serving.json
              only when it wins
publish       the serving triple and the day's reports to storage.root (nothing to copy with the default root)
push          `dvc push` to the default DVC remote and a git commit of dvc.lock and metrics/ (flows/publishing.py)

Every stage runs as of the day after the last landed events day (loop.as_of null), so landing sets the clock.
A run holds the workspace from landing to the last stage (flows/workspace.py): a second run waits its turn.
Each run writes runs/<run_id>.json (flows/records.py): `semid runs list | show RUN | reproduce RUN`.
Run it locally on the ephemeral API:  python -m flows.daily [--as-of YYYY-MM-DD]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from components.data.landing import land
from components.params import load_params
from components.storage import Layout
from flows import publishing, records, workspace
from flows.publishing import storage_fault
from flows.stages import REPO, RETRY_DELAYS_S, run_stage

DAILY_STAGES = ("validate", "embed", "train_rqvae", "backfill", "drift", "train_ranker")


@task(name="land", task_run_name="land as of {as_of}", cache_policy=NONE, retries=len(RETRY_DELAYS_S),
      retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=storage_fault)
def land_day(repo: Path, as_of: dt.date) -> float:
    """Copy what was known before as_of from data/stream into the raw lake (storage.root)."""
    started = time.perf_counter()
    land(Layout(repo).stream, Layout(repo), as_of, load_params(repo / "params.yaml").storage.root)
    return time.perf_counter() - started


@flow(name="semid-daily", log_prints=True)
def daily(repo: str = str(REPO), as_of: dt.date | None = None) -> dict[str, float]:
    """One day of the loop; returns the seconds of each task, land first. A failing stage fails the flow and
    later stages (and publish, push) do not run. Either way the run leaves its record in runs/ (flows/records.py)."""
    root = Path(repo)
    stages = list(DAILY_STAGES) if as_of is not None else ["generate", *DAILY_STAGES]
    with (workspace.held(root, "semid-daily"),
          records.recorded(root, "semid-daily", stages, landed_as_of=as_of) as seconds):
        seconds["land"] = land_day(root, as_of) if as_of is not None else run_stage("generate", root)
        for stage in DAILY_STAGES:
            seconds[stage] = run_stage(stage, root)
        seconds["publish"] = publishing.publish(root)
        seconds["push"] = publishing.push(root, f"semid-daily as of {as_of or 'the data end'}: dvc.lock, metrics")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="the repository (dvc.yaml) to run in")
    parser.add_argument("--as-of", type=dt.date.fromisoformat, help="land data/stream as of this day first")
    args = parser.parse_args()
    print(json.dumps(daily(repo=args.repo, as_of=args.as_of)))


if __name__ == "__main__":
    main()

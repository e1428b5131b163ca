"""The replay flow (`semid replay --start YYYY-MM-DD --days N`): the loop day after day on a simulated clock.

The world of params.yaml is generated once into data/stream (kept while world.* stays the same); then each day
D = start, start + 1, ... lands what was known before D into data/raw and runs the daily flow as of D, so the
codebook refreshes on its own cadence. After every day a row goes to reports/loop/timeline.csv and the plots
in reports/loop/timeline.html are redrawn (components/monitoring/timeline.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from components.data.world import run_generate
from components.monitoring.timeline import record_day
from components.params import load_params
from components.storage import Layout, write_json
from flows import workspace
from flows.daily import daily
from flows.stages import REPO


@task(name="generate-stream", cache_policy=NONE)
def generate_stream(repo: Path) -> None:
    """data/stream: the whole world of params.yaml, generated once (again only when world.* changes)."""
    layout = Layout(repo)
    world = load_params(repo / "params.yaml").world
    marker = layout.stream.root / "world.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(world), default=str))
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        get_run_logger().info("data/stream holds this world already: not generated again")
        return
    run_generate(world, layout, into=layout.stream)
    write_json(wanted, marker)


@flow(name="semid-replay", log_prints=True)
def replay(start: dt.date, days: int, repo: str = str(REPO)) -> list[dict]:
    """Run the daily flow as of start, start + 1 day, ... (days in all); returns the timeline rows."""
    root = Path(repo)
    with workspace.held(root, "semid-replay"):  # the daily runs inside hold it with it
        return replay_days(root, start, days)


def replay_days(root: Path, start: dt.date, days: int) -> list[dict]:
    generate_stream(root)
    rows = []
    for offset in range(days):
        as_of = start + dt.timedelta(days=offset)
        started = time.perf_counter()
        seconds = daily(repo=str(root), as_of=as_of)
        rows.append(record_day(Layout(root), as_of.isoformat(), time.perf_counter() - started, seconds))
        print(f"{as_of}: codebook {rows[-1]['codebook_version']}, champion {rows[-1]['champion']}, "
              f"drift {rows[-1]['drift_verdict']}, {rows[-1]['seconds']:.1f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="the repository (dvc.yaml) to run in")
    parser.add_argument("--start", type=dt.date.fromisoformat, required=True, help="the first simulated day")
    parser.add_argument("--days", type=int, required=True, help="how many days to run")
    args = parser.parse_args()
    replay(start=args.start, days=args.days, repo=args.repo)


if __name__ == "__main__":
    main()

"""The codebook refresh flow (deployment semid-codebook-refresh, 03:00 UTC on day 1 of January, April, July and
October): a new codebook switches everything together.

    train_rqvae   a new codebook (forced by default: the deployment runs on the quarterly boundary, and a
                  refresh whose window and params match the current codebook reproduces it bit for bit)
    backfill      a full backfill into the new version's own store, data/semids/<codebook_version>.parquet
    train_ranker  a challenger on the new store, scored against the serving champion on the same window
    switch        models/serving.json moves to (codebook, store, challenger) in one rename when the challenger
                  wins; until then readers see the previous triple, which stays on disk (`semid rollback`)

Run it locally:  python -m flows.codebook_refresh [--no-force]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow

from components.storage import Layout
from flows import publishing, records, workspace
from flows.stages import FORCE_ENV, REPO, run_stage

REFRESH_STAGES = ("train_rqvae", "backfill", "train_ranker")


@flow(name="semid-codebook-refresh", log_prints=True)
def codebook_refresh(repo: str = str(REPO), force: bool = True) -> dict:
    """Refresh the codebook and switch serving when the new triple wins; returns what serves afterwards."""
    root = Path(repo)
    with (workspace.held(root, "semid-codebook-refresh"),
          records.recorded(root, "semid-codebook-refresh", list(REFRESH_STAGES), force_refresh=force) as seconds):
        for stage in REFRESH_STAGES:
            forced = force and stage == "train_rqvae"
            seconds[stage] = run_stage(stage, root, force=forced, env={FORCE_ENV: "1"} if forced else None)
        seconds["publish"] = publishing.publish(root)
        seconds["push"] = publishing.push(root, "semid-codebook-refresh: dvc.lock, metrics")
    return json.loads(Layout(root).serving.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="the repository (dvc.yaml) to run in")
    parser.add_argument("--no-force", dest="force", action="store_false",
                        help="refresh only when the cadence says so")
    args = parser.parse_args()
    print(json.dumps(codebook_refresh(repo=args.repo, force=args.force)))


if __name__ == "__main__":
    main()

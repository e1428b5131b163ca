"""The ranker retrain flow (deployment semid-ranker-retrain, on demand, on the `gpu` work pool): the train_ranker
stage alone, where a GPU is (ranker.device "auto" trains on CUDA with bf16 autocast when one is visible).

The stage is the daily flow's last one: it trains a challenger only when one is due (ranker.retrain_every_days, a
new codebook, nothing serving yet) and switches models/serving.json only when the challenger wins.

Run it locally:  python -m flows.ranker_retrain
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow

from components.storage import Layout
from flows import publishing, records, workspace
from flows.stages import REPO, run_stage


@flow(name="semid-ranker-retrain", log_prints=True)
def ranker_retrain(repo: str = str(REPO)) -> dict:
    """Run the train_ranker stage; returns what serves afterwards."""
    root = Path(repo)
    with (workspace.held(root, "semid-ranker-retrain"),
          records.recorded(root, "semid-ranker-retrain", ["train_ranker"]) as seconds):
        seconds["train_ranker"] = run_stage("train_ranker", root)
        seconds["publish"] = publishing.publish(root)
        seconds["push"] = publishing.push(root, "semid-ranker-retrain: dvc.lock, metrics")
    return json.loads(Layout(root).serving.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="the repository (dvc.yaml) to run in")
    args = parser.parse_args()
    print(json.dumps(ranker_retrain(repo=args.repo)))


if __name__ == "__main__":
    main()

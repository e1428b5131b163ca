"""The semid loop as a Prefect flow: one task per DVC stage, run in dvc.yaml order.

Each task runs `dvc repro --single-item <stage>`, so DVC still decides what is up to date (an unchanged
stage is a no-op) and every output stays versioned; Prefect adds scheduling, retries, logs and artifacts.
A failing stage fails its task and the flow; later stages do not run.

Run locally on the ephemeral API:  python -m flows.pipeline [--stage validate ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.monitoring.page import markdown as drift_markdown

REPO = Path(__file__).resolve().parent.parent
DRIFT_SUMMARY, DRIFT_PAGE = "reports/drift/summary.json", "reports/drift/summary.html"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the tail of its output."""


def pipeline_stages(repo: Path) -> dict[str, dict]:
    """dvc.yaml's stages by name, in the order it lists them (the pipeline's order)."""
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def metrics_files(stage: dict) -> list[str]:
    """The metrics paths a stage declares (entries are plain paths or {path: options})."""
    return [m if isinstance(m, str) else next(iter(m)) for m in stage.get("metrics", [])]


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(stage: str, repo: Path) -> str:
    """Reproduce one stage; its output goes to the task log, its declared metrics to an artifact."""
    logger = get_run_logger()
    # The stage commands (`semid ...`) live beside this interpreter, activated venv or not.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=repo,
                          capture_output=True, text=True, env=env)
    output = (proc.stdout + proc.stderr).strip()
    for line in output.splitlines():
        logger.info(line)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-10:])
        raise StageFailed(f"stage {stage!r} failed (exit {proc.returncode}):\n{tail}")
    for path in metrics_files(pipeline_stages(repo)[stage]):
        create_markdown_artifact(key=f"{stage}-metrics".replace("_", "-"),
                                 markdown=f"# {path}\n```json\n{(repo / path).read_text()}\n```",
                                 description=f"{path} after the run")
    if stage == "drift":  # the on-call verdict, where the Prefect UI shows it
        summary = json.loads((repo / DRIFT_SUMMARY).read_text())
        create_markdown_artifact(key="drift-verdict", markdown=drift_markdown(summary),
                                 description=f"verdict {summary['verdict']}: {DRIFT_SUMMARY}, page {DRIFT_PAGE}")
    return output


@flow(name="semid-pipeline", log_prints=True)
def semid_pipeline(repo: str = str(REPO), stages: list[str] | None = None) -> list[str]:
    """Run the DVC stages in order (all of dvc.yaml unless `stages` names some); stop at the first failure."""
    root = Path(repo)
    ran = []
    for stage in stages or pipeline_stages(root):
        run_stage(stage, root)
        ran.append(stage)
    return ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="the repository (dvc.yaml) to run in")
    parser.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    args = parser.parse_args()
    print(json.dumps(semid_pipeline(repo=args.repo, stages=args.stage)))


if __name__ == "__main__":
    main()

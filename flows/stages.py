"""Prefect tasks that run the DVC stages: each is `dvc repro --single-item <stage>`, so DVC decides what is up to
date and every output stays versioned, and Prefect adds retries, timeouts, logs and an artifact of the figures.

Retries are for faults that pass: another DVC process holding the workspace lock (DVC has no wait option, so the
task waits its turn with backoff, then gives up with WorkspaceBusy naming the lock) or the process being killed.
A stage that fails on its own (a validation gate, bad params) fails at once: retrying would fail again. DVC writes
its lock table (.dvc/tmp/rwlock) in place, so a process killed during that write leaves it unreadable and every
later `dvc repro` refuses to start: `recover_rwlock` clears such a table before each stage.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event

from components.monitoring.page import markdown as drift_markdown

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DRIFT_SUMMARY, DRIFT_PAGE = "reports/drift/summary.json", "reports/drift/summary.html"
LOCK_MESSAGE = "Unable to acquire lock"  # what dvc prints when another dvc process holds the workspace
STAGE_TIMEOUT_S = 3600  # the longest a stage may run: a hung run frees the workspace for the next
RETRY_DELAYS_S = [15, 60, 240]  # backoff while another run holds the DVC lock
FORCE_ENV = "SEMID_FORCE_REFRESH"  # read by `semid train_rqvae` as its --force


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero on its own; the message carries the tail of its output."""


class WorkspaceBusy(RuntimeError):
    """Another DVC process holds this workspace's lock (.dvc/tmp/rwlock): one run per workspace."""


class StageKilled(RuntimeError):
    """The stage's process was killed by a signal (out of memory, a node going away): worth another try."""


def retry_on(*faults: type[BaseException]):
    """A Prefect retry_condition_fn that retries only `faults`, the faults that pass: not a bug or bad input,
    which would fail again."""
    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except faults:
            return True
        except Exception:
            return False
        return False
    return condition


transient = retry_on(WorkspaceBusy, StageKilled)


def pipeline_stages(repo: Path) -> dict[str, dict]:
    """dvc.yaml's stages by name, in the order it lists them (the pipeline's order)."""
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def metrics_files(stage: dict) -> list[str]:
    """The metrics paths a stage declares (entries are plain paths or {path: options})."""
    return [m if isinstance(m, str) else next(iter(m)) for m in stage.get("metrics", [])]


def stage_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The stage commands (`semid ...`) live beside this interpreter, activated venv or not."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(extra or {})}


def recover_rwlock(repo: Path) -> bool:
    """Remove DVC's lock table if a killed writer left it unreadable; whether it did. DVC edits the table only
    while holding its guard (.dvc/tmp/rwlock.lock, an OS lock the kernel frees when its holder dies), so under
    that guard an unreadable table cannot be a write in progress; an empty table is what DVC starts from."""
    from dvc.lock import LockError, make_lock
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK

    tmp = repo / ".dvc" / "tmp"
    if not (tmp / RWLOCK_FILE).exists():
        return False
    try:
        with make_lock(str(tmp / RWLOCK_LOCK), tmp_dir=str(tmp)):
            try:
                json.loads((tmp / RWLOCK_FILE).read_text(encoding="utf-8"))
                return False
            except FileNotFoundError:
                return False
            except (json.JSONDecodeError, UnicodeDecodeError):
                (tmp / RWLOCK_FILE).unlink()
                return True
    except LockError:  # a live DVC process is editing the table: it is not a dead writer's
        return False


def repro(stage: str, repo: Path, force: bool = False, env: dict[str, str] | None = None) -> str:
    """Run one stage through DVC (after clearing a lock table a killed run left unreadable); its output, or the
    matching error."""
    if recover_rwlock(repo):
        log.warning("cleared %s/.dvc/tmp/rwlock: a killed DVC process left it unreadable", repo)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=stage_env(env),
                              timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"stage {stage!r} ran past {STAGE_TIMEOUT_S} s and was stopped") from None
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return output
    tail = "\n".join(output.splitlines()[-10:])
    if LOCK_MESSAGE in output:
        raise WorkspaceBusy(f"stage {stage!r}: another DVC run holds the workspace lock of {repo} "
                            f"(.dvc/tmp/rwlock); this run waits its turn and gives up after "
                            f"{len(RETRY_DELAYS_S)} retries:\n{tail}")
    if proc.returncode < 0:
        raise StageKilled(f"stage {stage!r} was killed by signal {-proc.returncode}:\n{tail}")
    raise StageFailed(f"stage {stage!r} failed (exit {proc.returncode}):\n{tail}")


def announce_verdict(summary: dict, repo: Path) -> None:
    """Emit the event semid.drift.verdict that the drift-alert automation (infra/prefect/automations.yaml) matches;
    triggers match resource labels, not payloads, so the verdict is a label."""
    emit_event(event="semid.drift.verdict",
               resource={"prefect.resource.id": "semid.drift", "semid.drift.verdict": summary["verdict"]},
               payload={"verdict": summary["verdict"], "as_of": summary["as_of"],
                        "codebook_version": summary["codebook_version"],
                        "alerts": sorted(name for name, check in summary["checks"].items()
                                         if check["status"] == "ALERT"),
                        "page": str(repo / DRIFT_PAGE)})


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NONE, retries=len(RETRY_DELAYS_S),
      retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient, timeout_seconds=STAGE_TIMEOUT_S + 60)
def run_stage(stage: str, repo: Path, force: bool = False, env: dict[str, str] | None = None) -> float:
    """Reproduce one stage; its output goes to the task log, its declared metrics to an artifact. Returns the
    stage's wall seconds."""
    logger = get_run_logger()
    started = time.perf_counter()
    output = repro(stage, repo, force, env)
    for line in output.splitlines():
        logger.info(line)
    for path in metrics_files(pipeline_stages(repo)[stage]):
        create_markdown_artifact(key=f"{stage}-metrics".replace("_", "-"),
                                 markdown=f"# {path}\n```json\n{(repo / path).read_text()}\n```",
                                 description=f"{path} after the run")
    if stage == "drift":  # the on-call verdict, where the Prefect UI shows it
        summary = json.loads((repo / DRIFT_SUMMARY).read_text())
        create_markdown_artifact(key="drift-verdict", markdown=drift_markdown(summary),
                                 description=f"verdict {summary['verdict']}: {DRIFT_SUMMARY}, page {DRIFT_PAGE}")
        announce_verdict(summary, repo)
    return time.perf_counter() - started

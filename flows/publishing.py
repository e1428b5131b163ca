"""The last two tasks of every flow run, after its stages succeeded: publish to storage.root what serves and the
reports, then version the run: `dvc push` to the default DVC remote and a git commit of dvc.lock and metrics/,
pushed to the git remote SEMID_GIT_PUSH names (e.g. origin; unset, the commit stays in the workspace: a clone
someone runs by hand never pushes). A fresh worker then runs `git clone` (or `git pull`), `dvc pull` and
`dvc repro`, and finds every stage up to date.

Both retry transient S3 faults (Prefect retries above botocore's); without a default DVC remote the run is
versioned locally only, and the task says so.

What is published, for readers outside the workspace (online serving, the on-call page):

    <root>/semids/...                            the serving codebook's store and checkpoint, with their manifest
                                                 and CURRENT (components/semid/publish.py)
    <root>/ranker/<sha256[:16]>/<champion>.pt    the champion, content-addressed
    <root>/reports/<as_of>/drift/summary.html    the on-call page, summary.json and Evidently's report.html;
    <root>/reports/<as_of>/validation/report.md  the validation gate's report
    <root>/serving.json                          the serving pointer, written last in one PUT, after every file it
                                                 names was uploaded and verified

With the default root, the workspace's own data/, the workspace's files are the published ones: nothing is copied.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from components import serving
from components.data.lake import raw_days
from components.params import load_params
from components.semid.publish import publish_in
from components.storage import (MAX_ATTEMPTS, RETRY_MODE, Lake, Layout, LocalLake, StorageError, s3_checksum,
                                sha256_of)
from flows.stages import RETRY_DELAYS_S, retry_on, stage_env

log = logging.getLogger(__name__)
REPORTS = ("drift/summary.html", "drift/summary.json", "drift/report.html", "validation/report.md")
POINTER = "serving.json"
VERSIONED = ("dvc.lock", "metrics")  # what git holds of a run; the DVC cache holds the rest
GIT_PUSH_ENV = "SEMID_GIT_PUSH"  # the git remote each run's commit is pushed to; unset: none


def publishing_lake(root: str, layout: Layout) -> Lake | None:
    """The lake storage.root names, or None when it is the workspace itself."""
    lake = Lake.at(root, layout.root)
    if isinstance(lake, LocalLake) and lake.root.resolve() == (layout.root / "data").resolve():
        return None
    return lake


def publish_run(layout: Layout, root: str, as_of: dt.date) -> dict | None:
    """Publish the reports of `as_of` and what serves now; returns the serving pointer written (None when the
    root is the workspace, or nothing serves yet and only reports went out)."""
    lake = publishing_lake(root, layout)
    if lake is None:
        log.info("storage.root %s is the workspace: its files are the published ones", root)
        return None
    for name in REPORTS:
        if (layout.reports / name).exists():
            lake.put_file(layout.reports / name, f"reports/{as_of.isoformat()}/{name}")
    live = serving.read(layout)
    if live is None:
        return None
    pointer = {**dataclasses.asdict(live), "published": as_of.isoformat()}
    try:
        if live.codebook_version is not None:
            semids = publish_in(lake.child("semids"), layout.root / live.store, layout.root / live.codebook,
                                live.codebook_version)
            pointer["semids_manifest"] = f"semids/{semids['manifest']}"
        ranker = layout.root / live.ranker
        pointer["ranker_key"] = f"ranker/{sha256_of(ranker)[:16]}/{ranker.name}"
        pointer["ranker_checksum"] = s3_checksum(ranker)
        lake.put_file(ranker, pointer["ranker_key"])
        lake.put_json(pointer, POINTER)
    except StorageError as exc:
        raise StorageError(f"publishing the serving triple of {live.as_of} to {lake.url}: {exc}; "
                           f"{POINTER} left unchanged") from None
    log.info("published serving (codebook %s, champion %s) and the reports of %s to %s", live.codebook_version,
             live.champion, as_of, lake.url)
    return pointer


class PushFailed(RuntimeError):
    """`dvc push` or `git push` failed: the message carries the command and the tail of its output."""


storage_fault = retry_on(StorageError, PushFailed)  # a remote store's faults pass


@task(name="publish", cache_policy=NONE, retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=storage_fault)
def publish(repo: Path) -> float:
    """Publish the serving triple and the reports of the run's day to storage.root."""
    started = time.perf_counter()
    layout = Layout(repo)
    as_of = raw_days(layout)[-1] + dt.timedelta(days=1)  # the loop's day: the day after the last events day
    publish_run(layout, load_params(repo / "params.yaml").storage.root, as_of)
    return time.perf_counter() - started


def command(cmd: list[str], repo: Path) -> subprocess.CompletedProcess:
    """Run `cmd` in the workspace; DVC's S3 client retries like ours unless AWS_RETRY_MODE/AWS_MAX_ATTEMPTS say."""
    retries = {"AWS_RETRY_MODE": RETRY_MODE, "AWS_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    env = stage_env({k: os.environ.get(k, v) for k, v in retries.items()})
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise PushFailed(f"`{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}` in {repo} exited "
                         f"{proc.returncode}:\n{tail}")
    return proc


def default_remote(repo: Path) -> str | None:
    proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=repo, capture_output=True,
                          text=True, env=stage_env(None))
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


@task(name="push", cache_policy=NONE, retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=storage_fault)
def push(repo: Path, message: str) -> float:
    """`dvc push` to the default remote, then commit dvc.lock and metrics/ (and push the commit to the git remote
    SEMID_GIT_PUSH names)."""
    logger, started = get_run_logger(), time.perf_counter()
    remote = default_remote(repo)
    if remote is None:
        logger.info("no default DVC remote (`semid remote` sets one): the run is versioned in this workspace only")
        return time.perf_counter() - started
    logger.info(command([sys.executable, "-m", "dvc", "push", "--remote", remote], repo).stdout.strip())
    command(["git", "add", "--", *VERSIONED], repo)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode != 0:
        command(["git", "-c", "user.name=semid", "-c", "user.email=semid@localhost", "commit", "-q", "-m",
                 message, "--", *VERSIONED], repo)
        logger.info("committed %s: %s", ", ".join(VERSIONED), message)
    if target := os.environ.get(GIT_PUSH_ENV):
        command(["git", "push", "-q", target, "HEAD"], repo)
        logger.info("pushed the commit to %s", target)
    else:
        logger.info("%s is not set: the commit stays in this workspace", GIT_PUSH_ENV)
    return time.perf_counter() - started

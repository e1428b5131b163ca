"""A worker killed with SIGKILL in the middle of a stage (dvc and the stage command together, as when a node
dies) or of a publish to S3: no partial file is visible under a final name, nothing partial is readable from the
bucket, and running again gives exactly the artifacts of an uninterrupted run. The moment of the kill is drawn
at random within the command's run time."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from conftest import new_bucket
from flows.stages import repro
from test_pipeline import BIN, SMALL_WORLD, STAGES, pipeline_repo, run

pytestmark = pytest.mark.integration
KILLED = ["embed", "train_rqvae", "backfill", "drift", "train_ranker"]
ARTIFACT_DIRS = ("data", "models", "metrics", "reports")
# Outputs that hold the run's own timings or Evidently's page ids: complete after any run, never equal.
NOISY = ("reports/drift/report.html", "reports/ranker/record.json")
TEMPORARY = ".tmp"  # components/storage.py writes to .<name>.<random>.tmp<suffix> and renames


def artifacts(root: Path) -> dict[str, str]:
    """sha256 of every file the pipeline wrote, by path relative to the workspace."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ARTIFACT_DIRS for p in sorted((root / d).rglob("*")) if p.is_file()}


def is_temporary(path: str) -> bool:
    return any(part.startswith(".") and TEMPORARY in part for part in Path(path).parts)


def complete(root: Path, path: str) -> bool:
    text = (root / path).read_text()
    return text.rstrip().endswith("</html>") if path.endswith(".html") else bool(json.loads(text))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, str], dict[str, float], Path]:
    """An uninterrupted run: its artifacts, each stage's seconds, and a copy of the workspace before each stage."""
    root = pipeline_repo(tmp_path_factory.mktemp("reference"), SMALL_WORLD)
    snapshots = tmp_path_factory.mktemp("before")
    seconds = {}
    for stage in STAGES:
        shutil.copytree(root, snapshots / stage, symlinks=True)
        started = time.perf_counter()
        run(["dvc", "repro", "--single-item", stage], root)
        seconds[stage] = time.perf_counter() - started
    return artifacts(root), seconds, snapshots


@pytest.mark.parametrize("stage", KILLED)
def test_sigkill_mid_stage_leaves_no_partial_file_and_a_rerun_gives_the_same_artifacts(tmp_path, reference, stage):
    expected, seconds, snapshots = reference
    root = tmp_path / "workspace"
    shutil.copytree(snapshots / stage, root, symlinks=True)  # the same commit and upstream outputs
    before = artifacts(root)
    delay = random.Random(stage).uniform(0.3, 0.95) * seconds[stage]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    worker = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=root, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()

    for path, digest in artifacts(root).items():
        if is_temporary(path):
            continue
        if path in NOISY:
            assert complete(root, path), f"{path} is partial after the kill at {delay:.2f} s"
        else:
            assert digest in (before.get(path), expected.get(path)), \
                f"{path} is neither its old nor its final content after the kill at {delay:.2f} s"

    for again in STAGES:  # what the flow's retry does: its stage task, each stage in order
        repro(again, root)
    after = artifacts(root)
    assert [p for p in after if is_temporary(p)] == [], "temporaries of the killed run are left behind"
    differ = sorted(p for p in set(after) | set(expected) if p not in NOISY and after.get(p) != expected.get(p))
    assert differ == [], f"killed at {delay:.2f} s of {seconds[stage]:.2f} s, the re-run differs in {differ}"


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def endpoint(s3_endpoint) -> str:
    return s3_endpoint


def test_sigkill_mid_publish_leaves_current_readable_and_a_rerun_stores_the_same_objects(tmp_path, reference,
                                                                                          endpoint):
    _, _, snapshots = reference
    root = tmp_path / "workspace"
    shutil.copytree(snapshots / "drift", root, symlinks=True)  # the store and its codebook are written
    uninterrupted, killed = new_bucket(endpoint, "uninterrupted"), new_bucket(endpoint, "killed")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def publish(bucket: str) -> list[str]:
        return ["semid", "backfill", "--publish", f"s3://{bucket}/semids", "--endpoint-url", endpoint]

    started = time.perf_counter()
    subprocess.run(publish(uninterrupted), cwd=root, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    delay = random.Random("publish").uniform(0.3, 0.95) * seconds
    worker = subprocess.Popen(publish(killed), cwd=root, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()

    stored = bucket_objects(endpoint, killed)
    if "semids/CURRENT" in stored:  # whatever CURRENT names is whole: its manifest and every part
        manifest = json.loads(stored["semids/" + json.loads(stored["semids/CURRENT"])["manifest"]])
        for part in manifest["parts"]:  # keys relative to the published prefix
            assert hashlib.sha256(stored["semids/" + part["key"]]).hexdigest() == part["sha256"]
    subprocess.run(publish(killed), cwd=root, env=env, check=True, capture_output=True)
    assert bucket_objects(endpoint, killed) == bucket_objects(endpoint, uninterrupted), \
        f"killed at {delay:.2f} s of {seconds:.2f} s"


def test_a_kill_during_dvcs_own_lock_write_does_not_block_the_retry(tmp_path, reference):
    """The one moment a random kill rarely hits: DVC writing its lock table in place. The flow's retry clears the
    unreadable table and reproduces the same artifacts."""
    expected, _, snapshots = reference
    root = tmp_path / "workspace"
    shutil.copytree(snapshots / "train_ranker", root, symlinks=True)
    (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    (root / ".dvc" / "tmp" / "rwlock").write_text('{"write": {"data/valid')
    for stage in STAGES:
        repro(stage, root)
    after = artifacts(root)
    assert sorted(p for p in set(after) | set(expected) if p not in NOISY and after.get(p) != expected.get(p)) == []

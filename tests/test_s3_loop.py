"""Integration: the loop with storage.root on S3 (a local endpoint). The daily flow runs end to end through 503s,
lands the lake, publishes what serves and pushes to the DVC remote on S3; a second fresh clone runs `dvc pull` +
`dvc repro` and finds everything up to date. `dvc push` and `dvc pull` through a proxy answering 503 SlowDown store
and bring back the same bytes. No credential appears in any output, log, Prefect artifact or published object."""
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from conftest import new_bucket
from s3_faults import FaultyProxy
from test_pipeline import BIN, REPO, SMALL_WORLD, pipeline_repo

pytestmark = pytest.mark.integration
# Recognisable fakes (moto accepts any); against S3_TEST_ENDPOINT the environment's real ones are looked for.
FAKE_KEY_ID, FAKE_SECRET = "AKIASEMIDFAKEKEY7Q2Z", "semidFakeSecret/NeverPrint+9f3b2c71d4e8a6"


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def objects(endpoint: str, bucket: str, prefix: str = "") -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix):]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def tracked_outputs(root: Path) -> dict[str, bytes]:
    """Every file under the DVC-tracked directories, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for top in ("data", "models", "reports")
            for p in sorted((root / top).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def loop(tmp_path_factory, s3_endpoint):
    """One daily run of the small world with storage.root on S3, then `dvc push`; what it left behind."""
    tmp = tmp_path_factory.mktemp("s3-loop")
    bucket = new_bucket(s3_endpoint, "loop")
    secrets = ((FAKE_KEY_ID, FAKE_SECRET) if not os.environ.get("S3_TEST_ENDPOINT")
               else (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "AWS_ENDPOINT_URL_S3": s3_endpoint,
           "AWS_ACCESS_KEY_ID": secrets[0], "AWS_SECRET_ACCESS_KEY": secrets[1],
           "PREFECT_HOME": str(tmp / "prefect-home")}
    (tmp / "a").mkdir()
    a = pipeline_repo(tmp / "a", SMALL_WORLD, storage={"root": f"s3://{bucket}/lake"})
    remote = run(["semid", "remote"], a, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "DVC remote from storage.root"], a, env)
    run(["git", "init", "-q", "--bare", str(tmp / "origin.git")], tmp, env)  # the shared repository workers clone
    run(["git", "remote", "add", "origin", str(tmp / "origin.git")], a, env)
    run(["git", "push", "-q", "origin", "HEAD"], a, env)
    with FaultyProxy(s3_endpoint, first=2, every=7) as proxy:  # the whole run's S3 traffic meets 503 SlowDown
        flow = run([sys.executable, "-m", "flows.daily", "--repo", str(a)], REPO,
                   {**env, "AWS_ENDPOINT_URL_S3": proxy.url, "SEMID_GIT_PUSH": "origin"})
    return {"a": a, "bucket": bucket, "env": env, "tmp": tmp, "secrets": secrets, "endpoint": s3_endpoint,
            "faults": proxy.faults, "requests": proxy.requests,
            "logs": remote.stdout + remote.stderr + flow.stdout + flow.stderr, "seconds": json.loads(
                flow.stdout.strip().splitlines()[-1])}


def test_the_daily_flow_lands_publishes_and_pushes_to_s3_through_503s(loop):
    """Every S3 request of the run (landing, validate's reads, publish, dvc push) went through a proxy answering
    503 SlowDown to the first 2 and then every 7th: what is stored is what the workspace holds."""
    a, stored = loop["a"], objects(loop["endpoint"], loop["bucket"], "lake/")
    assert loop["faults"] >= 10 and loop["requests"] > 5 * loop["faults"]
    assert list(loop["seconds"]) == ["land", "validate", "embed", "train_rqvae", "backfill", "drift",
                                     "train_ranker", "publish", "push"]
    assert [p.name for p in (a / "data" / "raw").iterdir()] == ["lake.json"]  # the lake is on S3
    assert sum(k.startswith("raw/events/date=") for k in stored) == SMALL_WORLD["days"]
    live = json.loads((a / "models" / "serving.json").read_text())
    pointer = json.loads(stored["serving.json"])
    assert {k: pointer[k] for k in live} == live
    assert stored[pointer["ranker_key"]] == (a / live["ranker"]).read_bytes()
    semids = json.loads(stored["semids/CURRENT"])
    assert semids["codebook_version"] == live["codebook_version"]
    parts = json.loads(stored["semids/" + semids["manifest"]])["parts"]
    store = next(p for p in parts if p["name"].endswith("parquet"))
    assert stored["semids/" + store["key"]] == (a / live["store"]).read_bytes()
    summary = json.loads((a / "reports" / "drift" / "summary.json").read_text())
    assert stored[f"reports/{summary['as_of'][:10]}/drift/summary.html"] == \
        (a / "reports" / "drift" / "summary.html").read_bytes()
    assert any(k.startswith("dvc/files/md5/") for k in stored)  # the DVC remote: <root>/dvc
    log = subprocess.run(["git", "log", "--format=%s", "-1"], cwd=a, capture_output=True, text=True).stdout
    assert log.startswith("semid-daily") and not subprocess.run(["git", "status", "--porcelain", "dvc.lock"], cwd=a,
                                                                capture_output=True, text=True).stdout


def test_a_fresh_clone_pulls_and_finds_every_stage_up_to_date(loop):
    """A new worker clones the shared repository the run pushed its commit to (SEMID_GIT_PUSH=origin)."""
    b = loop["tmp"] / "b"
    run(["git", "clone", "-q", str(loop["tmp"] / "origin.git"), str(b)], loop["tmp"], loop["env"])
    run(["dvc", "pull"], b, loop["env"])
    repro = run(["dvc", "repro"], b, loop["env"])
    assert "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert tracked_outputs(b) == tracked_outputs(loop["a"])


def test_dvc_push_and_pull_through_503s_store_and_bring_back_the_same_bytes(loop):
    """503 SlowDown to the first 3 requests, then to every 5th, for a push to a second remote and a pull from it
    into a third clone: the remote holds what the fault-free push stored, the clone what the run wrote."""
    a, env, endpoint = loop["a"], loop["env"], loop["endpoint"]
    faulty = new_bucket(endpoint, "faulty-remote")
    run(["dvc", "remote", "add", "--local", "faulty", f"s3://{faulty}/dvc"], a, env)
    c = loop["tmp"] / "c"
    run(["git", "clone", "-q", str(a), str(c)], loop["tmp"], env)
    run(["dvc", "remote", "add", "--local", "faulty", f"s3://{faulty}/dvc"], c, env)
    with FaultyProxy(endpoint, first=3, every=5) as proxy:
        through = {**env, "AWS_ENDPOINT_URL_S3": proxy.url}
        run(["dvc", "push", "--remote", "faulty"], a, through)
        pushed = proxy.faults
        run(["dvc", "pull", "--remote", "faulty"], c, through)
    assert pushed >= 3 and proxy.faults > pushed and proxy.requests > proxy.faults
    assert objects(endpoint, faulty, "dvc/") == objects(endpoint, loop["bucket"], "lake/dvc/")
    assert tracked_outputs(c) == tracked_outputs(a)


def test_no_credential_appears_in_any_output_log_artifact_or_published_object(loop):
    a, secrets = loop["a"], [s.encode() for s in loop["secrets"]]
    places = {"flow and `semid remote` output": loop["logs"].encode()}
    for root in (a, loop["tmp"] / "prefect-home"):  # the workspace (git and DVC config too); Prefect's database
        for p in root.rglob("*"):                   # holds the runs' logs and artifacts
            if p.is_file() and ".dvc/cache" not in p.as_posix():
                places[str(p)] = p.read_bytes()
    places.update({f"s3://{loop['bucket']}/{k}": v for k, v in objects(loop["endpoint"], loop["bucket"]).items()})
    assert len(places) > 100 and any("prefect.db" in name for name in places)
    leaked = [name for name, body in places.items() if any(s in body for s in secrets)]
    assert not leaked, f"credentials found in {leaked}"
    assert "endpointurl" not in (a / ".dvc" / "config").read_text()  # the endpoint comes from the environment

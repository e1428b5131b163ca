"""Integration: a real `dvc repro` and a real Prefect flow run over a copy of this repo on a small world."""
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.paper.experiments import run_experiments

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALL_WORLD = {"days": 10, "active_items": 200, "impressions_per_day": 3000, "users": 500}
FAST_EMBED = {"encoder": "hashing-test"}
FAST_RQVAE = {"codebook_size": 16, "latent_dim": 8, "hidden_dims": [32], "steps": 150, "warmup_steps": 50,
              "batch_size": 256, "restart_every": 25, "max_collision_rate": 0.3}
FAST_RANKER = {"train_days": 6, "eval_hours": 48}
STAGES = ["generate", "validate", "embed", "train_rqvae", "backfill", "drift", "train_ranker"]


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def pipeline_repo(root: Path, world: dict, **overrides: dict) -> Path:
    """This repo's pipeline files in a fresh git repo at `root`, params.yaml shrunk to fast models and the
    `world` given; `overrides` update further params sections."""
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "tmp*"))
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"].update(world)
    params["embed"].update(FAST_EMBED)
    params["rqvae"].update(FAST_RQVAE)
    params["ranker"].update(FAST_RANKER)
    params["ranker"]["history"]["length"] = 8
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


@pytest.fixture
def repo(tmp_path) -> Path:
    """This repo's pipeline on a small world, in a fresh git repo."""
    return pipeline_repo(tmp_path, SMALL_WORLD)


def test_dvc_repro_caches_and_reports_metrics(repo):
    first = run(["dvc", "repro"], repo)
    assert [line.split("'")[1] for line in first.stdout.splitlines() if line.startswith("Running stage")] == STAGES
    metrics = json.loads((repo / "metrics" / "validation.json").read_text())
    assert metrics["success"] == 1
    assert (repo / "data" / "validated" / "items.parquet").exists()
    again = run(["dvc", "repro"], repo)
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    (workspace,) = shown.values()
    figures = {path: entry["data"] for path, entry in workspace["data"].items()}
    assert figures["metrics/validation.json"]["success"] == 1
    assert figures["metrics/validation.json"]["events"]["rows"] > 10_000
    record = {stage: json.loads((repo / "reports" / stage / "record.json").read_text())
              for stage in ("embed", "rqvae", "backfill", "ranker")}  # versions and provenance live beside
    version = record["rqvae"]["codebook_version"]
    assert record["backfill"]["codebook_version"] == version
    assert figures["metrics/backfill.json"]["items"] == figures["metrics/embed.json"]["items"]
    ranker = figures["metrics/ranker.json"]
    assert record["ranker"]["codebook_version"] == version and ranker["promotion"]["promoted"] == 1
    assert set(ranker["ne"]) == {"all", "head", "torso", "tail", "seen", "unseen", "new"}
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    assert "reports/rqvae/utilization.csv" in plots and "reports/rqvae/cluster_sizes.csv" in plots
    assert "reports/ranker/ne_by_segment.csv" in plots
    drift = figures["metrics/drift.json"]
    assert drift["verdict"] in (0, 1, 2) and set(drift["status"]) >= {"semid_prefix_shift", "raw_id_churn"}
    assert "reports/drift/history.csv" in plots
    summary = json.loads((repo / "reports" / "drift" / "summary.json").read_text())
    assert summary["codebook_version"] == version and (repo / "reports" / "drift" / "summary.html").exists()


def test_dvc_exp_run_sets_params(repo):
    run(["dvc", "exp", "run", "-S", "world.seed=11", "-n", "seed11"], repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["world"]["seed"] == 11
    world = json.loads((repo / "data" / "world" / "world.json").read_text())
    assert world["params"]["seed"] == 11
    table = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "seed11" in table
    # A ranker setting changes only the ranker: `dvc exp show` tabulates NE by segment per experiment.
    rh = run(["dvc", "exp", "run", "-S", "ranker.item_ids=rh", "-S", "ranker.history.item_ids=rh", "-n", "rh"], repo)
    assert "Running stage 'train_ranker'" in rh.stdout and "Running stage 'embed'" not in rh.stdout
    assert json.loads((repo / "reports" / "ranker" / "record.json").read_text())["config"]["item_ids"] == "rh"
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    header = shown.splitlines()[0].split(",")
    assert {f"ne.{s}" for s in ("all", "head", "torso", "tail", "seen", "new")} <= set(header)
    assert any(line.startswith("rh,") for line in shown.splitlines())


def test_dvc_repro_on_the_ray_engine_gives_the_local_results(repo, tmp_path):
    """engine.kind: ray from a fresh repo: validate, embed, backfill and train_ranker on a local Ray (2 workers,
    sharded tables); the same validation outcome, vectors and SemIDs, NE within float noise."""
    (tmp_path / "ray").mkdir()
    ray_repo = pipeline_repo(tmp_path / "ray", SMALL_WORLD, engine={"kind": "ray", "workers": 2, "shard_rows": 200},
                             validation={"chunk_rows": 10_000})  # 3 day batches, 3 item shards
    run(["dvc", "repro"], repo)
    done = run(["dvc", "repro"], ray_repo)
    assert [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")] == STAGES

    import polars as pl

    from components import shards

    def table(root: Path, path: str) -> pl.DataFrame:
        return pl.read_parquet(shards.files(root / path))

    assert (ray_repo / "data" / "embeddings" / "items.parquet").is_dir()
    version = json.loads((repo / "reports" / "rqvae" / "record.json").read_text())["codebook_version"]
    store = f"data/semids/{version}.parquet"
    assert (ray_repo / store).is_dir() and len(shards.files(ray_repo / store)) == 3
    assert table(ray_repo, store).equals(table(repo, store))
    assert table(ray_repo, "data/embeddings/items.parquet").equals(table(repo, "data/embeddings/items.parquet"))
    for name in ("validation", "embed", "rqvae", "backfill"):
        assert (ray_repo / "metrics" / f"{name}.json").read_text() == (repo / "metrics" / f"{name}.json").read_text()
    ne = [json.loads((root / "metrics" / "ranker.json").read_text())["ne"]["all"] for root in (repo, ray_repo)]
    print(f"NE all: local {ne[0]}, ray {ne[1]}")
    record = json.loads((ray_repo / "reports" / "ranker" / "record.json").read_text())
    assert record["throughput"]["device"] == "ray: 2 cpu worker(s)"
    assert abs(ne[1] - ne[0]) < 0.005
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], ray_repo).stdout


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


def test_dvc_the_way_its_users_expect(repo):
    """Numbers-only metrics in git: `dvc exp run --temp` and the queue bring them back, the paper report's runner
    runs settings on the queue and leaves params.yaml alone; every stage depends on the shared storage module."""
    run(["dvc", "repro"], repo)
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    (workspace,) = shown.values()

    def leaves(d):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]
    values = [v for entry in workspace["data"].values() for v in leaves(entry["data"])]
    assert values and all(isinstance(v, (int, float)) for v in values)  # no config, window or provenance strings
    commit(repo, "the pipeline's outputs")  # metrics/ and dvc.lock: a baseline for experiments

    run(["dvc", "exp", "run", "--temp", "-S", "ranker.item_ids=rh", "-S", "ranker.history.item_ids=rh",
         "-n", "temp-rh"], repo)
    exps = {rev["name"]: rev["data"] for baseline in json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
            for exp in baseline.get("experiments") or [] for rev in exp["revs"]}
    assert exps["temp-rh"]["metrics"]["metrics/ranker.json"]["data"]["ne"]["all"] > 0

    params = (repo / "params.yaml").read_text()
    settings = {"semid": {}, "rh": {"ranker.item_ids": "rh", "ranker.history.item_ids": "rh"}}
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    in_repo = functools.partial(subprocess.run, cwd=repo, env=env)
    results = run_experiments(settings, ["semid", "rh"], [0], jobs=2, runner=in_repo, poll_seconds=2)
    assert [(r["experiment"], r["seed"]) for r in results] == [("semid", 0), ("rh", 0)]
    assert all(r["ne"]["all"] > 0 and r["predictions"] for r in results)
    assert results[0]["ne"] != results[1]["ne"]  # each ran with its own overrides
    assert (repo / "params.yaml").read_text() == params  # queued runs happen in temporary copies

    with (repo / "components" / "storage.py").open("a") as f:
        f.write("\n# touched\n")
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    assert set(status) == set(STAGES)


def test_daily_flow_runs_stages_in_order_and_fails_on_a_failing_stage(repo):
    proc = run([sys.executable, "-m", "flows.daily", "--repo", str(repo)], REPO)
    assert list(json.loads(proc.stdout.strip().splitlines()[-1])) == ["land", *STAGES[1:], "publish", "push"]
    assert json.loads((repo / "metrics" / "validation.json").read_text())["success"] == 1
    verdict = json.loads((repo / "reports" / "drift" / "summary.json").read_text())["verdict"]
    artifact = run([sys.executable, "-m", "prefect", "artifact", "inspect", "drift-verdict"], REPO).stdout
    assert f"Drift verdict: {verdict}" in artifact and "semid_prefix_shift" in artifact
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["validation"]["window_start"] = "2030-01-01"  # a window with no events: the gate must fail
    params["validation"]["window_end"] = "2030-02-01"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = run([sys.executable, "-m", "flows.daily", "--repo", str(repo)], REPO, check=False)
    assert failed.returncode != 0
    assert "stage 'validate' failed" in failed.stdout + failed.stderr


def test_switching_data_source_runs_the_pipeline_on_movielens(repo):
    sample = REPO.parent / "shared" / "data" / "movielens-latest-small"
    if not sample.is_dir():
        pytest.skip(f"{sample} not present")
    # 9,742 movies cannot get distinct SemIDs from the fast test codebooks (K=16): only the path is tested here.
    run(["dvc", "exp", "run", "-S", "data.source=movielens", "-S", f"data.movielens_dir={sample}",
         "-S", "rqvae.max_collision_rate=1.0", "-S", "ranker.train_days=730", "-S", "ranker.eval_hours=720"], repo)
    metrics = json.loads((repo / "reports" / "validation" / "record.json").read_text())
    assert metrics["success"] is True
    assert metrics["items"]["rows"] == 9_742 and metrics["events"]["rows"] == 100_836
    assert metrics["window"] == {"start": "1996-03-29", "end": "2018-09-25"}
    backfill = json.loads((repo / "metrics" / "backfill.json").read_text())
    assert backfill["items"] == 9_742
    ranker = json.loads((repo / "metrics" / "ranker.json").read_text())  # ratings >= 4 as clicks, no f_* features
    assert ranker["examples"]["eval"] > 500 and ranker["ne"]["all"] is not None
    drift = json.loads((repo / "reports" / "drift" / "summary.json").read_text())  # the drift stage, no edits
    assert drift["as_of"] == "2018-09-25" and drift["checks"]["feature_drift"]["note"].startswith("the data has no")


def test_a_run_while_another_holds_the_workspace_waits_its_turn_or_is_refused_by_name(repo):
    """DVC allows one run per workspace: the task names the lock and retries with backoff; nothing is touched."""
    import threading

    from dvc.repo import Repo
    from prefect import flow

    from flows.stages import WorkspaceBusy, repro, run_stage

    run(["dvc", "repro", "--single-item", "generate"], repo)
    run(["dvc", "repro", "--single-item", "validate"], repo)
    outputs = sorted(p for p in (repo / "data" / "validated").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in [*outputs, repo / "metrics" / "validation.json", repo / "dvc.lock"]}
    workspace = Repo(str(repo))
    with workspace.lock:
        with pytest.raises(WorkspaceBusy, match=r"another DVC run holds the workspace lock .*waits its turn"):
            repro("validate", repo, force=True)
    assert {p: p.read_bytes() for p in before} == before  # refused: nothing written

    acquired = threading.Event()

    def hold_for_a_while():
        with workspace.lock:
            acquired.set()
            time.sleep(5)  # the first attempt finds the workspace busy; its retry, 15 s later, does not

    @flow
    def validate_again() -> float:
        holder = threading.Thread(target=hold_for_a_while)
        holder.start()
        acquired.wait()
        try:
            return run_stage("validate", repo, force=True)
        finally:
            holder.join()

    assert validate_again() > 0
    assert json.loads((repo / "metrics" / "validation.json").read_text())["success"] == 1


def test_two_daily_runs_on_one_workspace_take_turns(repo, tmp_path):
    """Two workers start the daily flow on one workspace a moment apart: the second waits for the first's
    workspace lock (flows/workspace.py), then finds everything up to date; nothing is corrupted."""
    def worker(name: str) -> subprocess.Popen:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
               "PREFECT_HOME": str(tmp_path / name), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        return subprocess.Popen([sys.executable, "-m", "flows.daily", "--repo", str(repo)], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = worker("first")
    lock = repo / ".dvc" / "tmp" / "semid-loop.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the first holds the workspace
    second = worker("second")
    out_first, out_second = first.communicate(timeout=900)[0], second.communicate(timeout=900)[0]
    assert first.returncode == 0, out_first
    assert second.returncode == 0 and "semid-daily waits its turn" in out_second, out_second
    records = sorted((json.loads(p.read_text()) for p in (repo / "runs").glob("*.json")), key=lambda r: r["started"])
    assert [r["status"] for r in records] == ["Completed", "Completed"]
    assert records[1]["started"] >= records[0]["finished"]  # one after the other, never interleaved
    assert records[1]["dvc_lock"] == records[0]["dvc_lock"]  # the second found everything up to date
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout


def test_codebook_refresh_flow_forces_a_refresh_and_records_a_reproducible_run(repo):
    """On an unchanged window a forced refresh retrains the same codebook bit for bit: nothing switches."""
    # The copy's code runs (its commit is what the record names), as an editable install there would.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
    serving = (repo / "models" / "serving.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "flows.codebook_refresh", "--repo", str(repo)], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(serving)
    rqvae = json.loads((repo / "reports" / "rqvae" / "record.json").read_text())
    assert rqvae["refresh_reason"] == "forced (--force)" and rqvae["replaced"] is None
    assert (repo / "models" / "serving.json").read_bytes() == serving
    semid = [sys.executable, "-m", "components.cli", "runs"]
    listed = subprocess.run([*semid, "list"], cwd=repo, capture_output=True, text=True, env=env, check=True).stdout
    run_id = listed.split()[0]
    assert run_id.startswith("codebook-refresh-") and " Completed " in listed
    record = json.loads(subprocess.run([*semid, "show", run_id], cwd=repo, capture_output=True, text=True, env=env,
                                       check=True).stdout)
    assert record["stages"] == ["train_rqvae", "backfill", "train_ranker"] and record["force_refresh"] is True
    again = subprocess.run([*semid, "reproduce", run_id], cwd=repo, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["identical"] is True, \
        again.stdout + again.stderr

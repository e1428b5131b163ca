"""Run records: what each flow run used and produced, so that any run can be listed, shown and reproduced later.

    runs/<run_id>.json   run_id, flow, status, as_of, started (UTC), seconds by task, code_version, the params
                         file as it was (and the effective params), what was landed, dvc.lock before and after,
                         and every metrics/<stage>.json

Reproducing (`semid runs reproduce RUN`): a clone at the run's commit sharing this workspace's DVC cache gets the
run's params.yaml and the dvc.lock it started from; `dvc checkout` restores the state before the run (codebooks,
stores, rankers, the serving pointer), the day is landed again from a regenerated stream when the run landed one,
and the same stages run through DVC (the outputs DVC does not cache, metrics and plots, come back from the
record). Then every output's hash in the new dvc.lock is compared with the run's.
Two outputs carry run-to-run noise by design and are listed apart: Evidently's report.html (random element ids)
and the ranker's record.json (its throughput timings).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from prefect.runtime import flow_run

from components import provenance
from components.data.lake import raw_days
from components.data.landing import land
from components.data.world import run_generate
from components.errors import DataError
from components.params import load_params
from components.storage import Layout, write_json
from flows.stages import FORCE_ENV, repro

NOISY_OUTPUTS = ("reports/drift/report.html", "reports/ranker/record.json")


def runs_dir(root: Path) -> Path:
    return Path(root) / "runs"


def read_text(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def uncached_outputs(root: Path) -> list[str]:
    """The outputs dvc.yaml keeps out of the DVC cache (`cache: false`: metrics, plots, the drift history):
    `dvc checkout` cannot restore them, so a record carries their text."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    return sorted(next(iter(entry)) for stage in stages.values() for kind in ("outs", "metrics", "plots")
                  for entry in stage.get(kind, []) if isinstance(entry, dict)
                  and next(iter(entry.values())).get("cache") is False)


def begin(root: Path, flow: str, run_id: str, stages: list[str], landed_as_of: dt.date | None,
          force_refresh: bool) -> dict:
    """The part of a record known before the stages run."""
    root = Path(root)
    params_yaml = (root / "params.yaml").read_text()
    return {"run_id": run_id, "flow": flow, "status": "Running",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "code_version": provenance.code_version(), "params_yaml": params_yaml,
            "stages": stages, "force_refresh": force_refresh,
            "landed": {"as_of": landed_as_of.isoformat()} if landed_as_of else None,
            "dvc_lock_before": read_text(root / "dvc.lock"),
            "uncached_before": {path: read_text(root / path) for path in uncached_outputs(root)}}


@contextlib.contextmanager
def recorded(root: Path, flow: str, stages: list[str], landed_as_of: dt.date | None = None,
             force_refresh: bool = False) -> Iterator[dict[str, float]]:
    """Record the flow run around the block, Completed or Failed; the block fills in the seconds by task."""
    run_id = f"{flow.removeprefix('semid-')}-{landed_as_of or dt.date.today()}-{flow_run.get_id()[:8]}"
    record = begin(root, flow, run_id, stages, landed_as_of, force_refresh)
    seconds: dict[str, float] = {}
    try:
        yield seconds
    except BaseException:
        finish(root, record, "Failed", seconds)
        raise
    finish(root, record, "Completed", seconds)


def finish(root: Path, record: dict, status: str, seconds: dict[str, float]) -> Path:
    """Complete the record with the outcome, the effective params and the metrics, and write runs/<run_id>.json."""
    root = Path(root)
    days = raw_days(Layout(root)) if (root / "data" / "raw").is_dir() else []
    params = dataclasses.asdict(load_params(root / "params.yaml"))
    params["loop"]["as_of"] = params["loop"]["as_of"] or (days[-1] + dt.timedelta(days=1) if days else None)
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((root / "metrics").glob("*.json"))}
    record = {**record, "status": status, "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "as_of": str(params["loop"]["as_of"]),
              "seconds": {k: round(v, 2) for k, v in seconds.items()},
              "params": json.loads(json.dumps(params, default=str)),
              "dvc_lock": read_text(root / "dvc.lock"), "metrics": metrics}
    path = runs_dir(root) / f"{record['run_id']}.json"
    write_json(record, path)
    return path


def list_runs(root: Path) -> list[dict]:
    """Every record, oldest first."""
    records = [json.loads(p.read_text()) for p in runs_dir(root).glob("*.json")]
    return sorted(records, key=lambda r: (r["started"], r["run_id"]))


def load_run(root: Path, run_id: str) -> dict:
    """One record by its id (or a unique prefix of it)."""
    matches = [p for p in runs_dir(root).glob(f"{run_id}*.json")]
    if len(matches) != 1:
        known = ", ".join(r["run_id"] for r in list_runs(root)[-5:]) or "none yet"
        raise DataError(f"{runs_dir(root)}: {len(matches)} run records match {run_id!r}, expected one "
                        f"(latest: {known})")
    return json.loads(matches[0].read_text())


def output_hashes(lock_text: str | None) -> dict[str, str]:
    """path -> md5 of every stage output a dvc.lock records."""
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {}) if lock_text else {}
    return {out["path"]: out.get("md5", "") for stage in stages.values() for out in stage.get("outs", [])}


def git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise DataError(f"git {' '.join(args)} in {cwd} failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout.strip()


def dvc(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise DataError(f"dvc {' '.join(args)} in {cwd} failed: {(proc.stdout + proc.stderr).strip()[-800:]}")


def reproduce(root: Path, run_id: str, workdir: Path | None = None) -> dict:
    """Re-run record `run_id` in a clone and compare every output hash; returns the comparison."""
    root = Path(root).resolve()
    record = load_run(root, run_id)
    commit = record["code_version"].removesuffix("-dirty")
    work = Path(workdir or tempfile.mkdtemp(prefix=f"semid-reproduce-{run_id[:24]}-"))
    if work.exists():
        shutil.rmtree(work)
    git("clone", "--quiet", "--no-checkout", str(root), str(work), cwd=root)
    git("checkout", "--quiet", commit, cwd=work)
    dvc("config", "--local", "cache.dir", str(root / ".dvc" / "cache"), cwd=work)
    (work / "params.yaml").write_text(record["params_yaml"])
    if record["dvc_lock_before"] is not None:
        (work / "dvc.lock").write_text(record["dvc_lock_before"])
        locked = sorted(yaml.safe_load(record["dvc_lock_before"]).get("stages", {}))  # stages that had run
        dvc("checkout", "--relink", *locked, cwd=work)
    for path, text in record["uncached_before"].items():
        (work / path).unlink(missing_ok=True)
        if text is not None:
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).write_text(text)
    layout = Layout(work)
    code = {"PYTHONPATH": str(work)}  # the stages run the clone's code: the run's commit
    if record["landed"]:
        run_generate(load_params(work / "params.yaml").world, layout, into=layout.stream)
        # Into the clone's own data/raw, whatever storage.root says: a reproduction never touches the live lake.
        land(layout.stream, layout, dt.date.fromisoformat(record["landed"]["as_of"]))
    elif "generate" in record["stages"]:
        repro("generate", work, env=code)
    for stage in (s for s in record["stages"] if s != "generate"):
        force = record["force_refresh"] and stage == "train_rqvae"
        repro(stage, work, force=force, env={**code, FORCE_ENV: "1"} if force else code)
    recorded, found = output_hashes(record["dvc_lock"]), output_hashes(read_text(work / "dvc.lock"))
    compared = {path: {"recorded": md5, "reproduced": found.get(path), "same": found.get(path) == md5}
                for path, md5 in sorted(recorded.items())}
    different = [p for p, c in compared.items() if not c["same"] and p not in NOISY_OUTPUTS]
    return {"run_id": record["run_id"], "commit": commit, "dirty": record["code_version"].endswith("-dirty"),
            "workdir": str(work), "outputs": compared, "identical": not different, "different": different}

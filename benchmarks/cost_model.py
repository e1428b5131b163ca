"""What the loop would cost at production size, from the rates `benchmarks/scale.py` measured on this machine.

    python benchmarks/scale.py --keep /tmp/scale20 --set rqvae.max_collision_rate=0.6 | tee /tmp/scale20.log
    python benchmarks/cost_model.py --scale-log /tmp/scale20.log --workspace /tmp/scale20

Each stage's rate is its work (read from the kept workspaces: events validated, texts encoded, items backfilled,
ranker examples) over its measured wall seconds, whole stage included (process start, reads, writes): a
conservative marginal rate. A CPU worker is one core: the Ray engine's rate over its workers. The projection
divides each production workload by rate x workers, i.e. it assumes the efficiency measured at 2 workers holds at
N; the stages that cannot hold it say so in `docs/scale.md`. GPU rates are only the ones measured on a lent GPU
(GPU_RATES, with the commit and settings they were measured at); the others are left blank, not guessed.
Prints a table for people, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components import shards  # noqa: E402

DAYS_RETRAINED = 91  # the 3-month training window
IMPRESSIONS_PER_DAY = 10e9
WORKLOADS = {  # stage: (what, units of work)
    "validate": ("a day of 10B impressions", IMPRESSIONS_PER_DAY),
    "embed": ("100M items, all distinct texts", 100e6),
    "backfill": ("1B items", 1e9),
    "train_ranker": (f"{DAYS_RETRAINED} days x 10B impressions, one pass", DAYS_RETRAINED * IMPRESSIONS_PER_DAY),
}
UNITS = {"validate": "events", "embed": "texts", "backfill": "items", "train_ranker": "examples"}
# Measured on one lent H200 (README, "Benchmarks"): benchmarks/ranker.py --device cuda at f010322, d = 32,
# batch 65,536, before the CPU speed work; examples/s of training alone (its data pipeline made 0.59M/s).
GPU_RATES = {"train_ranker": 1.39e6}
CPU_WORKERS = (16, 256, 4096)
GPUS = (1, 8, 64)


def last_json(log: Path) -> dict:
    """The last line of scale.py's output that is a JSON object."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{log}: no JSON line; expected the output of benchmarks/scale.py")
    return json.loads(lines[-1])


def work_done(root: Path) -> dict[str, int]:
    """Units of work each stage did in a kept workspace. Texts encoded: distinct texts, per shard of the
    workspace's engine.shard_rows on Ray (each shard deduplicates only its own texts)."""
    metrics = lambda name: json.loads((root / "metrics" / f"{name}.json").read_text())  # noqa: E731
    engine = yaml.safe_load((root / "params.yaml").read_text())["engine"]
    shard_rows = engine["shard_rows"] if engine["kind"] == "ray" else None
    items = pl.read_parquet(shards.files(root / "data" / "validated" / "items.parquet"),
                            columns=["item_id", "text"]).sort("item_id")
    if shard_rows is None:
        texts = items["text"].n_unique()
    else:
        texts = (items.with_row_index().group_by(pl.col("index") // shard_rows)
                 .agg(pl.col("text").n_unique())["text"].sum())
    return {"validate": metrics("validation")["events"]["rows"], "embed": texts,
            "backfill": metrics("backfill")["items"], "train_ranker": metrics("ranker")["examples"]["train"]}


def hours(units: float, rate: float | None, workers: int) -> float | None:
    return None if rate is None else units / (rate * workers) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale-log", type=Path, required=True, help="benchmarks/scale.py's output")
    parser.add_argument("--workspace", type=Path, required=True, help="scale.py's --keep directory")
    parser.add_argument("--engine", default="ray", choices=("local", "ray"),
                        help="whose rates to project (ray: per worker; local: per core of one process)")
    args = parser.parse_args()

    run = last_json(args.scale_log)
    cores = run["cpus"]
    work = work_done(args.workspace / args.engine)
    rates = {stage: work[stage] / run["stages"][args.engine][stage]["seconds"] / cores for stage in WORKLOADS}

    table = Table(title=f"projection from world.scale {run['scale']:g} on {cores} cores ({args.engine} engine); "
                        f"hours, assuming the measured per-worker rate holds at N")
    for column in ("stage: workload", "rate / CPU worker", *[f"{n:,} CPU" for n in CPU_WORKERS],
                   "rate / GPU", *[f"{n} GPU" for n in GPUS]):
        table.add_column(column, justify="left" if column.startswith("stage") else "right")
    figures = {}
    for stage, (what, units) in WORKLOADS.items():
        gpu = GPU_RATES.get(stage)
        cpu_h = {n: hours(units, rates[stage], n) for n in CPU_WORKERS}
        gpu_h = {n: hours(units, gpu, n) for n in GPUS}
        figures[stage] = {"units": units, "cpu_rate": round(rates[stage], 1), "gpu_rate": gpu,
                          "cpu_hours": {n: round(h, 2) for n, h in cpu_h.items()},
                          "gpu_hours": {n: None if h is None else round(h, 2) for n, h in gpu_h.items()}}
        fmt = lambda h: "-" if h is None else f"{h:,.2f}" if h < 10 else f"{h:,.0f}"  # noqa: E731
        table.add_row(f"{stage}: {what}", f"{rates[stage]:,.0f} {UNITS[stage]}/s",
                      *[fmt(h) for h in cpu_h.values()], "not measured" if gpu is None else f"{gpu:,.0f} examples/s",
                      *[fmt(h) for h in gpu_h.values()])
    Console(width=160).print(table)
    print(json.dumps({"scale": run["scale"], "engine": args.engine, "cores": cores, "work": work,
                      "projection": figures}))


if __name__ == "__main__":
    main()

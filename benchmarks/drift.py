"""How long does the drift stage take on production-sized traffic, and what would raw IDs in Evidently cost?

    python benchmarks/drift.py [--impressions 10000000] [--items 1000000] [--contrast-rows 1000000]
                               [--contrast-timeout 1800] [--seed 0]

Data, generated into a temp dir (not timed): --items items with 384-d embeddings clustered by 64 topics, their
SemIDs (3 levels of K=256, the level-1 code following the topic) under a checkpoint with its training record, and
--impressions impressions over the 35 days the stage reads (the 28-day reference, the current day, the 6 days of
churn lag before them): items live an exponential time (half of them are gone after 6 days), impressions follow a
Zipf law over the items alive, three dense features. No drift is injected.

1  stage     `semid drift` in a child process, end to end (imports, reading, every check, Evidently, the page):
             wall seconds (goal: at most 60 on 2 cores) and the child's peak RSS
2  contrast  Evidently's DataDriftPreset on the raw item_id column as a categorical, on two --contrast-rows
             samples of one impression distribution (a no-drift pair): seconds and whether it reports drift,
             in a child process stopped after --contrast-timeout seconds. Its time grows about with the square
             of the distinct IDs (a Python loop over categories), so a 1M-row pair does not finish in an hour;
             the same is then run on a --small-rows pair, which does, for its verdict.

Prints a table, then one JSON line: impressions, items, seconds, peak_rss_mb, raw_id_evidently_seconds (the
large pair, elapsed when stopped), raw_id_evidently_drift (the large pair's verdict, null when stopped),
raw_id_evidently_finished, and the small pair's rows, seconds and verdict.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from components.semid import rqvae  # noqa: E402
from components.semid.embedding import VERSION_KEY  # noqa: E402
from components.storage import DataDir, Layout, write_parquet  # noqa: E402

DIM, TOPICS, K, LEVELS = 384, 64, 256, 3
DAYS, REFERENCE_DAYS = 35, 28
END = dt.date(2026, 3, 1)  # the current day; as_of is the day after
MEAN_LIFE = 6 / np.log(2)
REPO = Path(__file__).resolve().parent.parent


def generate(root: Path, impressions: int, n_items: int, seed: int) -> None:
    """The validated events, embeddings, SemID store and current checkpoint the drift stage reads."""
    rng = np.random.default_rng(seed)
    layout = Layout(root)
    first = END - dt.timedelta(days=DAYS - 1)
    topic = rng.integers(0, TOPICS, n_items)
    ids = np.arange(n_items, dtype=np.int64) + 10**12
    centres = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    x = np.empty((n_items, DIM), dtype=np.float32)
    for lo in range(0, n_items, 100_000):  # embeddings: topic centre + noise, unit norm
        hi = min(lo + 100_000, n_items)
        x[lo:hi] = centres[topic[lo:hi]] + 1.5 * rng.standard_normal((hi - lo, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_parquet(pl.DataFrame({"item_id": ids, "vector": x}), layout.embeddings,
                  metadata={VERSION_KEY: "benchmark/synthetic"})
    del x

    model = rqvae.SemanticIdModel({"method": "rqvae", "input_dim": DIM, "latent_dim": 32, "levels": LEVELS,
                                   "codebook_size": K, "hidden_dims": [256]})
    trained_as_of = END - dt.timedelta(days=20)
    version, _ = rqvae.save_checkpoint(model, layout.rqvae, {
        "window": {"start": (trained_as_of - dt.timedelta(days=90)).isoformat(), "end": trained_as_of.isoformat(),
                   "items": n_items},
        "quality": {"items": n_items, "utilization": [1.0, 1.0, 1.0], "collision_rate": 0.05}})
    rqvae.write_current(layout.rqvae, version)
    codes = np.column_stack([topic * (K // TOPICS) + rng.integers(0, K // TOPICS, n_items),
                             rng.integers(0, K, n_items), rng.integers(0, K, n_items)]).astype(np.int16)
    write_parquet(pl.DataFrame({"item_id": ids, "codebook_version": pl.repeat(version, n_items, eager=True),
                                **{f"c{i + 1}": codes[:, i] for i in range(LEVELS)}}), layout.semids)

    born = rng.uniform(-3 * MEAN_LIFE, DAYS, n_items)  # days after `first`
    retire = born + rng.exponential(MEAN_LIFE, n_items)
    popularity = rng.permutation(1 / np.arange(1, n_items + 1) ** 0.9)
    data = DataDir(layout.validated.root)
    for day in range(DAYS):
        alive = np.flatnonzero((born < day + 1) & (retire > day))
        n = impressions // DAYS + (day < impressions % DAYS)
        weight = popularity[alive] / popularity[alive].sum()
        item = alive[rng.choice(len(alive), n, p=weight)]
        ts = dt.datetime.combine(first + dt.timedelta(days=day), dt.time(), dt.timezone.utc)
        micros = np.sort(rng.integers(0, 86_400_000_000, n))
        data.write_events(first + dt.timedelta(days=day), pl.DataFrame({
            "ts": pl.Series(micros + int(ts.timestamp() * 1e6)).cast(pl.Datetime("us", "UTC")),
            "user_id": rng.integers(0, 1_000_000, n),
            "item_id": ids[item],
            "clicked": (rng.random(n) < 0.05 + 0.1 * (topic[item] % 3 == 0)).astype(np.int8),
            "f_position": rng.integers(1, 11, n).astype(np.float32),
            "f_user_prior": rng.normal(0, 0.3, n).astype(np.float32),
            "f_item_age_days": np.clip(day - born[item], 0, None).astype(np.float32)}))


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of this (large) process would
# report at least the parent's size; VmHWM is the high-water mark of the child's own memory.
STAGE = """
import atexit, re, sys
hwm = lambda: re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
atexit.register(lambda: print("PEAK_RSS_KB", hwm(), file=sys.stderr))
sys.argv = ["semid", "drift", "--params", sys.argv[1]]
from components.cli import app
app()
"""


def time_stage(root: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of `semid drift` run in `root`, the command line's own process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STAGE, str(REPO / "params.yaml")], cwd=root, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, int(peak) / 1024


CONTRAST = """
import json, sys, time
import numpy as np, pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset
rows, items, seed = map(int, sys.argv[1:])
rng = np.random.default_rng(seed)
weight = 1 / np.arange(1, items + 1) ** 0.9
weight /= weight.sum()
frame = lambda: pd.DataFrame({"item_id": (rng.choice(items, rows, p=weight) + 10**12).astype(str)})
definition = DataDefinition(categorical_columns=["item_id"])
started = time.perf_counter()
snapshot = Report([DataDriftPreset()]).run(Dataset.from_pandas(frame(), data_definition=definition),
                                           Dataset.from_pandas(frame(), data_definition=definition))
drifted = next(m["value"] for m in snapshot.dict()["metrics"] if m["metric_name"].startswith("DriftedColumnsCount"))
print(json.dumps({"seconds": time.perf_counter() - started, "drift": drifted["count"] > 0}))
"""


def time_contrast(rows: int, items: int, seed: int, timeout: float) -> tuple[float, bool | None]:
    """Evidently's DataDriftPreset on raw item IDs: seconds, and whether it found drift (None: stopped)."""
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    started = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", CONTRAST, str(rows), str(items), str(seed)], env=env,
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, None
    result = json.loads(out.strip().splitlines()[-1])
    return result["seconds"], result["drift"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--contrast-rows", type=int, default=1_000_000)
    parser.add_argument("--contrast-timeout", type=float, default=600)
    parser.add_argument("--small-rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(stderr=True)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="semid-drift-bench-") as tmp:
        with console.status(f"generating {args.impressions:,} impressions over {args.items:,} items"):
            generate(Path(tmp), args.impressions, args.items, args.seed)
        console.print(f"load average at start: {os.getloadavg()[0]:.2f}")
        with console.status("semid drift"):
            seconds, peak = time_stage(Path(tmp))
        summary = json.loads((Path(tmp) / "reports" / "drift" / "summary.json").read_text())
    with console.status(f"Evidently DataDriftPreset on raw item IDs ({args.contrast_rows:,} rows a side)"):
        raw_seconds, raw_drift = time_contrast(args.contrast_rows, args.items, args.seed, args.contrast_timeout)
    with console.status(f"Evidently DataDriftPreset on raw item IDs ({args.small_rows:,} rows a side)"):
        small_seconds, small_drift = time_contrast(args.small_rows, args.items, args.seed, args.contrast_timeout)
    table = Table(title="Drift stage at production size (2 cores)")
    for column in ("what", "figure"):
        table.add_column(column)
    table.add_row("impressions read / items", f"{args.impressions:,} / {args.items:,}")
    table.add_row("semid drift, end to end", f"{seconds:.1f} s (goal: 60 s)")
    table.add_row("peak RSS of the stage", f"{peak:,.0f} MiB")
    table.add_row("verdict on no-drift data", summary["verdict"])
    for rows, took, drift in ((args.contrast_rows, raw_seconds, raw_drift), (args.small_rows, small_seconds,
                                                                               small_drift)):
        outcome = f"stopped after {took:.0f} s" if drift is None else f"{took:.1f} s, drift reported: {drift}"
        table.add_row(f"Evidently DataDriftPreset on raw item_id, {rows:,}-row no-drift pair", outcome)
    Console().print(table)
    print(json.dumps({"impressions": args.impressions, "items": args.items, "seconds": round(seconds, 2),
                      "peak_rss_mb": round(peak), "raw_id_evidently_seconds": round(raw_seconds, 1),
                      "raw_id_evidently_drift": raw_drift, "raw_id_evidently_finished": raw_drift is not None,
                      "raw_id_evidently_small_rows": args.small_rows,
                      "raw_id_evidently_small_seconds": round(small_seconds, 1),
                      "raw_id_evidently_small_drift": small_drift}))


if __name__ == "__main__":
    main()

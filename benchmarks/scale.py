"""The whole loop at world.scale 20 (429k items, 68M impressions) on this machine, local engine against Ray.
`python benchmarks/scale.py [--scale 20] [--engines local ray] [--encoder minilm|hashing-test] [--keep DIR]
                            [--set KEY=VALUE ...]`

Each engine gets a fresh workspace (this repository's pipeline files; params.yaml with world.scale and engine.kind
set, and any --set overrides, everything else as committed) and runs the stages of dvc.yaml in order, `semid
<stage>` as `dvc repro` would; data/raw is generated once and copied, since generate does not use the engine. Each
stage is timed wall-clock with its peak memory: the proportional set size of the stage's process and all its
descendants (Ray's raylet, workers and actors included), sampled every 0.2 s. Then the engines' results are
compared: validation metrics, embeddings (max absolute difference), SemIDs (identical or not), ranker NE. Prints a
table for people, then one JSON line.

At scale 20 the synthetic world repeats texts (366,667 distinct texts for 429,385 items: 15% exact copies, against
2.3% at scale 1), so the SemID collision rate cannot stay under the default world's gate (rqvae.max_collision_rate
0.15; 54% at K = 256): run it with `--set rqvae.max_collision_rate=0.6`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components import shards  # noqa: E402

STAGES = ("validate", "embed", "train_rqvae", "backfill", "drift", "train_ranker")
MEMORY_GOAL_GB = 16
console = Console(width=None if sys.stdout.isatty() else 150)


def workspace(root: Path, scale: float, engine: str, encoder: str, overrides: list[str]) -> Path:
    """This repository's pipeline files in `root`, params.yaml at the scale and engine asked for, with the
    KEY=VALUE overrides (dotted keys, YAML values) applied."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"]["scale"] = scale
    params["engine"]["kind"] = engine
    params["embed"]["encoder"] = encoder
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"--set {override}: params.yaml has no {key}")
        node[leaf] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def tree_memory(process: psutil.Process) -> int:
    """Proportional set size (PSS) of a process and all its descendants, in bytes: shared pages (Ray's object
    store, mapped by every worker) are split among the processes that map them, so the sum is the memory the tree
    really holds, where summed RSS would count them once per process. Processes that vanish meanwhile count 0."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_stage(stage: str, root: Path) -> dict:
    """`semid <stage>` in `root`: wall seconds and the peak memory of its process tree (tree_memory)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "components.cli", stage], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, watched = 0, psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_memory(watched))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"semid {stage} in {root} exited {proc.returncode}:\n{out[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_gb": round(peak / 2**30, 2)}


def compare(roots: dict[str, Path]) -> dict:
    """How far the engines' results are apart (the first engine against the others)."""
    (first, a), *others = roots.items()
    out = {}
    for name, b in others:
        read = lambda root, path: pl.read_parquet(shards.files(root / path))  # noqa: E731
        ea, eb = read(a, "data/embeddings/items.parquet"), read(b, "data/embeddings/items.parquet")
        # each workspace's own codebook: its version hashes its inputs' files, which differ in layout (one file
        # or shards) even when their rows are the same
        store = lambda root: read(root, "data/semids/" + json.loads(  # noqa: E731
            (root / "reports" / "rqvae" / "record.json").read_text())["codebook_version"] + ".parquet").sort("item_id")
        ne = [json.loads((r / "metrics" / "ranker.json").read_text())["ne"]["all"] for r in (a, b)]
        out[f"{first}_vs_{name}"] = {
            "validation_identical": (a / "metrics" / "validation.json").read_text()
            == (b / "metrics" / "validation.json").read_text(),
            "embedding_max_abs_diff": float(np.abs(np.stack(ea["vector"].to_numpy())
                                                   - np.stack(eb["vector"].to_numpy())).max())
            if ea["item_id"].equals(eb["item_id"]) else None,
            "semids_identical": store(a).equals(store(b)),
            "rqvae_metrics_identical": (a / "metrics" / "rqvae.json").read_text()
            == (b / "metrics" / "rqvae.json").read_text(),
            "ne_all": {first: ne[0], name: ne[1]},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=20.0, help="world.scale (20: 429k items, 68M impressions)")
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=("local", "ray"))
    parser.add_argument("--encoder", default="minilm", choices=("minilm", "hashing-test"),
                        help="embed.encoder (hashing-test: a quick run of everything but the CU model)")
    parser.add_argument("--keep", type=Path, default=None, help="leave the workspaces here instead of a temp dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override for both engines, e.g. rqvae.max_collision_rate=0.6")
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="semid-scale-"))
    roots, figures = {}, {}
    for engine in args.engines:
        root = base / engine
        root.mkdir(parents=True, exist_ok=True)
        roots[engine] = workspace(root, args.scale, engine, args.encoder, args.overrides)
    first = roots[args.engines[0]]
    console.print(f"generating the world at scale {args.scale:g} in {first}")
    generated = run_stage("generate", first)
    for root in list(roots.values())[1:]:
        for part in ("data/raw", "data/world"):
            shutil.copytree(first / part, root / part)
    events = pl.scan_parquet(first / "data" / "raw" / "events" / "**" / "*.parquet").select(pl.len()).collect().item()
    items = pl.read_parquet(first / "data" / "raw" / "items.parquet", columns=["item_id"]).height
    for engine, root in roots.items():
        figures[engine] = {}
        for stage in STAGES:
            figures[engine][stage] = run_stage(stage, root)
            console.print(f"{engine}: semid {stage}: {figures[engine][stage]}")
    results = compare(roots) if len(roots) > 1 else {}

    table = Table(title=f"the loop at world.scale {args.scale:g}: {items:,} items, {events:,} impressions "
                        f"(generate {generated['seconds']} s, peak {generated['peak_gb']} GB)")
    table.add_column("stage")
    for engine in roots:
        table.add_column(f"{engine} s", justify="right")
        table.add_column(f"{engine} peak GB", justify="right")
    for stage in STAGES:
        table.add_row(stage, *[str(figures[e][stage][k]) for e in roots for k in ("seconds", "peak_gb")])
    table.add_row("total", *[x for e in roots for x in (f"{sum(f['seconds'] for f in figures[e].values()):.1f}",
                                                           str(max(f["peak_gb"] for f in figures[e].values())))])
    console.print(table)
    peak = max(f["peak_gb"] for e in roots for f in figures[e].values())
    console.print(f"peak memory {peak} GB - goal < {MEMORY_GOAL_GB} GB: "
                  + ("[green]met[/]" if peak < MEMORY_GOAL_GB else "[red]missed[/]"))
    for pair, found in results.items():
        console.print(f"{pair}: {found}")
    print(json.dumps({"scale": args.scale, "items": items, "impressions": events, "encoder": args.encoder,
                      "overrides": args.overrides,
                      "cpus": os.cpu_count(), "generate": generated, "stages": figures, "peak_gb": peak,
                      "comparison": results}))


if __name__ == "__main__":
    main()

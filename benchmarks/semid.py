"""Semantic IDs at catalogue scale: ours vs faiss, and the backfill's peak memory.
`python benchmarks/semid.py [--items N] [--train-items M] [--seed S]`

Data: N synthetic 384-d unit vectors shaped like MiniLM output (a 3-level Gaussian mixture: top topics,
sub-topics, leaf topics of uneven size, item noise; a shared direction; two dead dimensions), ~2% of rows
exact copies of earlier rows, as in real catalogues. Every method trains on the same random sample (100,000
items by default) with L=3 levels of K=256 codes; the ones with a latent space use D'=32 (RQVAEParams defaults):

- ours, rqvae      rqvae.train(RQVAEParams()), then model.assign (normalise, MLP encoder 384->256->32, RQ)
- ours, rqkmeans   residual k-means on the normalised 384-d input (no autoencoder)
- faiss PCA32+RQ   faiss.PCAMatrix(384, 32) + faiss.ResidualQuantizer(32, 3, 8), beam 1: the same latent size
- faiss RQ 384-d   faiss.ResidualQuantizer(384, 3, 8) on the raw input, beam 1 (as docs/design-notes.md's peers)

Figures per method: collision rate, utilization per level, most items on one SemID, train seconds, and
assignment items/s over all N (best of 2 passes after a warm-up; torch and faiss on the same thread count).
Then the rqvae checkpoint backfills the N items (components.semid.run_backfill) in a child process whose peak
RSS is read with getrusage(RUSAGE_CHILDREN). Goals: collision and utilization at least as good as faiss,
assignment at least as fast as faiss compute_codes, backfill peak memory < 2 GB.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from components.params import RQVAEParams  # noqa: E402
from components.semid import rqvae  # noqa: E402
from components.semid.embedding import VERSION_KEY  # noqa: E402
from components.semid.train_rqvae import code_quality  # noqa: E402
from components.storage import Layout, write_parquet  # noqa: E402

DIM = 384
DEAD_DIMS = [127, 223]  # all-MiniLM-L6-v2 has dimensions with std 0 (docs/design-notes.md)
TOPICS = (20, 12, 10)  # top topics, sub-topics per top, leaves per sub: 2,400 leaf topics
SPREAD = (1.0, 0.7, 0.5, 0.8)  # norm of: top centre, sub offset, leaf offset, item noise
SHARED = 0.5  # norm of a direction every vector shares: unrelated texts still have cosine ~0.1 in MiniLM
DUPLICATES = 0.02
CHUNK = 100_000
WARMUP_ROWS = 20_000
REPEATS = 2
MEMORY_GOAL = 2e9  # bytes
# The backfill's child process. It is started before this process grows: Linux records the parent's peak RSS
# in a child at exec time, so a child spawned later would report this process's peak, not the backfill's.
# It waits for the layout root on stdin, and imports only what `semid backfill` imports.
BACKFILL_CHILD = """
import json, sys
root = sys.stdin.readline().strip()
if root:
    from pathlib import Path
    from components.params import BackfillParams
    from components.semid.backfill import run_backfill
    from components.storage import Layout
    m = run_backfill(BackfillParams(), Layout(Path(root)))
    hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    print(json.dumps({"items": m["items"], "seconds": m["seconds"], "collision_rate": m["collision_rate"],
                      "vm_hwm_kib": hwm}))
"""

console = Console(width=None if sys.stdout.isatty() else 150)  # wide tables in a log file too


@dataclasses.dataclass
class Result:
    method: str
    quantizes: str
    train_s: float
    assign_s: float  # best full pass, input x (N, 384) -> codes
    codes: np.ndarray  # (N, L) int64
    codes_only_s: float | None = None  # faiss PCA row: compute_codes on the PCA output alone


# ---------------------------------------------------------------------------------------------- data


def make_vectors(n: int, rng: np.random.Generator, progress: Progress) -> tuple[np.ndarray, int]:
    """n unit vectors (n, 384) float32 of the 3-level mixture, then exact copies; returns them and the copies."""
    def children(parents: np.ndarray, count: int, spread: float) -> np.ndarray:
        offsets = rng.standard_normal((len(parents), count, DIM), dtype=np.float32) * (spread / np.sqrt(DIM))
        return (parents[:, None, :] + offsets).reshape(-1, DIM)

    shared = rng.standard_normal(DIM, dtype=np.float32) * (SHARED / np.sqrt(DIM))
    top = shared + rng.standard_normal((TOPICS[0], DIM), dtype=np.float32) * (SPREAD[0] / np.sqrt(DIM))
    leaves = children(children(top, TOPICS[1], SPREAD[1]), TOPICS[2], SPREAD[2])
    weights = rng.lognormal(0.0, 1.0, len(leaves))  # uneven topic sizes
    weights /= weights.sum()
    x = np.empty((n, DIM), dtype=np.float32)
    task = progress.add_task("generate vectors", total=n)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        leaf = rng.choice(len(leaves), m, p=weights)
        chunk = leaves[leaf] + rng.standard_normal((m, DIM), dtype=np.float32) * (SPREAD[3] / np.sqrt(DIM))
        chunk[:, DEAD_DIMS] = 0.0
        x[start:start + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        progress.advance(task, m)
    return x, add_duplicates(x, rng)


def add_duplicates(x: np.ndarray, rng: np.random.Generator) -> int:
    """Overwrite DUPLICATES of the rows (never row 0) with copies of earlier original rows; return how many."""
    n = len(x)
    is_copy = np.zeros(n, dtype=bool)
    is_copy[1 + rng.choice(n - 1, round(DUPLICATES * n), replace=False)] = True
    originals, copies = np.flatnonzero(~is_copy), np.flatnonzero(is_copy)
    earlier = np.searchsorted(originals, copies)  # originals before each copy: >= 1, row 0 is one
    x[copies] = x[originals[rng.integers(0, earlier)]]
    return len(copies)


# ---------------------------------------------------------------------------------------------- methods


def best_time(fn: Callable[[np.ndarray], object], x: np.ndarray, progress: Progress, name: str):
    """Best wall seconds of fn(x) over REPEATS full passes after a warm-up on the first rows, and fn(x)."""
    task = progress.add_task(name, total=REPEATS + 1)
    fn(x[:WARMUP_ROWS])
    progress.advance(task)
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - started)
        progress.advance(task)
    return min(times), out


def run_ours(method: str, x: np.ndarray, x_train: np.ndarray,
             progress: Progress) -> tuple[Result, rqvae.SemanticIdModel]:
    """rqvae.train with default params (but `method`), then model.assign on all of x."""
    p = RQVAEParams(method=method)
    task = progress.add_task(f"train {method}", total=p.steps if method == "rqvae" else None)
    started = time.perf_counter()
    model, _ = rqvae.train(torch.from_numpy(x_train), p,
                           progress=lambda step: progress.update(task, completed=step + 1))
    train_s = time.perf_counter() - started
    progress.update(task, total=1, completed=1)
    model.eval()
    seconds, codes = best_time(lambda v: model.assign(torch.from_numpy(v)), x, progress, f"assign {method}")
    quantizes = f"MLP 384 -> {p.latent_dim}-d" if method == "rqvae" else "384-d, normalised"
    return Result(f"ours, {method}", quantizes, train_s, seconds, codes.numpy()), model


def assign_breakdown(model: rqvae.SemanticIdModel, x: np.ndarray, progress: Progress) -> tuple[float, float]:
    """Best seconds over REPEATS passes of x in assign's chunks, for normalise + encoder and for the quantizer."""
    size = inspect.signature(model.assign).parameters["batch_size"].default
    task = progress.add_task("assign rqvae, split by part", total=REPEATS)
    encode, quantize = [], []
    with torch.no_grad():
        for _ in range(REPEATS):
            e = q = 0.0
            for i in range(0, len(x), size):
                started = time.perf_counter()
                z = model.encoder(model.normalize(torch.from_numpy(x[i:i + size])))
                middle = time.perf_counter()
                model.quantizer.encode(z)
                e, q = e + middle - started, q + time.perf_counter() - middle
            encode.append(e)
            quantize.append(q)
            progress.advance(task)
    return min(encode), min(quantize)


def faiss_rq(dim: int, levels: int) -> faiss.ResidualQuantizer:
    """A faiss ResidualQuantizer of `levels` x 256 codes (8 bits each), greedy (beam 1) like ours."""
    rq = faiss.ResidualQuantizer(dim, levels, 8)
    rq.max_beam_size = 1
    return rq


def unpack_codes(rq: faiss.ResidualQuantizer, packed: np.ndarray) -> np.ndarray:
    """(N, L) int64 codes from faiss' packed (N, code_size) uint8 codes: with 8 bits per level, byte l holds
    level l's code. Checked by decoding a sample both ways."""
    if rq.code_size != rq.M or {rq.nbits.at(i) for i in range(rq.M)} != {8}:
        raise RuntimeError(f"faiss codes are not one byte per level (code_size {rq.code_size}, M {rq.M})")
    codes = packed.astype(np.int64)
    books = faiss.vector_to_array(rq.codebooks).reshape(rq.M, 256, rq.d)
    sample = codes[:1000]
    mine = books[np.arange(rq.M), sample].sum(1)
    if not np.allclose(mine, rq.decode(packed[:1000]), atol=1e-4):
        raise RuntimeError("unpacked faiss codes do not decode to what rq.decode returns")
    return codes


def run_faiss_pca(x: np.ndarray, x_train: np.ndarray, levels: int, latent: int, progress: Progress) -> Result:
    """PCA to the latent size, then RQ; assignment timed end to end and for compute_codes alone."""
    task = progress.add_task("train faiss PCA + RQ", total=None)
    started = time.perf_counter()
    pca = faiss.PCAMatrix(DIM, latent)
    pca.train(x_train)
    rq = faiss_rq(latent, levels)
    rq.train(pca.apply(x_train))
    train_s = time.perf_counter() - started
    progress.update(task, total=1, completed=1)
    seconds, packed = best_time(lambda v: rq.compute_codes(pca.apply(v)), x, progress,
                                "assign faiss PCA + compute_codes")
    z = pca.apply(x)
    codes_only_s, _ = best_time(rq.compute_codes, z, progress, "assign faiss compute_codes alone")
    return Result(f"faiss PCA{latent}+RQ, beam 1", f"PCA 384 -> {latent}-d", train_s, seconds,
                  unpack_codes(rq, packed), codes_only_s)


def run_faiss_raw(x: np.ndarray, x_train: np.ndarray, levels: int, progress: Progress) -> Result:
    """RQ straight on the raw 384-d vectors."""
    task = progress.add_task("train faiss RQ 384-d", total=None)
    started = time.perf_counter()
    rq = faiss_rq(DIM, levels)
    rq.train(x_train)
    train_s = time.perf_counter() - started
    progress.update(task, total=1, completed=1)
    seconds, packed = best_time(rq.compute_codes, x, progress, "assign faiss RQ 384-d")
    return Result("faiss RQ 384-d, beam 1", "384-d, raw", train_s, seconds, unpack_codes(rq, packed))


# ---------------------------------------------------------------------------------------------- backfill


def start_backfill_child() -> subprocess.Popen:
    """The backfill's process, idle until `measure_backfill` hands it a layout (see BACKFILL_CHILD)."""
    return subprocess.Popen([sys.executable, "-c", BACKFILL_CHILD], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def measure_backfill(child: subprocess.Popen, x: np.ndarray, model: rqvae.SemanticIdModel,
                     progress: Progress) -> dict:
    """Write x as data/embeddings and the model as the current checkpoint of a temp layout, let the child
    backfill it; return its metrics with its peak RSS (KiB, RUSAGE_CHILDREN)."""
    with tempfile.TemporaryDirectory(prefix="semid-bench-") as tmp:
        layout = Layout(Path(tmp))
        task = progress.add_task("write embeddings + checkpoint", total=None)
        write_parquet(pl.DataFrame({"item_id": np.arange(len(x), dtype=np.int64), "vector": x}), layout.embeddings,
                      metadata={VERSION_KEY: "benchmark/synthetic"})
        version, _ = rqvae.save_checkpoint(model, layout.rqvae, {})
        rqvae.write_current(layout.rqvae, version)
        progress.update(task, total=1, completed=1)
        task = progress.add_task("backfill (child process)", total=None)
        out, _ = child.communicate(tmp + "\n")
        progress.update(task, total=1, completed=1)
    if child.returncode != 0:
        sys.exit(f"backfill child failed with exit status {child.returncode}")
    metrics = json.loads(out.strip().splitlines()[-1])
    return {**metrics, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


# ---------------------------------------------------------------------------------------------- report


def results_table(results: list[Result], K: int) -> tuple[Table, dict[str, dict]]:
    """The side-by-side table and each method's code_quality."""
    table = Table(title=f"L={results[0].codes.shape[1]}, K={K}, {len(results[0].codes):,} items")
    for column in ("method", "quantizes", "collision", "util L1/L2/L3", "max items/ID", "train s",
                   "assign items/s"):
        table.add_column(column, justify="left" if column in ("method", "quantizes") else "right")
    quality = {}
    for r in results:
        q = quality[r.method] = code_quality(torch.from_numpy(r.codes), K)
        n = len(r.codes)
        rate = f"{n / r.assign_s:,.0f}"
        if r.codes_only_s is not None:
            rate += f"\n({n / r.codes_only_s:,.0f} compute_codes alone)"
        table.add_row(r.method, r.quantizes, f"{q['collision_rate']:.2%}",
                      "/".join(f"{u:.3f}" for u in q["utilization"]), f"{q['max_items_per_semid']:,}",
                      f"{r.train_s:.1f}", rate)
    return table, quality


def verdict(met: bool, margin: str) -> str:
    return f"[green]met[/] ({margin})" if met else f"[red]missed[/] ({margin})"


def goals_table(ours: list[Result], faiss_results: list[Result], quality: dict[str, dict], backfill: dict) -> Table:
    """Each goal, its target from the faiss rows, and whether each of our methods meets it."""
    table = Table(title="goals")
    table.add_column("goal")
    table.add_column("target")
    for r in ours:
        table.add_column(r.method)
    n = len(ours[0].codes)

    best = min(faiss_results, key=lambda r: quality[r.method]["collision_rate"])
    target = quality[best.method]["collision_rate"]
    cells = []
    for r in ours:
        c = quality[r.method]["collision_rate"]
        cells.append(verdict(c <= target, f"{c:.2%}, {100 * (c - target):+.2f} pt"))
    table.add_row("collision <= best faiss", f"{target:.2%} ({best.method})", *cells)

    best = max(faiss_results, key=lambda r: min(quality[r.method]["utilization"]))
    target = min(quality[best.method]["utilization"])
    cells = []
    for r in ours:
        u = min(quality[r.method]["utilization"])
        cells.append(verdict(u >= target, f"min {u:.3f}, {u - target:+.3f}"))
    table.add_row("utilization (lowest level) >= best faiss", f"{target:.3f} ({best.method})", *cells)

    pca = next(r for r in faiss_results if r.codes_only_s is not None)
    for label, seconds in (("PCA + compute_codes", pca.assign_s), ("compute_codes alone", pca.codes_only_s)):
        target = n / seconds
        cells = [verdict(n / r.assign_s >= target, f"{n / r.assign_s / target:.2f}x") for r in ours]
        table.add_row(f"assign items/s >= faiss {label}", f"{target:,.0f} ({pca.method})", *cells)

    peak = backfill["peak_kib"] * 1024
    table.add_row("backfill peak RSS < 2 GB", f"{MEMORY_GOAL / 1e9:.1f} GB",
                  verdict(peak < MEMORY_GOAL, f"{peak / 1e9:.2f} GB, {(MEMORY_GOAL - peak) / 1e9:+.2f} GB headroom"),
                  *["-" for _ in ours[1:]])
    return table


def rss_kib() -> int:
    """This process's current resident set size in KiB."""
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])


def describe_data(x: np.ndarray, copies: int, rng: np.random.Generator) -> str:
    """What the vectors are, with two shape figures measured on a sample to hold against real MiniLM output
    (8,360 synthetic-world ad titles: top-32 PCA variance share 0.51, mean cosine of random pairs 0.13)."""
    sample = x[rng.choice(len(x), min(len(x), 20_000), replace=False)].astype(np.float64)
    eigen = np.linalg.eigvalsh(np.cov(sample.T))[::-1]
    half = len(sample) // 2
    cosine = (sample[:half] * sample[half:2 * half]).sum(1).mean()
    return (f"data: {len(x):,} synthetic 384-d unit vectors, MiniLM-like: a 3-level Gaussian mixture of "
            f"{TOPICS[0]} x {TOPICS[1]} x {TOPICS[2]} = {np.prod(TOPICS):,} leaf topics of lognormal sizes "
            f"(norms top/sub/leaf/noise {'/'.join(map(str, SPREAD))}, shared direction {SHARED}, dims {DEAD_DIMS} "
            f"dead); top-32 PCA variance share {eigen[:32].sum() / eigen.sum():.2f}, mean cosine {cosine:.2f} "
            f"(real MiniLM: 0.51, 0.13); {copies:,} rows ({copies / len(x):.1%}) are exact copies of earlier rows, "
            f"so collision >= {copies / len(x):.2%} for any method")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--train-items", type=int, default=100_000,
                        help="random sample every method trains on (residual k-means on all 1M 384-d rows would "
                             "take over 15 min on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    child = start_backfill_child()
    spawn_rss = rss_kib()
    load_before = os.getloadavg()[0]

    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    p = RQVAEParams()
    rng = np.random.default_rng(args.seed)
    progress = Progress(SpinnerColumn(), "{task.description}", BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    with progress:
        x, copies = make_vectors(args.items, rng, progress)
        n_train = min(args.train_items, args.items)
        x_train = x if n_train == args.items else x[np.sort(rng.choice(args.items, n_train, replace=False))]
        rqvae_result, model = run_ours("rqvae", x, x_train, progress)
        rqkmeans_result, _ = run_ours("rqkmeans", x, x_train, progress)
        pca_result = run_faiss_pca(x, x_train, p.levels, p.latent_dim, progress)
        raw_result = run_faiss_raw(x, x_train, p.levels, progress)
        encode_s, quantize_s = assign_breakdown(model, x, progress)
        backfill = measure_backfill(child, x, model, progress)

    console.print(f"{describe_data(x, copies, rng)}; seed {args.seed}")
    console.print(f"training set: {'all ' if n_train == args.items else 'a random sample of '}{n_train:,} items "
                  f"for every method; threads: torch {threads}, faiss {faiss.omp_get_max_threads()}; assignment "
                  f"over all items, best of {REPEATS} after a warm-up; 1-min load average {load_before:.1f} at the "
                  f"start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores (other processes skew "
                  f"the timings)")
    ours, faiss_results = [rqvae_result, rqkmeans_result], [pca_result, raw_result]
    table, quality = results_table(ours + faiss_results, p.codebook_size)
    console.print(table)
    console.print(f"ours, rqvae assignment split by part (best pass each): normalise + encoder {encode_s:.2f} s, "
                  f"quantizer {quantize_s:.2f} s (faiss compute_codes alone on 32-d: {pca_result.codes_only_s:.2f} s)")
    console.print(f"backfill of {backfill['items']:,} items (rqvae checkpoint, BackfillParams defaults, child "
                  f"process): {backfill['seconds']:.1f} s, {backfill['items'] / backfill['seconds']:,.0f} items/s, "
                  f"collision {backfill['collision_rate']:.2%}; peak RSS {backfill['peak_kib'] / 1024:,.0f} MiB "
                  f"(RUSAGE_CHILDREN; child's own VmHWM {backfill['vm_hwm_kib'] / 1024:,.0f} MiB; this process "
                  f"held {spawn_rss / 1024:,.0f} MiB when it started the child) - goal < 2 GB")
    console.print(goals_table(ours, faiss_results, quality, backfill))


if __name__ == "__main__":
    main()

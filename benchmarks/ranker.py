"""How fast does the ranker train, how far is that from today's and from the machine's limit, and does the data
pipeline keep up?
`python benchmarks/ranker.py [--device cpu|cuda] [--examples N] [--rows R] [--repeats N] [--contrast-batches N]
                             [--no-dense-contrast] [--no-ne] [--baseline-rev REV] [--threads N] [--seed S]`

Data: the default synthetic world's first 60 days (components.data.world.run_generate), about 20k impressions
a day, written to a temp dir in a few seconds); its data/raw is read as the stage reads data/validated (same
layout, and the world is valid). SemIDs: a store built in memory with seeded random codes, L=3 levels of
K=256, for every item, so no MiniLM or RQ-VAE is needed: throughput does not depend on which codes an item
has, only on how many (each code prefix is one table row, prefix_ngram by default).

Figures, RankerParams defaults unless said (training window ranker_window: 42 days, history T=20, bypass):

1  pipeline     load_examples over the training window (parquet read + click history + SemID codes), best of
                --repeats; and build_examples alone on events read beforehand (history prepared inside)
2  baseline     today's: the code of --baseline-rev (BASELINE_REV, main when the speed work began) at its default
                settings (torch tables, batch 256, lr 0.001, sparse_lr 0.2), in a subprocess on the same examples
                (benchmarks/revision_training.py with that revision's components on PYTHONPATH)
3  default      train_passes on the first --examples rows of the window, the model built as run_train_ranker
                builds it, after a short warm-up; examples/s and pipeline / training (goal: the pipeline >= 3x)
4  batch 256    this code at the baseline's settings: how much of the gain is code and how much batch size
5  torchrec     the default settings with ranker.tables torchrec (FusedEmbeddingBagCollection, fused Adagrad)
6  2M rows      the default with the SemID table sized to --rows (2,000,000) rows: sparse gradients + Adagrad
                keep the cost per step independent of the table size; for contrast (--dense-contrast, on by
                default) a few batches of the same model with dense gradients (EmbeddingBag sparse=False) and
                Adam on every parameter, whose cost per step grows with the table (docs/design-notes.md,
                "Sparse gradients")
NE (--ne, on by default): the baseline (in its subprocess) and the default each train a fresh model on the whole
training window; NE on the evaluation window (the 72 hours after it). GFLOP/s: the matrix-product FLOPs of one
training step at the default settings (torch.utils.flop_counter: forward and backward) times examples/s, against
the rate of one large fp32 matrix product on the same threads (the machine's matmul rate).

--device cuda runs the same figures on the GPU at batch 65,536 (RankerParams.batch_size overridden) on the
whole training window by default, and adds each pass's peak torch.cuda.max_memory_allocated(). The CPU path
never touches CUDA. The load average is printed at the start and the end: other processes skew the timings,
training with 2 torch threads most (measured on the 2-core machine with another training job running: a batch-256
step took ~10 ms with 1 thread and 40-400 ms with 2, threads spinning while they wait for each other; --threads 1
shows what one core does on a busy machine).

The last line is one JSON object of the figures: train_examples_per_s, baseline_train_examples_per_s,
pipeline_examples_per_s, device and the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.data.world import run_generate  # noqa: E402
from components.errors import ParamsError  # noqa: E402
from components.params import RankerParams, WorldParams  # noqa: E402
from components.ranker.device import autocast, pick_device, to_device  # noqa: E402
from components.ranker.examples import (  # noqa: E402
    Examples,
    build_examples,
    click_history,
    day_files,
    in_window,
    load_clicks,
    load_examples,
    ranker_window,
)
from components.ranker.model import Ranker, bce  # noqa: E402
from components.ranker.train_ranker import initial_model  # noqa: E402
from revision_training import ne_after_training, training_rate, vocabulary_layout  # noqa: E402
from components.semid.store import SemIdStore, code_columns, code_dtype  # noqa: E402
from components.storage import DataDir, Layout  # noqa: E402
from components.window import Window  # noqa: E402

LEVELS, CODEBOOK_SIZE = 3, 256  # L, K of the random SemIDs
CPU_EXAMPLES = 200_000  # training rows timed on CPU (~5-10 s a figure on 2 cores)
CUDA_BATCH = 65_536
WARMUP_BATCHES = {"cpu": 20, "cuda": 2}  # untimed steps before each timed pass
CONTRAST_WARMUP = 3
PIPELINE_GOAL = 3.0  # pipeline examples/s >= 3x training examples/s
SPEEDUP_GOAL = 2.0  # default examples/s >= 2x the baseline's
NE_TOLERANCE = 0.002  # the default's NE at most this much above the baseline's
BASELINE_REV = "8ff3e14"  # main when the speed work began: today's code for the baseline figure
BASELINE_SETTINGS = {"batch_size": 256, "lr": 0.001, "sparse_lr": 0.2}  # its defaults (with torch tables)
MATMUL_SIZE, MATMUL_REPEATS = 2048, 5

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclasses.dataclass
class Figure:
    name: str
    what: str
    examples: int
    seconds: float
    peak_bytes: int | None = None  # CUDA only

    @property
    def rate(self) -> float:
        return self.examples / self.seconds


# ---------------------------------------------------------------------------------------------- data


def random_store(items: pl.Series, seed: int) -> SemIdStore:
    """Every item gets L random codes in [0, K): an in-memory entity store (item_id, c1..cL)."""
    rng = np.random.default_rng(seed)
    dtype = code_dtype(CODEBOOK_SIZE)
    codes = {c: rng.integers(0, CODEBOOK_SIZE, len(items)).astype(dtype) for c in code_columns(LEVELS)}
    return SemIdStore(Path("<in memory: random codes>"), "benchmark-random", pl.DataFrame({"item_id": items, **codes}))


def head(examples: Examples, n: int) -> Examples:
    """The first n rows (time order), as the stage would see a shorter window."""
    return examples.take(slice(0, n))


def best_of(repeats: int, fn: Callable[[], object], progress: Progress, name: str) -> tuple[float, object]:
    """Best wall seconds of fn() over `repeats` calls, and the last call's result."""
    task = progress.add_task(name, total=repeats)
    times, out = [], None
    for _ in range(repeats):
        out = None  # free the previous result before the next call builds another
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
        progress.advance(task)
    return min(times), out


def time_pipeline(data: DataDir, window: Window, store: SemIdStore, p: RankerParams, repeats: int,
                  progress: Progress) -> tuple[Examples, list[Figure], float]:
    """Figure 1: load_examples end to end, and build_examples on frames already in memory; returns the
    training examples, the two figures and the seconds click_history takes of build_examples."""
    start, end = window
    seconds, train = best_of(repeats, lambda: load_examples(data, start, end, store, p, "training"), progress,
                             "pipeline: load_examples")
    figures = [Figure("pipeline", "load_examples: parquet read + history + codes", len(train), seconds)]

    task = progress.add_task("read events + clicks for build_examples", total=None)
    files = [f for _, group in day_files(data, start, end) for f in group]
    events = pl.scan_parquet(files).filter(in_window(start, end)).collect()
    clicks = load_clicks(data, start - dt.timedelta(days=p.history.lookback_days), end)
    progress.update(task, total=1, completed=1)
    seconds, built = best_of(repeats, lambda: build_examples(events, clicks, store, p.history.length,
                                                             p.missing_semid), progress,
                             "pipeline: build_examples on pre-read events")
    if len(built) != len(train):
        raise RuntimeError(f"build_examples made {len(built):,} examples, load_examples {len(train):,}")
    figures.append(Figure("build", "build_examples on pre-read events", len(built), seconds))
    del built
    history_s, _ = best_of(repeats, lambda: click_history(clicks, store), progress, "pipeline: click_history alone")
    return train, figures, history_s


# ---------------------------------------------------------------------------------------------- training


def table_rows(model: Ranker) -> int:
    return sum(lookup.rows for lookup in model.lookups.values())


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_training(name: str, what: str, model: Ranker, train: Examples, n: int, p: RankerParams,
                  device: torch.device) -> Figure:
    """train_passes on the first n rows after WARMUP_BATCHES untimed steps; the stage's own seconds."""
    reset_peak(device)
    examples, seconds = training_rate(model, train, p, device, n, WARMUP_BATCHES[device.type])
    return Figure(name, f"{what}, {table_rows(model):,} table rows", examples, seconds, peak(device))


def revision_tree(rev: str, into: Path) -> Path:
    """The `components` package of git revision `rev` of this repository, extracted under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "components"],
                             capture_output=True)
    if archive.returncode:
        sys.exit(f"--baseline-rev {rev}: git archive failed ({archive.stderr.decode().strip()}); the baseline needs "
                 f"a clone with that revision's history")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def time_revision(tree: Path, examples: Path, settings: dict, n: int, device: torch.device, ne: bool) -> dict:
    """benchmarks/revision_training.py on the code in `tree`: its examples/s (and NE) at `settings`."""
    command = [sys.executable, str(REPO / "benchmarks" / "revision_training.py"), str(examples),
               "--batch-size", str(settings["batch_size"]), "--lr", str(settings["lr"]),
               "--sparse-lr", str(settings["sparse_lr"]), "--timed", str(n),
               "--warmup-batches", str(WARMUP_BATCHES[device.type]), "--device", device.type,
               "--threads", str(torch.get_num_threads())] + (["--ne"] if ne else [])
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    if run.returncode:
        sys.exit(f"baseline training on {tree} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def flops_per_example(model: Ranker, train: Examples, p: RankerParams, device: torch.device) -> float:
    """Matrix-product FLOPs of one training step's forward and backward, per example (torch's FLOP counter)."""
    batch = to_device(next(train.batches(p.batch_size)), device)
    with FlopCounterMode(display=False) as counter, autocast(device):
        logits, _ = model(batch)
        bce(logits, batch["label"]).backward()
    return counter.get_total_flops() / len(batch["label"])


def matmul_gflops(device: torch.device) -> float:
    """The machine's fp32 (CUDA: bf16, as the ranker runs there) matrix-product rate on torch's threads: the
    best of a few products of MATMUL_SIZE-square matrices."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(MATMUL_REPEATS):
        reset_peak(device)  # synchronises on CUDA
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * MATMUL_SIZE**3 / best / 1e9


def time_dense_adam(name: str, model: Ranker, train: Examples, batches: int, p: RankerParams,
                    device: torch.device, progress: Progress) -> Figure:
    """The contrast: the same steps as train_passes, but every table with dense gradients and one Adam on all
    parameters. CONTRAST_WARMUP untimed batches, then up to `batches` timed ones (fewer if the rows run out)."""
    for lookup in model.lookups.values():
        lookup.table.sparse = False  # EmbeddingBag.forward reads it on each call: a dense (rows, d) gradient
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    model.train()
    n = min(len(train), (CONTRAST_WARMUP + batches) * p.batch_size)
    task = progress.add_task(f"{name}: dense gradients + Adam", total=-(-n // p.batch_size))
    examples, timed, started = 0, 0, 0.0  # counted from the first timed batch
    for step, batch in enumerate(head(train, n).batches(p.batch_size)):
        if step == CONTRAST_WARMUP:
            reset_peak(device)
            examples, timed, started = 0, 0, time.perf_counter()
        batch = to_device(batch, device)
        with autocast(device):
            logits, _ = model(batch)
        loss = bce(logits, batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # as train_passes: one sync per step
        examples, timed = examples + len(batch["label"]), timed + 1
        progress.advance(task)
    if not started:
        raise RuntimeError(f"dense contrast: {n:,} examples make no batch past the {CONTRAST_WARMUP} warm-up "
                           f"batches of {p.batch_size:,}")
    return Figure(name, f"dense grads + Adam, {table_rows(model):,} table rows, {timed} batches",
                  examples, time.perf_counter() - started, peak(device))


# ---------------------------------------------------------------------------------------------- report


def results_table(figures: list[Figure], device: torch.device, pipeline_rate: float, baseline_rate: float) -> Table:
    table = Table(title=f"ranker throughput on {device.type}")
    columns = ["figure", "what", "examples", "seconds", "examples/s", "x baseline", "pipeline / this"]
    if device.type == "cuda":
        columns.append("peak CUDA memory")
    for column in columns:
        table.add_column(column, justify="left" if column in ("figure", "what") else "right")
    for f in figures:
        training = f.name not in ("pipeline", "build")
        row = [f.name, f.what, f"{f.examples:,}", f"{f.seconds:.2f}", f"{f.rate:,.0f}",
               f"{f.rate / baseline_rate:.2f}x" if training else "",
               f"{pipeline_rate / f.rate:,.1f}x" if training else ""]
        if device.type == "cuda":
            row.append("" if f.peak_bytes is None else f"{f.peak_bytes / 2**30:.2f} GiB")
        table.add_row(*row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help=f"cuda: batch {CUDA_BATCH:,} and peak CUDA memory per pass")
    parser.add_argument("--examples", type=int, default=None,
                        help=f"training rows timed per figure (default {CPU_EXAMPLES:,} on CPU, the whole "
                             f"training window on CUDA)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="table rows of the large-table figure")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline passes, best one counts")
    parser.add_argument("--dense-contrast", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the large-table model with dense gradients + Adam")
    parser.add_argument("--contrast-batches", type=int, default=40,
                        help="timed batches of the dense contrast (each step updates all --rows rows)")
    parser.add_argument("--ne", action=argparse.BooleanOptionalAction, default=True,
                        help="train the baseline and the default on the whole window and compare their NE")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="git revision whose code, at its default settings, is the baseline")
    parser.add_argument("--seed", type=int, default=0, help="random SemID codes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core); on a busy machine "
                             "1 thread can be several times faster than 2 that wait for each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ParamsError as exc:
        sys.exit(f"--device {args.device}: {exc}")
    p = RankerParams(device=args.device)
    if device.type == "cuda":
        p = dataclasses.replace(p, batch_size=CUDA_BATCH)
    today = dataclasses.replace(p, **BASELINE_SETTINGS)
    load_before = os.getloadavg()
    threads = torch.get_num_threads()

    progress = Progress(SpinnerColumn(), "{task.description}", BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    with tempfile.TemporaryDirectory(prefix="semid-bench-") as tmp, progress:
        task = progress.add_task("generate the default synthetic world", total=None)
        run_generate(dataclasses.replace(WorldParams(), days=60), Layout(Path(tmp)))
        progress.update(task, total=1, completed=1)
        data = Layout(Path(tmp)).raw
        items = pl.read_parquet(data.items, columns=["item_id"])["item_id"]
        store = random_store(items, args.seed)
        vocabulary = torch.from_numpy(np.sort(items.to_numpy()))
        window, eval_window = ranker_window(p, data)
        train, figures, history_s = time_pipeline(data, window, store, p, args.repeats, progress)
        evaluation = load_examples(data, *eval_window, store, p, "evaluation")
        n = min(len(train), args.examples or (CPU_EXAMPLES if device.type == "cpu" else len(train)))
        build = lambda q, rows=None: initial_model(q, train, CODEBOOK_SIZE, LEVELS, vocabulary,  # noqa: E731
                                                   rows).to(device)

        task = progress.add_task(f"baseline: {args.baseline_rev}'s code at batch {today.batch_size} (subprocess)",
                                 total=1)
        pickled = Path(tmp) / "examples.pkl"
        with open(pickled, "wb") as f:
            pickle.dump((train, evaluation, vocabulary, CODEBOOK_SIZE, LEVELS), f)
        baseline = time_revision(revision_tree(args.baseline_rev, Path(tmp) / "baseline"), pickled,
                                 BASELINE_SETTINGS, n, device, args.ne)
        figures.append(Figure("baseline", f"{args.baseline_rev}'s code, batch {today.batch_size}, torch tables",
                              baseline["examples"], baseline["examples"] / baseline["examples_per_s"]))
        progress.update(task, completed=1)

        model = build(p)
        default_rows = table_rows(model)
        figures.append(time_training("default", f"this code, batch {p.batch_size:,}", model, train, n, p, device))
        flops = flops_per_example(build(p), train, p, device)
        figures.append(time_training("batch 256", "this code at the baseline's settings", build(today), train, n,
                                     today, device))
        if device.type == "cpu":  # ranker.tables torchrec trains on the CPU only (fbgemm-gpu-cpu)
            torchrec = dataclasses.replace(p, tables="torchrec")
            figures.append(time_training("torchrec", f"this code, batch {p.batch_size:,}, TorchRec fused tables",
                                         build(torchrec), train, n, torchrec, device))
        big_name = f"{args.rows / 1e6:g}M rows"
        figures.append(time_training(big_name, f"this code, batch {p.batch_size:,}", build(p, args.rows), train, n,
                                     p, device))
        if args.dense_contrast:
            figures.append(time_dense_adam(f"{big_name}, dense", build(p, args.rows), train, args.contrast_batches,
                                           p, device, progress))
        ne = None
        if args.ne:
            task = progress.add_task("NE: the default trained on the whole window", total=1)
            ne = ne_after_training(p, train, evaluation, vocabulary_layout(vocabulary, Path(tmp) / "layout"),
                                   CODEBOOK_SIZE, LEVELS, device)
            progress.update(task, completed=1)
        task = progress.add_task("the machine's matmul rate", total=1)
        matmul = matmul_gflops(device)
        progress.update(task, completed=1)
    load_after = os.getloadavg()

    by_name = {f.name: f for f in figures}
    pipeline, default, base = by_name["pipeline"], by_name["default"], by_name["baseline"]
    ratio, speedup = pipeline.rate / default.rate, default.rate / base.rate
    achieved = flops * default.rate / 1e9
    console.print(f"data: default synthetic world, {len(items):,} items with random SemIDs (L={LEVELS}, "
                  f"K={CODEBOOK_SIZE}, seed {args.seed}); training window [{window.start:%Y-%m-%d}, "
                  f"{window.end:%Y-%m-%d}): {len(train):,} examples, evaluation {len(evaluation):,}; history "
                  f"T={p.history.length}; {p.item_ids}/{p.parameterization} item rows, {p.history.aggregation} "
                  f"history; default batch {p.batch_size:,} (lr {p.lr:g}, sparse_lr {p.sparse_lr:g}), table "
                  f"{default_rows:,} rows")
    console.print(f"device {device}; threads: torch {threads}, polars {pl.thread_pool_size()}; 1-min load "
                  f"average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end, on "
                  f"{os.cpu_count()} cores (other processes skew the timings)")
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        console.print("[yellow]the machine was busy: these figures understate a quiet machine's (training with "
                      "several torch threads suffers most; compare --threads 1)[/]")
    console.print(results_table(figures, device, pipeline.rate, base.rate))
    verdict = lambda met: "[green]met[/]" if met else "[red]missed[/]"  # noqa: E731
    console.print(f"default / baseline: {speedup:.2f}x - goal >= {SPEEDUP_GOAL:g}x: {verdict(speedup >= SPEEDUP_GOAL)}")
    if ne is not None:
        gap = ne - baseline["ne"]
        console.print(f"NE on the evaluation window: default {ne:.5f}, baseline {baseline['ne']:.5f} ({gap:+.5f}; "
                      f"goal: at most +{NE_TOLERANCE:g}): {verdict(gap <= NE_TOLERANCE)}")
    console.print(f"pipeline / training (default): {ratio:.1f}x - goal >= {PIPELINE_GOAL:g}x: "
                  f"{verdict(ratio >= PIPELINE_GOAL)}")
    console.print(f"matrix products: {flops / 1e6:.2f} MFLOP per example (forward + backward), {achieved:.1f} GFLOP/s "
                  f"at the default's rate = {100 * achieved / matmul:.1f}% of this machine's {matmul:,.0f} GFLOP/s "
                  f"({MATMUL_SIZE}-square {'bf16' if device.type == 'cuda' else 'fp32'} product)")

    # plain lines for a README
    peak_text = lambda f: "" if f.peak_bytes is None else f", peak {f.peak_bytes / 2**30:.2f} GiB"  # noqa: E731
    print()
    print(f"ranker benchmark, {device.type}, torch threads {threads}, load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f} on {os.cpu_count()} cores")
    print(f"pipeline, load_examples (parquet + history + codes): {pipeline.rate:,.0f} examples/s "
          f"({pipeline.examples:,} examples, best of {args.repeats})")
    print(f"pipeline, build_examples on pre-read events: {by_name['build'].rate:,.0f} examples/s "
          f"(click_history {history_s:.2f} s of {by_name['build'].seconds:.2f} s)")
    for f in figures:
        if f.name not in ("pipeline", "build"):
            print(f"training, {f.name} ({f.what}): {f.rate:,.0f} examples/s over {f.examples:,} examples"
                  f"{peak_text(f)}")
    figures_json = {
        "train_examples_per_s": round(default.rate), "baseline_train_examples_per_s": round(base.rate),
        "speedup": round(speedup, 2), "pipeline_examples_per_s": round(pipeline.rate), "device": device.type,
        "threads": threads, "batch_size": p.batch_size, "baseline_rev": args.baseline_rev,
        "batch256_train_examples_per_s": round(by_name["batch 256"].rate),
        "torchrec_train_examples_per_s": round(by_name["torchrec"].rate) if "torchrec" in by_name else None,
        "large_table_train_examples_per_s": round(by_name[big_name].rate),
        "ne": None if ne is None else round(ne, 5), "baseline_ne": None if ne is None else round(baseline["ne"], 5),
        "mflop_per_example": round(flops / 1e6, 3), "achieved_gflops": round(achieved, 2),
        "matmul_gflops": round(matmul, 1), "peak_bytes": default.peak_bytes,
    }
    print(json.dumps(figures_json))


if __name__ == "__main__":
    main()

"""How fast does the ranker train, and does the data pipeline keep up with it?
`python benchmarks/ranker.py [--device cpu|cuda] [--examples N] [--rows R] [--repeats N] [--contrast-batches N]
                             [--no-dense-contrast] [--seed S]`

Data: the default synthetic world's first 60 days (components.data.world.run_generate), about 20k impressions
a day, written to a temp dir in a few seconds); its data/raw is read as the stage reads data/validated (same
layout, and the world is valid). SemIDs: a store built in memory with seeded random codes, L=3 levels of
K=256, for every item, so no MiniLM or RQ-VAE is needed: throughput does not depend on which codes an item
has, only on how many (each code prefix is one table row, prefix_ngram by default).

Figures, RankerParams defaults unless said (training window ranker_window: 42 days, history T=20, bypass):

1  pipeline     load_examples over the training window (parquet read + click history + SemID codes), best of
                --repeats; and build_examples alone on events read beforehand (history prepared inside)
2  default      train_passes on the first --examples rows of the window, the model built as run_train_ranker
                builds it (model_config, Ranker, dense standardisation; H = training items / 3), after a
                short warm-up; examples/s and pipeline / training (goal: the pipeline >= 3x faster)
3  2M rows      the same with the SemID table sized to --rows (2,000,000) rows: sparse gradients + Adagrad
                keep the cost per step independent of the table size; for contrast (--dense-contrast, on by
                default) a few batches of the same model with dense gradients (EmbeddingBag sparse=False) and
                Adam on every parameter, whose cost per step grows with the table (docs/design-notes.md,
                "Sparse gradients": ~25x slower at batch 4,096; more at the stage's batch 256)

--device cuda runs the same figures on the GPU at batch 65,536 (RankerParams.batch_size overridden) on the
whole training window by default, and adds each pass's peak torch.cuda.max_memory_allocated(). The CPU path
never touches CUDA. The load average is printed at the start and the end: other processes skew the timings,
training with 2 torch threads most (measured on the 2-core machine with another training job running: a batch-256
step took ~10 ms with 1 thread and 40-400 ms with 2, threads spinning while they wait for each other; --threads 1
shows what one core does on a busy machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
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
from components.ranker.train_ranker import model_config  # noqa: E402
from components.ranker.training import train_passes  # noqa: E402
from components.semid.store import SemIdStore, code_columns, code_dtype  # noqa: E402
from components.storage import DataDir, Layout  # noqa: E402
from components.window import Window  # noqa: E402

LEVELS, CODEBOOK_SIZE = 3, 256  # L, K of the random SemIDs
CPU_EXAMPLES = 200_000  # training rows timed on CPU (~5-10 s a figure on 2 cores)
CUDA_BATCH = 65_536
WARMUP_BATCHES = {"cpu": 20, "cuda": 2}  # untimed steps before each timed pass
CONTRAST_WARMUP = 3
PIPELINE_GOAL = 3.0  # pipeline examples/s >= 3x training examples/s

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
    figures.append(Figure("pipeline", "build_examples on pre-read events", len(built), seconds))
    del built
    history_s, _ = best_of(repeats, lambda: click_history(clicks, store), progress, "pipeline: click_history alone")
    return train, figures, history_s


# ---------------------------------------------------------------------------------------------- training


def build_model(p: RankerParams, train: Examples, vocabulary: torch.Tensor, device: torch.device,
                rows: int | None = None) -> Ranker:
    """The ranker as run_train_ranker builds it; `rows` resizes the rh and SemID tables."""
    torch.manual_seed(p.seed)
    config = model_config(p, train, CODEBOOK_SIZE, LEVELS, len(vocabulary))
    if rows is not None:
        config["rows"]["rh"] = config["rows"]["semid"] = rows
    model = Ranker(config, vocabulary)
    dense = torch.from_numpy(train.dense)
    if dense.shape[1]:
        model.dense_mean.copy_(dense.mean(0))
        model.dense_std.copy_(dense.std(0).clamp_min(1e-6))
    return model.to(device)


def table_rows(model: Ranker) -> int:
    return sum(lookup.rows for lookup in model.lookups.values())


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_training(name: str, model: Ranker, train: Examples, n: int, p: RankerParams,
                  device: torch.device) -> Figure:
    """train_passes on the first n rows after WARMUP_BATCHES untimed steps; the stage's own seconds."""
    train_passes(model, head(train, WARMUP_BATCHES[device.type] * p.batch_size), p, device)
    reset_peak(device)
    result = train_passes(model, head(train, n), p, device)
    rows = table_rows(model)
    seconds = result["examples"] / result["examples_per_s"]  # the stage's figure, unrounded seconds
    return Figure(name, f"train_passes, sparse grads + Adagrad, {rows:,} table rows", result["examples"], seconds,
                  peak(device))


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


def results_table(figures: list[Figure], device: torch.device, pipeline_rate: float) -> Table:
    table = Table(title=f"ranker throughput on {device.type}")
    columns = ["figure", "what", "examples", "seconds", "examples/s", "pipeline / this"]
    if device.type == "cuda":
        columns.append("peak CUDA memory")
    for column in columns:
        table.add_column(column, justify="left" if column in ("figure", "what") else "right")
    for f in figures:
        ratio = "" if f.name == "pipeline" else f"{pipeline_rate / f.rate:,.1f}x"
        row = [f.name, f.what, f"{f.examples:,}", f"{f.seconds:.2f}", f"{f.rate:,.0f}", ratio]
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
    parser.add_argument("--rows", type=int, default=2_000_000, help="table rows of figure 3")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline passes, best one counts")
    parser.add_argument("--dense-contrast", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the figure-3 model with dense gradients + Adam")
    parser.add_argument("--contrast-batches", type=int, default=40,
                        help="timed batches of the dense contrast (each step updates all --rows rows)")
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
        window, _ = ranker_window(p, data)
        train, figures, history_s = time_pipeline(data, window, store, p, args.repeats, progress)

        n = min(len(train), args.examples or (CPU_EXAMPLES if device.type == "cpu" else len(train)))
        model = build_model(p, train, vocabulary, device)
        default_rows = table_rows(model)
        figures.append(time_training("default", model, train, n, p, device))
        del model
        model = build_model(p, train, vocabulary, device, rows=args.rows)
        big_name = f"{args.rows / 1e6:g}M rows"
        figures.append(time_training(big_name, model, train, n, p, device))
        del model
        if args.dense_contrast:
            model = build_model(p, train, vocabulary, device, rows=args.rows)
            figures.append(time_dense_adam(f"{big_name}, dense", model, train, args.contrast_batches, p, device,
                                           progress))
            del model
    load_after = os.getloadavg()

    pipeline, build, default, big = figures[:4]
    ratio = pipeline.rate / default.rate
    met = ratio >= PIPELINE_GOAL
    console.print(f"data: default synthetic world, {len(items):,} items with random SemIDs (L={LEVELS}, "
                  f"K={CODEBOOK_SIZE}, seed {args.seed}); training window [{window.start:%Y-%m-%d}, "
                  f"{window.end:%Y-%m-%d}): {len(train):,} examples, history T={p.history.length}; "
                  f"{p.item_ids}/{p.parameterization} item rows, {p.history.aggregation} history, batch "
                  f"{p.batch_size:,}; default table {default_rows:,} rows")
    console.print(f"device {device}; threads: torch {threads}, polars {pl.thread_pool_size()}; 1-min load "
                  f"average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end, on "
                  f"{os.cpu_count()} cores (other processes skew the timings)")
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        console.print("[yellow]the machine was busy: these figures understate a quiet machine's (training with "
                      "several torch threads suffers most; compare --threads 1)[/]")
    console.print(results_table(figures, device, pipeline.rate))
    console.print(f"pipeline / training (default config): {ratio:.1f}x - goal >= {PIPELINE_GOAL:g}x: "
                  + ("[green]met[/]" if met else "[red]missed[/]"))

    # plain lines for a README
    peak_text = lambda f: "" if f.peak_bytes is None else f", peak {f.peak_bytes / 2**30:.2f} GiB"  # noqa: E731
    print()
    print(f"ranker benchmark, {device.type}, batch {p.batch_size:,}, torch threads {threads}, load "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    print(f"pipeline, load_examples (parquet + history + codes): {pipeline.rate:,.0f} examples/s "
          f"({pipeline.examples:,} examples, best of {args.repeats})")
    print(f"pipeline, build_examples on pre-read events: {build.rate:,.0f} examples/s "
          f"(click_history {history_s:.2f} s of {build.seconds:.2f} s)")
    for f in figures[2:]:
        print(f"training, {f.name} ({f.what}): {f.rate:,.0f} examples/s over {f.examples:,} examples"
              f"{peak_text(f)}")
    print(f"pipeline / training: {ratio:.1f}x default, {pipeline.rate / big.rate:.1f}x {big.name} "
          f"(goal >= {PIPELINE_GOAL:g}x: {'met' if met else 'missed'})")
    if args.dense_contrast:
        dense = figures[4]
        print(f"sparse / dense gradients at {big.name}: {big.rate / dense.rate:,.0f}x")


if __name__ == "__main__":
    main()

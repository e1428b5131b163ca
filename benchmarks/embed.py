"""How much does the embed stage cost over the bare model? `python benchmarks/embed.py [--items N] [--repeats R]`

Takes N items of the default synthetic world (params.yaml defaults; the items only, no events) as
data/validated in a temp dir, loads all-MiniLM-L6-v2 once (excluded from the timings, like the weights hash
that names the encoder version), then times, R times each in turns and keeping the best:
- `run_embed` with minilm from an empty cache, end to end (read items, content hashes, cache lookup, encode,
  write parquet + metrics);
- sentence-transformers' own `model.encode` on the same texts at the same batch size.
Goal: run_embed at >= 0.95 of the bare model's items/s. Then 1% new items arrive and the incremental re-run
is timed with the number of items it encoded. torch keeps its default thread count on both sides.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.data import contracts  # noqa: E402
from components.data.world import load_taxonomy, make_items  # noqa: E402
from components.params import EmbedParams, WorldParams  # noqa: E402
from components.semid import embedding  # noqa: E402
from components.storage import Layout  # noqa: E402


def world_items(n: int) -> pl.DataFrame:
    """The first n items (by creation) of the default world: the same rows `semid generate` writes."""
    p = WorldParams()
    items = contracts.conform_items(make_items(p, load_taxonomy(), np.random.default_rng(p.seed)))
    if n > len(items):
        sys.exit(f"--items {n}: the default world has only {len(items):,} items")
    return items.head(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=EmbedParams().batch_size)
    args = parser.parse_args()
    params = EmbedParams(encoder="minilm", batch_size=args.batch_size)

    grown = world_items(args.items + max(1, args.items // 100))
    items = grown.head(args.items)
    # The texts run_embed encodes from an empty cache: one per distinct text, in item_id order.
    texts = items.sort("item_id").unique("text", keep="first", maintain_order=True)["text"].to_list()

    import torch  # after argument parsing, so --help stays fast

    started = time.perf_counter()
    model = embedding.minilm_model()
    model.encode(texts[:8], batch_size=args.batch_size)  # warm-up
    print(f"model load + warm-up: {time.perf_counter() - started:.1f} s (excluded); torch threads: "
          f"{torch.get_num_threads()}")
    started = time.perf_counter()
    embedding.minilm_version()
    print(f"weights hash for encoder_version: {time.perf_counter() - started:.2f} s (once per process, excluded)")
    print(f"{len(items):,} items, {len(texts):,} distinct texts, batch size {args.batch_size}")

    bare, stage = [], []
    with tempfile.TemporaryDirectory(prefix="semid-bench-") as tmp:
        layout = Layout(Path(tmp))
        layout.validated.write_items(items)
        for _ in range(args.repeats):
            started = time.perf_counter()
            model.encode(texts, batch_size=args.batch_size,
                         show_progress_bar=len(texts) >= embedding.PROGRESS_MIN_TEXTS)
            bare.append(time.perf_counter() - started)
            layout.embeddings.unlink(missing_ok=True)  # an empty cache: every text is encoded
            started = time.perf_counter()
            metrics = embedding.run_embed(params, layout)
            stage.append(time.perf_counter() - started)
            assert metrics["embedded"] == len(items) and metrics["texts_encoded"] == len(texts)

        layout.validated.write_items(grown)
        started = time.perf_counter()
        again = embedding.run_embed(params, layout)
        incremental = time.perf_counter() - started

    bare_rate, stage_rate = len(items) / min(bare), len(items) / min(stage)
    ratio = stage_rate / bare_rate
    print(f"model.encode (bare):  {min(bare):6.2f} s  {bare_rate:7.1f} items/s   (runs: "
          f"{', '.join(f'{s:.2f}' for s in bare)} s)")
    print(f"run_embed (stage):    {min(stage):6.2f} s  {stage_rate:7.1f} items/s   (runs: "
          f"{', '.join(f'{s:.2f}' for s in stage)} s; phases of the last: {metrics['seconds']})")
    print(f"ratio stage/bare: {ratio:.3f} ({'meets' if ratio >= 0.95 else 'misses'} the 0.95 goal)")
    print(f"incremental re-run with {len(grown) - len(items)} new items (1%): {incremental:.2f} s, "
          f"{again['embedded']} item(s) embedded, {again['texts_encoded']} text(s) encoded, "
          f"{again['reused']:,} reused")


if __name__ == "__main__":
    main()

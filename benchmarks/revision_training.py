"""Training rate and NE of the ranker in the `components` package first on sys.path, on examples that
benchmarks/ranker.py pickled. The benchmark imports these functions for the current code and runs this file, with
PYTHONPATH on an earlier revision's `components` (git archive), for its baseline: "today's" throughput measured in
the same run, on the same examples and machine, as the current code's.

`PYTHONPATH=TREE python benchmarks/revision_training.py EXAMPLES.pkl --batch-size 256 --lr 0.001 --sparse-lr 0.2
    --timed 200000 --warmup-batches 20 [--device cpu|cuda] [--threads N] [--ne]`
prints one JSON line: examples_per_s, examples, ne (null without --ne).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import tempfile
from pathlib import Path

import polars as pl
import torch

from components.params import RankerParams
from components.ranker.evaluation import predict
from components.ranker.examples import Examples
from components.ranker.metrics import normalized_entropy
from components.ranker.model import Ranker
from components.ranker.train_ranker import build_model
from components.ranker.training import train_passes
from components.storage import Layout


def vocabulary_layout(vocabulary: torch.Tensor, directory: Path) -> Layout:
    """A workspace whose validated items are `vocabulary`: where train_ranker.build_model (in every revision) reads
    the IE vocabulary."""
    layout = Layout(directory)
    layout.validated.items.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"item_id": vocabulary.numpy()}).write_parquet(layout.validated.items)
    return layout


def widened(examples: Examples) -> Examples:
    """Codes and age buckets as int64, as every revision reads them (the compact types came with 6a02e77)."""
    return dataclasses.replace(examples, codes=examples.codes.astype("int64"),
                               hist_codes=examples.hist_codes.astype("int64"),
                               hist_age=examples.hist_age.astype("int64"))


def training_rate(model: Ranker, train: Examples, p: RankerParams, device: torch.device, timed: int,
                  warmup_batches: int) -> tuple[int, float]:
    """train_passes on the first `timed` rows after `warmup_batches` untimed steps: (examples, seconds)."""
    train_passes(model, train.take(slice(0, warmup_batches * p.batch_size)), p, device)
    result = train_passes(model, train.take(slice(0, timed)), p, device)
    return result["examples"], result["examples"] / result["examples_per_s"]  # the stage's own figure


def ne_after_training(p: RankerParams, train: Examples, evaluation: Examples, layout: Layout, K: int, L: int,
                      device: torch.device) -> float:
    """A fresh model built and trained as the stage does on the whole training window; its NE on the evaluation
    one."""
    model = build_model(p, train, K, L, layout).to(device)
    train_passes(model, train, p, device)
    probs, _ = predict(model, evaluation, 4096, device)
    return normalized_entropy(evaluation.label, probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", help="pickle of (train, evaluation, vocabulary, K, L)")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--sparse-lr", type=float, required=True)
    parser.add_argument("--timed", type=int, required=True, help="training rows timed")
    parser.add_argument("--warmup-batches", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ne", action="store_true", help="also train on the whole window and give the NE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.examples, "rb") as f:
        train, evaluation, vocabulary, K, L = pickle.load(f)
    train, evaluation = widened(train), widened(evaluation)
    p = dataclasses.replace(RankerParams(), device=args.device, batch_size=args.batch_size, lr=args.lr,
                            sparse_lr=args.sparse_lr)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as directory:
        layout = vocabulary_layout(vocabulary, Path(directory))
        examples, seconds = training_rate(build_model(p, train, K, L, layout).to(device), train, p, device,
                                          args.timed, args.warmup_batches)
        ne = ne_after_training(p, train, evaluation, layout, K, L, device) if args.ne else None
    print(json.dumps({"examples_per_s": examples / seconds, "examples": examples, "ne": ne}))


if __name__ == "__main__":
    main()

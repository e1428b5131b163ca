"""The ranker's training loop: ranker.epochs time-ordered passes, Adam on the dense parameters and Adagrad on the
embedding tables (sparse gradients: dense updates of a 2M-row table are 123x slower, README "Benchmarks"), in one
process or as one worker of a data-parallel group (components/ranker/distributed.py)."""
from __future__ import annotations

import itertools
import math
import time
import warnings

import numpy as np
import torch
from rich.progress import Progress

from components.params import RankerParams
from components.ranker.device import autocast, to_device
from components.ranker.examples import Examples
from components.ranker.model import Ranker, bce


def train_passes(model: Ranker, train: Examples, p: RankerParams, device: torch.device, rank: int = 0,
                 world: int = 1) -> dict:
    """ranker.epochs passes over the training examples, each in time order (the paper's one pass by default);
    returns throughput and the loss curve. With world > 1 (components/ranker/distributed.py) this is worker
    `rank` of a process group: it trains rows rank, rank + world, ... of each batch, its loss is their share of the
    batch mean, and the workers' gradients are summed (`parallel`), so every worker takes the whole batch's step;
    the curve is the workers' mean loss."""
    dense = model.dense_parameters()
    tables = model.sparse_parameters()  # none when TorchRec's fused tables step themselves in backward
    net = parallel(model, p.sharding, world) if world > 1 else model
    dense_opt = torch.optim.Adam(dense, lr=p.lr, fused=True)  # one kernel for all parameters
    sparse_opt = torch.optim.Adagrad(tables, lr=p.sparse_lr) if tables else None
    # Adagrad builds its sparse updates from coalesced gradients: torch's note on skipped checks is noise here.
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    model.train()
    losses, curve, started = [], [], time.perf_counter()
    steps = p.epochs * math.ceil(len(train) / p.batch_size)
    passes = (train.batches(p.batch_size) for _ in range(p.epochs))
    with Progress(transient=True, disable=rank > 0) as bar:
        task = bar.add_task(f"train ranker ({p.epochs} pass{'es' if p.epochs > 1 else ''})", total=steps)
        for step, batch in enumerate(itertools.chain.from_iterable(passes)):
            rows = len(batch["label"])
            batch = to_device({k: v[rank::world] for k, v in batch.items()} if world > 1 else batch, device)
            with autocast(device):
                logits, _ = net(batch)
            if world == 1:
                loss = bce(logits, batch["label"])
            else:  # this worker's share of the batch mean: the workers' sum is that mean
                loss = bce(logits, batch["label"], reduction="sum") / rows
            dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            dense_opt.step()
            if sparse_opt is not None:
                sparse_opt.step()
                sparse_opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step == steps - 1:
                curve.append({"step": step + 1, "loss": mean_over_workers(float(np.mean(losses[-50:])), world)})
            bar.advance(task)
    seconds = time.perf_counter() - started
    return {"examples": len(train), "seconds": round(seconds, 2),
            "examples_per_s": round(p.epochs * len(train) / seconds),
            "loss_curve": curve}


def parallel(model: Ranker, sharding: str, world: int) -> torch.nn.Module:
    """`model` as one of `world` data-parallel workers whose gradients sum: the dense parameters' through
    DistributedDataParallel with a summing hook (its own hook averages); torch tables' sparse gradients the same
    way; TorchRec's fused tables sharded over the workers by DistributedModelParallel (ranker.sharding,
    components/ranker/sharding.py), where a row's gradients from every worker meet and sum where the row lives."""
    if any(lookup.fused for lookup in model.lookups.values()):
        from components.ranker.sharding import shard_tables
        net = shard_tables(model, sharding, world)
        ddp = net._dmp_wrapped_module  # DMP's DistributedDataParallel over the dense parameters
    else:
        net = ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, summed)
    return net


def summed(_, bucket):  # no annotations: DDP checks them against its own classes, which postponed ones are not
    """DistributedDataParallel's all-reduce of a GradBucket, without its division by the number of workers."""
    reduced = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return reduced.then(lambda future: future.value()[0])


def mean_over_workers(value: float, world: int) -> float:
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return float(total) / world

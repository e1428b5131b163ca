"""Data-parallel training of the ranker on Ray Train (engine.kind: ray), the single-process loop's twin.

Every worker builds the same model from the same initial weights, takes an equal slice of each global batch
(rows rank, rank + N, ... of ranker.batch_size consecutive examples) and trains it through `train_passes`, where
the workers' gradients sum to the full batch's mean gradient: each step is the one process's step, up to float
summation order. Backend gloo on CPU workers. Torch tables are replicated and their sparse gradients stay sparse
in DistributedDataParallel's all-reduce; TorchRec tables (ranker.tables: torchrec) are sharded over the workers
by DistributedModelParallel instead (components/ranker/sharding.py), so a table need not fit one worker. NCCL
has no sparse all-reduce and fbgemm-gpu-cpu has no GPU kernels, so GPU workers are not offered here.
Worker 0 hands the trained weights back through a Ray Train checkpoint (sharded tables gathered whole);
evaluation and promotion stay with the stage, in the driver.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from components import engine
from components.params import EngineParams, RankerParams
from components.ranker.examples import Examples
from components.ranker.model import Ranker
from components.ranker.promotion import build_ranker
from components.ranker.sharding import gathered_state
from components.ranker.training import train_passes

log = logging.getLogger(__name__)

WEIGHTS = "ranker.pt"


def train_worker(config: dict) -> None:
    """One Ray Train worker: the model from the driver's initial weights, its slice of every batch, DDP."""
    import ray
    import ray.train

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = build_ranker(config["model_config"])
    model.load_state_dict(config["state"])
    training = train_passes(model, ray.get(config["examples"]), config["params"], torch.device("cpu"), rank, world)
    fused = any(lookup.fused for lookup in model.lookups.values())
    state = gathered_state(model, rank) if fused else model.state_dict()  # sharded tables: gathered on worker 0
    if rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, Path(directory) / WEIGHTS)
            ray.train.report({"seconds": training["seconds"], "loss_curve": training["loss_curve"]},
                             checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report({"seconds": training["seconds"], "loss_curve": training["loss_curve"]})


def train_on_ray(model: Ranker, train: Examples, p: RankerParams, engine_params: EngineParams,
                 scratch: Path) -> dict:
    """Train `model` in place with engine.workers data-parallel Ray Train workers (default: one per CPU of the
    cluster); Ray Train's run directory is a temporary one in `scratch` (the workspace's models/, which every
    worker sees). Returns throughput and the loss curve like train_passes."""
    ray = engine.start_ray(engine_params)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = engine_params.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".ray-train.{os.getpid()}-run", suffix=".tmp", dir=scratch) as storage:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"model_config": model.config, "state": model.state_dict(), "examples": ray.put(train),
                               "params": p, "threads": 1},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="train_ranker", storage_path=str(Path(storage).resolve())))
        log.info("training on Ray: %d data-parallel worker(s), gloo%s", workers,
                 f", TorchRec tables {p.sharding}" if p.tables == "torchrec" else "")
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            model.load_state_dict(torch.load(Path(directory) / WEIGHTS, weights_only=True))
    seconds = result.metrics["seconds"]
    return {"examples": len(train), "seconds": round(seconds, 2),
            "examples_per_s": round(p.epochs * len(train) / seconds), "loss_curve": result.metrics["loss_curve"],
            "workers": workers}

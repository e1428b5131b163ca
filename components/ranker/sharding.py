"""TorchRec tables split over data-parallel workers (ranker.tables: torchrec with engine.kind: ray): the ranker
wrapped in TorchRec's DistributedModelParallel, for tables that do not fit one worker.

    row_wise    each table's rows split evenly over the workers: a lookup's pooled sums are reduce-scattered to
                the worker that asked, its gradients all-gathered back to the workers that hold the rows
    table_wise  each table whole on one worker (round robin): lookups and their gradients go by all-to-all

The dense parameters are replicated (DistributedDataParallel inside DMP). Both use FBGEMM's fused kernel: the
row-wise Adagrad of ranker.sparse_lr is applied where a row lives, in backward, on the sum of every worker's
gradient for it. On CPU and gloo (fbgemm-gpu-cpu 1.8) row-wise sharding all-gathers gradients, which gloo only does
for equal sizes, so every worker pools as many bags as the largest one (ItemLookup.equal_bags).
"""
from __future__ import annotations

import warnings

import torch
from torch import distributed as dist
from torch import nn

from components.ranker.model import Ranker

SHARDINGS = ("row_wise", "table_wise")


def shard_tables(model: Ranker, sharding: str, world: int) -> nn.Module:
    """`model` with its fused tables sharded over the process group's `world` workers (in place: the lookups'
    tables become ShardedFusedEmbeddingBagCollections) and its dense parameters data-parallel."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    warnings.filterwarnings("ignore", message="Compute Kernel is dense")  # TorchRec's note about caching
    plan = {}
    for index, (kind, lookup) in enumerate(sorted(model.lookups.items())):
        place = row_wise(compute_kernel="fused") if sharding == "row_wise" else \
            table_wise(rank=index % world, compute_kernel="fused")
        plan[f"lookups.{kind}.table"] = construct_module_sharding_plan(
            lookup.table, {kind: place}, local_size=world, world_size=world, device_type="cpu")
        lookup.equal_bags = sharding == "row_wise"
    start = {key: value.clone() for key, value in model.state_dict().items()}
    net = DistributedModelParallel(model, device=torch.device("cpu"), plan=ShardingPlan(plan))
    for key, value in model.state_dict().items():  # sharded tables start afresh: give them the model's rows
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (row, column), (rows, columns) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(start[key][row:row + rows, column:column + columns])
    return net


def gathered_state(model: Ranker, rank: int) -> dict[str, torch.Tensor] | None:
    """The trained weights as one process's model holds them, on worker 0 (None on the others): every worker
    calls this, and each sharded table is gathered whole from the workers holding its rows."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = {}
    for key, value in model.state_dict().items():  # the same keys in the same order on every worker
        if isinstance(value, ShardedTensor):
            whole = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=whole)
            value = whole
        state[key] = value
    dist.barrier()
    return state if rank == 0 else None

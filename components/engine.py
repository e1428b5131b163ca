"""Where the parallel stages run: in this process (engine.kind: local) or on Ray (ray).

On Ray a stage splits its input into shards (row ranges of a table, or validate's batches of day partitions), and
a `ShardTask` turns each shard into a small record of what it did (embed and backfill: plus one part of a sharded
table, components/shards.py). The task's state (the CU model, the codebook, the item lookup) is built once per
actor; `run_shards` hands the shards to a pool of actors through Ray Data's `map_batches`. A task calls the same
functions the local engine runs in one process (embed_with_cache, merge_batch, check_event_batch), so the results
do not depend on the engine.

ray   `ray.init` once per process: engine.address null starts a local Ray on this machine's CPUs (no dashboard),
      else it joins the cluster at that address, whose nodes need this package installed (infra/Dockerfile).
"""
from __future__ import annotations

import abc
import json
import logging
import os

import numpy as np

from components import errors
from components.errors import ParamsError, SemidError
from components.params import EngineParams

log = logging.getLogger(__name__)

KINDS = ("local", "ray")


class ShardTask(abc.ABC):
    """One shard in (a JSON-able dict with its "index"), one record out (a JSON-able dict). Subclasses build their
    state in __init__ and do the work in `run`; `__call__` is the Ray Data batch interface."""

    @abc.abstractmethod
    def run(self, shard: dict) -> dict:
        """Process one shard; return what the stage needs to know of it."""

    def record(self, shard: dict) -> dict:
        try:
            return {**self.run(shard), "index": shard["index"]}
        except SemidError as exc:  # Ray loses an exception's type on the way back: it travels as data
            return {"index": shard["index"], "error": type(exc).__name__, "message": str(exc)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [json.dumps(self.record(json.loads(s))) for s in batch["shard"]]
        return {"record": np.array(records, dtype=object)}


def check(params: EngineParams) -> None:
    if params.kind not in KINDS:
        raise ParamsError(f"engine.kind is {params.kind!r}, expected one of {list(KINDS)}")
    if params.workers is not None and params.workers < 1:
        raise ParamsError(f"engine.workers is {params.workers}, expected null or at least 1")
    if params.shard_rows < 1:
        raise ParamsError(f"engine.shard_rows is {params.shard_rows}, expected at least 1")


def start_ray(params: EngineParams):
    """The ray module, connected: to engine.address, or to a local Ray started now (once per process)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if params.address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=params.address, log_to_driver=False, configure_logging=False)
        log.info("ray: connected, %s CPU(s)", int(ray.cluster_resources().get("CPU", 0)))
    return ray


def run_shards(params: EngineParams, task: type[ShardTask], args: tuple, shards: list[dict],
               description: str) -> list[dict]:
    """`task(*args).run(shard)` for every shard (each with its "index") on Ray actors; the records in shard
    order, or the first task's SemidError raised here."""
    check(params)
    if not shards:
        return []
    ray = start_ray(params)
    from ray.data import ActorPoolStrategy

    actors = min(len(shards), params.workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
    dataset = ray.data.from_items([{"shard": json.dumps(s)} for s in shards], override_num_blocks=len(shards))
    mapped = dataset.map_batches(task, fn_constructor_args=args, batch_size=1, num_cpus=1,
                                 compute=ActorPoolStrategy(size=actors))
    log.info("%s: %d shard(s) on %d Ray actor(s)", description, len(shards), actors)
    records = [json.loads(r["record"]) for r in mapped.take_all()]
    return raise_failed(sorted(records, key=lambda r: r["index"]))


def raise_failed(records: list[dict]) -> list[dict]:
    """The records, unless a task failed with a SemidError: then that error, of its own class, is raised here."""
    failed = next((r for r in records if "error" in r), None)
    if failed is not None:
        raise getattr(errors, failed["error"], SemidError)(failed["message"])
    return records

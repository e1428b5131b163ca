"""TorchRec tables sharded over data-parallel workers (components/ranker/sharding.py): two gloo processes that
each train their half of a batch take the step one process takes on the whole batch, and hand back the whole
tables. One step: training from this start is chaotic (an init moved by 1e-7 ends 12 steps later with rows
0.9 apart, on torch tables in one process too), so float summation order decides more than a step's worth."""
import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import distributed as dist

from components.ranker.examples import load_examples, ranker_window
from components.ranker.promotion import build_ranker
from components.ranker.sharding import SHARDINGS, gathered_state
from components.ranker.train_ranker import current_store, initial_model
from components.ranker.training import train_passes
from test_train_ranker import SMALL, prepared  # noqa: F401 (fixture)

TORCHREC = dataclasses.replace(SMALL, tables="torchrec", batch_size=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, config: dict, state: dict, train, p, out: str) -> None:
    """One of `world` gloo processes: train its slice of each batch, save what it sees of the sharding and, on
    worker 0, the gathered weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build_ranker(config)
    model.load_state_dict(state)
    train_passes(model, train, p, torch.device("cpu"), rank, world)
    tables = {kind: lookup.table.state_dict()[f"embedding_bags.{kind}.weight"]
              for kind, lookup in model.lookups.items()}
    local_rows = {kind: sum(shard.tensor.shape[0] for shard in table.local_shards()) for kind, table in tables.items()}
    whole = gathered_state(model, rank)
    torch.save({"local_rows": local_rows, "state": whole}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def start(prepared):  # noqa: F811 (the fixture imported above)
    """A fresh torchrec model and one short batch of the small world's training examples (an odd number of rows:
    the workers pool unequal numbers of bags)."""
    store, K, L = current_store(TORCHREC, prepared)
    train_window, _ = ranker_window(TORCHREC, prepared.validated)
    train = load_examples(prepared.validated, *train_window, store, TORCHREC, "training")
    train = train.take(slice(0, TORCHREC.batch_size - 77))
    model = initial_model(TORCHREC, train, K, L, torch.zeros(1, dtype=torch.int64))
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}, train


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_sharded_workers_take_the_one_process_steps(start, sharding, tmp_path):
    config, state, train = start
    one = build_ranker(config)
    one.load_state_dict(state)
    train_passes(one, train, TORCHREC, torch.device("cpu"))

    out = str(tmp_path / "worker")
    p = dataclasses.replace(TORCHREC, sharding=sharding)
    mp.spawn(worker, args=(2, free_port(), config, state, train, p, out), nprocs=2, join=True)
    seen = [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]

    rows = {kind: lookup.rows + 1 for kind, lookup in one.lookups.items()}  # + the padding row
    for kind, total in rows.items():
        held = [s["local_rows"][kind] for s in seen]
        assert sum(held) == total  # each row lives on exactly one worker
        if sharding == "row_wise":
            assert max(held) - min(held) <= 1  # every table split over both
        else:
            assert sorted(held) == [0, total]  # every table whole on one
    gathered, expected = seen[0]["state"], one.state_dict()
    assert seen[1]["state"] is None and gathered.keys() == expected.keys()
    for key, value in expected.items():
        assert gathered[key].shape == value.shape, key
        if value.is_floating_point() and value.numel():
            moved = float((value - state[key]).abs().max())
            apart = float((gathered[key] - value).abs().max())
            # A dropped worker, a row on the wrong worker or a fresh table are as far apart as the step is long.
            assert apart <= 0.01 * moved or moved == apart == 0, f"{key}: {apart:.2e} apart, the step moved {moved:.2e}"
    assert float((gathered["top.0.weight"] - state["top.0.weight"]).abs().max()) > 1e-3  # a step was taken

"""Default-size synthetic worlds run up to the SemID store, for the drift tests and benchmarks/drift_calibration.py:
the drift thresholds are calibrated on exactly these (params.yaml defaults: MiniLM, the default RQ-VAE)."""
from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from components.data.validation import run_validate
from components.data.world import run_generate
from components.errors import DataError
from components.params import Params, WorldParams, load_params
from components.semid.backfill import run_backfill
from components.semid.embedding import run_embed
from components.semid.train_rqvae import run_train_rqvae
from components.storage import Layout

REPO = Path(__file__).resolve().parent.parent


CALIBRATION_DAYS = 60  # the drift thresholds were calibrated on 60-day worlds (README, "On call")


def default_params() -> Params:
    """params.yaml, its world cut to the calibration worlds' length."""
    p = load_params(REPO / "params.yaml")
    return dataclasses.replace(p, world=dataclasses.replace(p.world, days=CALIBRATION_DAYS))


def has_store(layout: Layout) -> bool:
    """Whether the world was built up to the SemID store of its current codebook."""
    try:
        return layout.semids.exists()
    except DataError:  # no codebook yet
        return False


def build(layout: Layout, world: WorldParams, codebook_as_of: dt.date | None = None) -> Layout:
    """generate, validate, embed, train_rqvae (its window ending codebook_as_of; default: the data's end) and
    backfill into `layout`, unless it holds a SemID store already."""
    if not has_store(layout):
        p = default_params()
        run_generate(world, layout)
        run_validate(p.validation, layout)
        run_embed(p.embed, layout)
        run_train_rqvae(dataclasses.replace(p.rqvae, as_of=codebook_as_of), layout)
        run_backfill(p.backfill, layout)
    return layout


# When each scenario starts (day of 60): a topic shift needs days of new items to move the mix of items shown; a
# flood and a concentration are seen on the day they start, against a reference that did not have them yet.
SCENARIO_START = {"topic": 50, "flood": 59, "concentration": 57}


def scenario(layout: Layout, kind: str) -> Layout:
    """The default world with the world.shift scenario `kind` (params.yaml's strength); as in production, its
    codebook was refreshed before the change and stays fixed through it."""
    world = default_params().world
    shift = dataclasses.replace(world.shift, kind=kind, start_day=SCENARIO_START[kind])
    return build(layout, dataclasses.replace(world, shift=shift), world.start + dt.timedelta(days=shift.start_day))

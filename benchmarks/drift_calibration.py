"""Where should the drift checks warn and alert? Measure them where nothing drifted, and where something did.

    python benchmarks/drift_calibration.py [--seeds 7 1 2 3 4] [--as-of-days 33 38 43 48 53 60] [--workdir DIR]

No-drift pairs: the default world (params.yaml defaults: MiniLM, the default RQ-VAE) for each seed, built once
(generate, validate, embed, train_rqvae, backfill), then the drift checks as of several days (a 1-day current
window against the 28 days before it). Scenario worlds: seed 7 with world.shift.kind topic, flood and
concentration (params.yaml's start day and strength), their codebook trained as of the start day (a refresh
before the change, fixed through it), checked as of the data's end. The worlds are tests/drift_worlds.py's, the
ones the drift tests run on. Prints, per check, the largest value
(the smallest for semid_coverage) over the no-drift pairs, each scenario's value, and today's thresholds; then one
JSON line of the figures. --workdir keeps the built worlds, so a second run only measures.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import polars as pl  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from components.monitoring import checks  # noqa: E402
from components.monitoring.drift import measure  # noqa: E402
from components.params import load_params  # noqa: E402
from components.storage import Layout  # noqa: E402
from tests.drift_worlds import build, default_params, scenario  # noqa: E402  (the tests calibrate on the same worlds)

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("topic", "flood", "concentration")


def values(layout: Layout, as_of: dt.date | None) -> dict[str, float | None]:
    p = load_params(REPO / "params.yaml").drift
    p = dataclasses.replace(p, as_of=as_of)
    summary, _ = measure(p, layout, checks.limits(p))
    return {name: c["value"] for name, c in summary["checks"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 1, 2, 3, 4])
    parser.add_argument("--as-of-days", type=int, nargs="+", default=[33, 38, 43, 48, 53, 60],
                        help="as_of as days after world.start (the current window is the day before)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built worlds here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="semid-drift-calibration-"))
    base = default_params().world
    console = Console(stderr=True)
    no_drift: dict[str, list[float]] = {c.name: [] for c in checks.CHECKS}
    for seed in args.seeds:
        layout = Layout(workdir / f"seed{seed}")
        console.rule(f"world seed {seed}")
        build(layout, dataclasses.replace(base, seed=seed))
        for day in args.as_of_days:
            found = values(layout, base.start + dt.timedelta(days=day))
            console.print(f"seed {seed} as of day {day}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in found.items() if v is not None))
            for name, value in found.items():
                if value is not None:
                    no_drift[name].append(value)
    found: dict[str, dict] = {}
    for kind in SCENARIOS:
        console.rule(f"scenario {kind}")
        found[kind] = values(scenario(Layout(workdir / f"shift-{kind}"), kind), None)
    limits = checks.limits(load_params(REPO / "params.yaml").drift)
    table = Table(title=f"Drift checks: no-drift pairs ({len(args.seeds)} seeds x {len(args.as_of_days)} days) "
                        "and scenarios")
    for column in ("check", "no-drift worst", "no-drift median", *SCENARIOS, "warn", "alert"):
        table.add_column(column, justify="left" if column == "check" else "right")
    figures = {}
    for check in checks.CHECKS:
        seen = pl.Series(no_drift[check.name], dtype=pl.Float64)
        worst = (seen.min() if check.lower_is_worse else seen.max()) if len(seen) else None
        figures[check.name] = {"no_drift_worst": worst, "no_drift_median": seen.median() if len(seen) else None,
                               **{k: found[k][check.name] for k in SCENARIOS},
                               "warn": limits[check.name].warn, "alert": limits[check.name].alert}
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(check.name, *(fmt(figures[check.name][k]) for k in
                                    ("no_drift_worst", "no_drift_median", *SCENARIOS, "warn", "alert")))
    Console(width=160).print(table)
    print(json.dumps({"seeds": args.seeds, "as_of_days": args.as_of_days, "checks": figures}))


if __name__ == "__main__":
    main()

"""`semid <stage>`: one subcommand per DVC stage (same name), plus helpers around them.

Heavy libraries are imported inside each command, so `semid --help` stays instant.
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from components.errors import SemidError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Keep Semantic IDs fresh and retrain the ranker that uses them.")

ParamsFile = Annotated[Path, typer.Option("--params", help="The params file to read (every knob, commented).")]


def stage(fn):
    """Turn a domain error into a one-line message on stderr and exit code 1 (no traceback)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except SemidError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
    return run


@app.command()
@stage
def generate(params: ParamsFile = Path("params.yaml")) -> None:
    """Write data/raw from `data.source`: the seeded synthetic world (world.* params) or a MovieLens import."""
    from components.params import load_params
    from components.storage import Layout

    p = load_params(params)
    if p.data.source == "synthetic":
        from components.world import run_generate
        run_generate(p.world, Layout())
    elif p.data.source == "movielens":
        from components.movielens import run_import
        from components.storage import staged_dir, write_json
        run_import(Path(p.data.movielens_dir), Layout())
        with staged_dir(Layout().world) as tmp:  # no ground truth: only where data/raw came from
            write_json({"source": "movielens", "directory": p.data.movielens_dir}, tmp / "world.json")
    else:
        raise SemidError(f"{params}: data.source is {p.data.source!r}, expected 'synthetic' or 'movielens'")


@app.command("import-movielens")
@stage
def import_movielens(
    directory: Annotated[Path, typer.Argument(help="A MovieLens release: ml-latest(-small), ml-25m, ml-1m or ml-100k.")],
) -> None:
    """Convert a MovieLens release into data/raw (one event per rating, clicked = rating >= 4)."""
    from components.movielens import run_import
    from components.storage import Layout

    run_import(directory, Layout())


@app.command()
@stage
def validate(params: ParamsFile = Path("params.yaml")) -> None:
    """Gate data/raw with Great Expectations; write data/validated only when it passes."""
    from components.params import load_params
    from components.storage import Layout
    from components.validation import run_validate

    run_validate(load_params(params).validation, Layout())


if __name__ == "__main__":
    app()

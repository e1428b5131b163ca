"""`semid <stage>`: one subcommand per DVC stage, named exactly as the stage in dvc.yaml (`semid train_rqvae` runs
stage train_rqvae), plus helpers around them. Hyphens work too (`semid train-rqvae`, `--endpoint_url`).

Heavy libraries are imported inside each command, so `semid --help` stays instant.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from components.errors import ParamsError, SemidError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Keep Semantic IDs fresh and retrain the ranker that uses them.",
                  context_settings={"token_normalize_func": lambda token: token.replace("-", "_")})

ParamsFile = Annotated[Path, typer.Option("--params", help="The params file to read (every knob, commented).")]
AsOf = Annotated[dt.datetime | None, typer.Option(
    "--as-of", formats=["%Y-%m-%d"], help="Run as of this day (YYYY-MM-DD), the exclusive end of what the stage "
                                          "reads; default: the stage's own date param, else loop.as_of, else the "
                                          "day after the last events day.")]


def inputs(params: Path, section: str, as_of: dt.datetime | None = None, dated: str | None = None):
    """A stage's own params section and the pipeline layout (the repository root is the working directory). With
    `dated`, the section's date field of that name is resolved: --as-of, else its own value, else loop.as_of."""
    from components.params import load_params
    from components.storage import Layout

    p = load_params(params)
    part = getattr(p, section)
    if dated is not None:
        day = as_of.date() if as_of is not None else getattr(part, dated) or p.loop.as_of
        part = dataclasses.replace(part, **{dated: day})
    return part, Layout()


def loop_day(params: Path, as_of: dt.datetime | None) -> dt.date | None:
    """--as-of, else loop.as_of (None: the stage's default, the day after the last events day)."""
    from components.params import load_params

    return as_of.date() if as_of is not None else load_params(params).loop.as_of


def stage(fn):
    """Clear what a killed run left behind (components/storage.py, sweep_temporaries), then run; turn a domain
    error into a one-line message on stderr and exit code 1 (no traceback)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        from components.storage import Layout, sweep_temporaries

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for path in sweep_temporaries(Layout()):
            logging.getLogger("semid").info("cleared %s, left by a run that was killed", path)
        try:
            return fn(*args, **kwargs)
        except SemidError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
    return run


@app.command()
@stage
def generate(params: ParamsFile = Path("params.yaml")) -> None:
    """Land data/raw from `data.source`: the seeded synthetic world (world.* params) or a MovieLens import, in
    the lake of storage.root (data/raw itself by default)."""
    from components.params import load_params
    from components.storage import Layout

    from components.data.lake import landing_in, raw_lake

    p, layout = load_params(params), Layout()
    if p.data.source not in ("synthetic", "movielens"):
        raise ParamsError(f"{params}: data.source is {p.data.source!r}, expected 'synthetic' or 'movielens'")
    if p.data.source == "movielens" and p.data.movielens_dir is None:
        raise ParamsError(f"{params}: data.movielens_dir is null; data.source 'movielens' needs the directory of "
                          f"a MovieLens release (set it in params.yaml or with -S data.movielens_dir=PATH)")
    with landing_in(raw_lake(p.storage.root, layout), layout) as into:
        if p.data.source == "synthetic":
            from components.data.world import run_generate
            run_generate(p.world, layout, into=into)
        else:
            from components.data.movielens import run_import
            from components.storage import staged_dir, write_json
            run_import(Path(p.data.movielens_dir), layout, into=into)
            with staged_dir(layout.world) as tmp:  # no ground truth: only where data/raw came from
                write_json({"source": "movielens", "directory": p.data.movielens_dir}, tmp / "world.json")


@app.command("import_movielens")
@stage
def import_movielens(
    directory: Annotated[Path, typer.Argument(
        help="A MovieLens release: ml-latest(-small), ml-25m, ml-1m or ml-100k.")],
) -> None:
    """Convert a MovieLens release into data/raw (one event per rating, clicked = rating >= 4)."""
    from components.data.movielens import run_import
    from components.storage import Layout

    run_import(directory, Layout())


@app.command()
@stage
def validate(params: ParamsFile = Path("params.yaml"), as_of: AsOf = None) -> None:
    """Gate data/raw with Great Expectations; write data/validated only when it passes."""
    from components.data.validation import run_validate
    from components.params import load_params

    run_validate(*inputs(params, "validation", as_of, dated="window_end"), load_params(params).engine)


@app.command()
@stage
def embed(params: ParamsFile = Path("params.yaml")) -> None:
    """Embed validated items with the CU model (embed.encoder); a re-run encodes only new or edited texts."""
    from components.params import load_params
    from components.semid.embedding import run_embed

    run_embed(*inputs(params, "embed"), load_params(params).engine)


Force = Annotated[bool, typer.Option("--force", envvar="SEMID_FORCE_REFRESH",
                                     help="Train a new codebook now, whatever the refresh cadence.")]


@app.command("train_rqvae")
@stage
def train_rqvae(params: ParamsFile = Path("params.yaml"), force: Force = False, as_of: AsOf = None) -> None:
    """Train new codebooks on the items active in the trailing window when a refresh is due (the first run, a
    quarterly boundary, changed params, --force, rqvae.refresh_on_drift), else keep the current ones; a new
    checkpoint is promoted only if the quality gates pass."""
    from components.semid.train_rqvae import run_train_rqvae

    run_train_rqvae(*inputs(params, "rqvae", as_of, dated="as_of"), force=force)


@app.command()
@stage
def backfill(
    params: ParamsFile = Path("params.yaml"),
    publish: Annotated[str | None, typer.Option(
        "--publish", help="Then publish the store and checkpoint to s3://bucket/prefix; the CURRENT pointer "
                          "moves only after every part is uploaded and verified.")] = None,
    endpoint_url: Annotated[str | None, typer.Option(
        "--endpoint-url", help="S3-compatible endpoint (MinIO, moto); default backfill.s3_endpoint_url, "
                               "else AWS.")] = None,
) -> None:
    """SemIDs for every embedded item under the current codebook, into data/semids/<codebook_version>.parquet
    (and, until the switch to it, into the serving codebook's store too)."""
    from components.semid.backfill import run_backfill

    from components.params import load_params

    p, layout = inputs(params, "backfill")
    run_backfill(p, layout, load_params(params).engine)
    if publish:
        from components.semid.publish import publish_current
        publish_current(layout, publish, endpoint_url or p.s3_endpoint_url)


@app.command("train_ranker")
@stage
def train_ranker(params: ParamsFile = Path("params.yaml"), as_of: AsOf = None) -> None:
    """One time-ordered pass over ranker.train_days, NE by segment on the next ranker.eval_hours, and
    champion/challenger promotion (models/serving.json switches to it and its codebook only if NE is not
    worse); a challenger is trained only when due (ranker.retrain_every_days, a new codebook)."""
    from components.ranker.train_ranker import run_train_ranker

    from components.params import load_params

    run_train_ranker(*inputs(params, "ranker"), as_of=loop_day(params, as_of), engine_params=load_params(params).engine)


@app.command()
@stage
def drift(
    params: ParamsFile = Path("params.yaml"),
    as_of: AsOf = None,
    fail_on: Annotated[str | None, typer.Option(
        "--fail-on", help="Exit 1, naming the checks, when the verdict is at least this: warn or alert. Without "
                          "it the exit status is 0 whatever the verdict (the report is the product).")] = None,
) -> None:
    """Compare the current window's item distribution with the reference window's (raw IDs, SemID prefixes,
    content, codebook, popularity, labels, features); write the on-call page reports/drift/summary.html."""
    from components.monitoring.drift import run_drift

    run_drift(*inputs(params, "drift", as_of, dated="as_of"), fail_on)



@app.command()
@stage
def publish(params: ParamsFile = Path("params.yaml"), as_of: AsOf = None) -> None:
    """Publish what serves (store, checkpoints, pointer) and the reports to storage.root, as the flows do after
    their stages; the pointer moves last, after every file it names was verified."""
    from components.data.lake import raw_days
    from components.params import load_params
    from flows.publishing import publish_run
    from components.storage import Layout

    layout = Layout()
    day = as_of.date() if as_of is not None else raw_days(layout)[-1] + dt.timedelta(days=1)
    typer.echo(json.dumps(publish_run(layout, load_params(params).storage.root, day), indent=2))


@app.command()
@stage
def remote(params: ParamsFile = Path("params.yaml"),
           name: Annotated[str, typer.Option("--name", help="The DVC remote's name.")] = "storage") -> None:
    """Make <storage.root>/dvc the default DVC remote in .dvc/config: its URL only, since credentials and the
    endpoint come from the AWS settings (AWS_ENDPOINT_URL_S3). Commit .dvc/config afterwards."""
    import subprocess

    from components.params import load_params
    from flows.publishing import publishing_lake
    from components.storage import Layout

    lake = publishing_lake(load_params(params).storage.root, Layout())
    if lake is None:
        raise ParamsError(f"{params}: storage.root is the workspace's data/, which cannot hold its own DVC remote; "
                          f"set storage.root to s3://bucket/prefix (or a directory outside the workspace)")
    url = f"{lake.url}/dvc" if lake.url.startswith("s3://") else str(Path(lake.url).resolve() / "dvc")
    proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--default", "--force", name, url],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SemidError(f"dvc remote add {name} {url} failed: {(proc.stdout + proc.stderr).strip()}")
    typer.echo(f"default DVC remote {name!r}: {url}")


@app.command()
@stage
def land(as_of: Annotated[dt.datetime, typer.Option("--as-of", formats=["%Y-%m-%d"],
                                                    help="Land what was known before this day.")],
         params: ParamsFile = Path("params.yaml")) -> None:
    """Make the raw lake (storage.root) hold what the generated stream data/stream knew before --as-of
    (`semid replay` lands day by day)."""
    from components.data.landing import land as land_stream
    from components.params import load_params
    from components.storage import Layout

    layout = Layout()
    typer.echo(land_stream(layout.stream, layout, as_of.date(), load_params(params).storage.root))


@app.command()
@stage
def replay(
    start: Annotated[dt.datetime, typer.Option("--start", formats=["%Y-%m-%d"], help="The first simulated day.")],
    days: Annotated[int, typer.Option("--days", min=1, help="How many days to run, one after the other.")],
) -> None:
    """Run the loop day after day on a simulated clock: generate the world once into data/stream, then each day
    land it into data/raw and run the daily flow; reports/loop/timeline.{csv,html} grow a row a day."""
    from flows.replay import replay as replay_flow

    replay_flow(start=start.date(), days=days, repo=str(Path.cwd()))


@app.command()
@stage
def rollback(
    to: Annotated[int | None, typer.Option("--to", help="The switch number (models/serving_log.jsonl) to go "
                                                        "back to; default: the one before the serving one.")] = None,
    unpin: Annotated[bool, typer.Option("--unpin", help="Instead: release the pin of an earlier rollback, so "
                                                        "the next winning challenger switches again.")] = False,
) -> None:
    """Point models/serving.json back at an earlier codebook + store + champion, and pin it there."""
    from components import serving
    from components.storage import Layout

    moved = serving.unpin(Layout()) if unpin else serving.rollback(Layout(), to)
    typer.echo(json.dumps(dataclasses.asdict(moved), indent=2))


@app.command("paper_report")
@stage
def paper_report(
    quick: Annotated[bool, typer.Option("--quick", help="One seed and five settings (Table 3, A/A, trigram).")] = False,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Experiments run at a time (dvc queue start -j).")] = 2,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="A ranker seed; repeat it for several "
                                                                   "(default 0 1 2, --quick: 0).")] = None,
    movielens: Annotated[Path | None, typer.Option(
        "--movielens", exists=True, file_okay=False, help="A MovieLens release's directory: measure the new-item "
        "findings on it instead (reports/paper/movielens/).")] = None,
) -> None:
    """Measure PAPER.md's findings on the default world with intervals and verdicts: `dvc repro`, then every
    setting and seed through `dvc exp run --queue`; writes reports/paper/README.md and its plots."""
    from components.paper import movielens as on_movielens
    from components.paper.report import default_seeds, run

    seeds = seeds or default_seeds(quick)
    if movielens is not None:
        on_movielens.run(movielens, jobs, seeds)
    else:
        run(quick, jobs, seeds)


@app.command("serving")
@stage
def show_serving() -> None:
    """Print what serves now (models/serving.json) and every switch before it."""
    from components import serving
    from components.storage import Layout

    layout = Layout()
    live = serving.resolve(layout)
    for entry in serving.history(layout):
        mark = "*" if entry.seq == live.seq else " "
        typer.echo(f"{mark} {entry.seq:>3}  as of {entry.as_of}  codebook {entry.codebook_version}  "
                   f"champion {entry.champion}")
    typer.echo(json.dumps(dataclasses.asdict(live), indent=2))


runs_app = typer.Typer(no_args_is_help=True, help="The records of flow runs (runs/): list, show, reproduce.")
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
@stage
def runs_list() -> None:
    """One line per recorded run, oldest first: id, flow, status, as_of, commit, drift verdict, NE."""
    from flows.records import list_runs

    for r in list_runs(Path.cwd()):
        drift, ranker = r["metrics"].get("drift", {}), r["metrics"].get("ranker", {})
        verdict = ("OK", "WARN", "ALERT")[drift["verdict"]] if "verdict" in drift else "-"
        ne = ranker.get("ne", {}).get("all")
        typer.echo(f"{r['run_id']:<34} {r['flow']:<16} {r['status']:<9} as of {r['as_of']}  "
                   f"{r['code_version'][:12]}  drift {verdict:<5}  NE {ne if ne is None else round(ne, 4)}")


@runs_app.command("show")
@stage
def runs_show(run_id: Annotated[str, typer.Argument(help="A run id (or a unique prefix) from `semid runs list`.")],
              full: Annotated[bool, typer.Option("--full", help="Also print params.yaml and both dvc.lock files.")]
              = False) -> None:
    """Print a run's record: code commit, effective params, seconds by task, metrics (and with --full the
    params file and dvc.lock it ran with)."""
    from flows.records import load_run

    record = load_run(Path.cwd(), run_id)
    if not full:
        record = {k: v for k, v in record.items() if k not in ("params_yaml", "dvc_lock_before", "dvc_lock")}
    typer.echo(json.dumps(record, indent=2))


@runs_app.command("reproduce")
@stage
def runs_reproduce(
    run_id: Annotated[str, typer.Argument(help="A run id (or a unique prefix) from `semid runs list`.")],
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Where to clone (default: a temp dir).")] = None,
) -> None:
    """Re-run a recorded flow run in a clone at its commit, from the state it started from, and compare every
    output hash with the record's; exit 1 when any differs."""
    from flows.records import reproduce

    result = reproduce(Path.cwd(), run_id, workdir)
    for path, c in result["outputs"].items():
        mark = "same" if c["same"] else ("noisy" if path not in result["different"] else "DIFFERENT")
        typer.echo(f"{mark:<9} {path}  {c['recorded']}  {c['reproduced']}")
    typer.echo(json.dumps({k: result[k] for k in ("run_id", "commit", "dirty", "workdir", "identical")}))
    if not result["identical"]:
        raise SemidError(f"run {result['run_id']}: {', '.join(result['different'])} differ from the record")


# The spellings of release 0.1, kept for one release: `semid rqvae train` and `semid ranker train`.
rqvae_app = typer.Typer(hidden=True, help="Deprecated: use `semid train_rqvae`.")
ranker_app = typer.Typer(hidden=True, help="Deprecated: use `semid train_ranker`.")
app.add_typer(rqvae_app, name="rqvae")
app.add_typer(ranker_app, name="ranker")


def deprecated(old: str, new: str) -> None:
    typer.secho(f"warning: `semid {old}` is deprecated and will be removed in the next release; use "
                f"`semid {new}` (the DVC stage's name)", fg="yellow", err=True)


@rqvae_app.command("train", help="Deprecated spelling of `semid train_rqvae`.")
def rqvae_train(params: ParamsFile = Path("params.yaml"), force: Force = False, as_of: AsOf = None) -> None:
    deprecated("rqvae train", "train_rqvae")
    train_rqvae(params, force, as_of)


@ranker_app.command("train", help="Deprecated spelling of `semid train_ranker`.")
def ranker_train(params: ParamsFile = Path("params.yaml"), as_of: AsOf = None) -> None:
    deprecated("ranker train", "train_ranker")
    train_ranker(params, as_of)


if __name__ == "__main__":
    app()

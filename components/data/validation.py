"""The validation gate (`semid validate`): data/raw becomes data/validated only when it keeps its contract.

load    read_schema/check_schema for items and every events file in the window (never quarantinable);
        the window is [window_start, window_end) or the data's own days, and only its partitions are read
check   Great Expectations runs items_checks and events_checks (below) on pandas copies of the columns
        they need; events stream in batches of about `chunk_rows` rows (whole partitions), one after the other
        or, with engine.kind ray, all at once on Ray actors (each reads the item lookup once)
decide  rows failing any check are quarantined while they are at most `max_bad_fraction` of their table;
        above that the gate fails with ValidationFailed, one line per failed check
write   data/validated (staged, replaced whole) and data/quarantine on success; metrics/validation.json
        and reports/validation/report.md always

GX facts that shape the code: it counts NaN as missing, so a range check passes NaN (finiteness is
not-null, which catches NaN, plus between, which catches +-inf); its range check loops in Python over
float32 values, so dense features reach GX as float64; it copies the whole frame for most checks
(run_gx turns on pandas copy-on-write, which makes those views) and hashes it once per batch, so GX
gets only the columns it reads, as narrow as they go.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # a pipeline stage does not phone home
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO is import and temp-dir chatter
import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402
from great_expectations.validator.v1_validator import Validator  # noqa: E402

from components import engine, provenance  # noqa: E402
from components.data import contracts  # noqa: E402
from components.data.lake import readable_raw  # noqa: E402
from components.errors import DataError, ParamsError, SemidError, ValidationFailed  # noqa: E402
from components.params import EngineParams, ValidationParams  # noqa: E402
from components.storage import DataDir, Layout, staged_dir, write_metrics, write_parquet, write_text  # noqa: E402
from components.window import Window  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)  # GX pins it to INFO

EXAMPLES = 5
F32_MAX = float(np.finfo(np.float32).max)
QUARANTINE = {"reason": pl.String, "source_file": pl.String}


@dataclasses.dataclass(frozen=True)
class Check:
    """One row-level rule: GX runs `expectation` (over original or derived columns); a failing row is
    reported under `column` as `name`, with the values of `show` (default: `column`) as examples."""
    column: str
    name: str
    expectation: gxe.Expectation
    show: tuple[str, ...] = ()

    def __post_init__(self):
        self.expectation.meta = {"check": self.reason}  # how a GX result finds its way back here

    @property
    def reason(self) -> str:
        return f"{self.column}: {self.name}"

    @property
    def shown(self) -> tuple[str, ...]:
        return self.show or (self.column,)


def items_checks() -> list[Check]:
    return [
        Check("item_id", "null", gxe.ExpectColumnValuesToNotBeNull(column="item_id"), ("item_id", "text")),
        Check("item_id", "duplicate", gxe.ExpectColumnValuesToBeUnique(column="item_id")),  # flags every copy
        Check("created_at", "null", gxe.ExpectColumnValuesToNotBeNull(column="created_at"), ("item_id",)),
        Check("text", "null", gxe.ExpectColumnValuesToNotBeNull(column="text"), ("item_id",)),
        Check("text", "blank", gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"),
              ("item_id", "text")),
        Check("retired_at", "before created_at", gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="retired_at", column_B="created_at", or_equal=True, ignore_row_if="either_value_is_missing"),
            ("item_id", "retired_at", "created_at")),
    ]


def events_checks(dense: list[str], window: Window) -> list[Check]:
    """Cross-table facts come from derive_events: item_known, item_kept, item_created_at, partition_day."""
    return [
        *[Check(c, "null", gxe.ExpectColumnValuesToNotBeNull(column=c)) for c in contracts.EVENTS],
        Check("item_id", "unknown item", gxe.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True])),
        Check("item_id", "its item failed the items checks",
              gxe.ExpectColumnValuesToBeInSet(column="item_kept", value_set=[True])),
        Check("ts", "before its item's created_at", gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="ts", column_B="item_created_at", or_equal=True, ignore_row_if="either_value_is_missing"),
            ("ts", "item_id", "item_created_at")),
        Check("clicked", "not in {0, 1}", gxe.ExpectColumnValuesToBeInSet(column="clicked", value_set=[0, 1])),
        *[check for c in dense for check in (
            Check(c, "NaN or null", gxe.ExpectColumnValuesToNotBeNull(column=c)),
            Check(c, "infinite", gxe.ExpectColumnValuesToBeBetween(column=c, min_value=-F32_MAX,
                                                                  max_value=F32_MAX)))],
        Check("ts", f"outside window {window}", gxe.ExpectColumnValuesToBeBetween(
            column="ts", min_value=window.start, max_value=window.end, strict_max=True)),
        Check("ts", "outside its partition's day",
              gxe.ExpectColumnPairValuesToBeEqual(column_A="ts_day", column_B="partition_day",
                                                  ignore_row_if="neither"),  # ts_day is never null
              ("ts", "partition_day")),
    ]


def derive_events(events: pl.DataFrame, lookup: pl.DataFrame) -> pl.DataFrame:
    """Add the columns the cross-table checks run on. `lookup` (item_lookup) has one row per item_id."""
    return events.join(lookup, on="item_id", how="left", maintain_order="left").with_columns(
        item_known=pl.col("item_kept").is_not_null() | pl.col("item_id").is_null(),  # null: the null check's
        item_kept=pl.col("item_kept").fill_null(True),  # an unknown item was not rejected, just unknown
        ts_day=pl.col("ts").dt.date().fill_null(pl.col("partition_day")),
    )


def item_lookup(items: pl.DataFrame, kept: pl.Series) -> pl.DataFrame:
    """item_id -> whether its row passed the items checks, and its created_at when it did."""
    return (items.select("item_id", item_created_at=pl.when(kept).then(pl.col("created_at")), item_kept=kept)
            .drop_nulls("item_id").unique("item_id"))  # a duplicated id: every copy failed, any row will do


def to_gx(frame: pl.DataFrame, checks: list[Check]) -> pd.DataFrame:
    """The columns GX reads, as pandas, converted once. Float32 goes as float64 (see module doc), dates as
    day numbers: GX hashes the whole frame, so narrow columns pay."""
    kwargs = [c.expectation.configuration.kwargs for c in checks]
    names = dict.fromkeys(k[key] for k in kwargs for key in ("column", "column_A", "column_B") if key in k)
    cast = {pl.Float32: pl.Float64, pl.Date: pl.Int32}
    return frame.select(pl.col(n).cast(cast.get(frame.schema[n], frame.schema[n])) for n in names).to_pandas()


@functools.cache
def _batch_definition():
    """One ephemeral GX context per process (each one makes a temp dir), holding in-memory pandas frames."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return (context.data_sources.add_pandas("semid").add_dataframe_asset("frame")
            .add_batch_definition_whole_dataframe("whole"))


@dataclasses.dataclass
class Failure:
    check: Check
    count: int
    rows: np.ndarray  # positions of failing rows: all of them when `complete`, else the first few


def run_gx(checks: list[Check], frame: pd.DataFrame, index_budget: float) -> tuple[int, list[Failure]]:
    """Validate `frame` with GX: the number of expectations evaluated, and the failed checks.

    The first pass asks for counts only (cheap on clean data). Failed checks run again for row indices:
    all of them while they may still be quarantined (largest count <= index_budget), else the first few.
    Pandas copy-on-write (the default from pandas 3) turns the whole-frame copies GX makes for most
    checks into views: GX time halves.
    """
    with pd.option_context("mode.copy_on_write", True):
        return _run_gx(checks, frame, index_budget)


def _run_gx(checks: list[Check], frame: pd.DataFrame, index_budget: float) -> tuple[int, list[Failure]]:
    # Batch.validate builds this same Validator, but only after get_batch has loaded and fingerprinted
    # (hashed) the whole frame once already; building it directly loads the frame once: a third less GX time.
    validator = Validator(_batch_definition(), batch_parameters={"dataframe": frame},
                          result_format={"result_format": "BASIC", "partial_unexpected_count": 0})
    first = validator.validate_expectation_suite(gx.ExpectationSuite("checks", [c.expectation for c in checks]))
    _raise_gx_errors(first)
    evaluated = first.statistics["evaluated_expectations"]
    counts = {r.expectation_config.meta["check"]: r.result["unexpected_count"] for r in first.results
              if not r.success}
    if not counts:
        return evaluated, []
    complete = max(counts.values()) <= index_budget
    validator.result_format = {"result_format": "COMPLETE" if complete else "SUMMARY",
                               "partial_unexpected_count": EXAMPLES, "return_unexpected_index_query": False}
    second = validator.validate_expectation_suite(
        gx.ExpectationSuite("failed", [c.expectation for c in checks if c.reason in counts]))
    _raise_gx_errors(second)
    key = "unexpected_index_list" if complete else "partial_unexpected_index_list"
    rows = {r.expectation_config.meta["check"]: r.result[key] for r in second.results}
    return evaluated, [Failure(c, counts[c.reason], np.asarray(rows[c.reason], dtype=np.int64))
                       for c in checks if c.reason in counts]


def _raise_gx_errors(result) -> None:
    for r in result.results:
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"GX could not evaluate {r.expectation_config.type} "
                               f"{r.expectation_config.kwargs}: {r.exception_info['exception_message']}")


@dataclasses.dataclass
class Tally:
    """What one suite found over all its batches."""
    table: str
    checks: list[Check]
    rows: int = 0
    evaluated: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    bad: list[pl.DataFrame] = dataclasses.field(default_factory=list)
    complete: bool = True  # `bad` holds every failing row

    @property
    def bad_rows(self) -> int:
        return sum(len(b) for b in self.bad)

    def budget(self, max_bad_fraction: float) -> float:
        return max_bad_fraction * self.rows

    def add(self, frame: pl.DataFrame, evaluated: int, failures: list[Failure], sources: list[str],
            offsets: np.ndarray, columns: list[str]) -> None:
        """Count one batch; keep its failing rows (`columns` of `frame`) with reasons and source files."""
        self.evaluated = max(self.evaluated, evaluated)
        for f in failures:
            self.counts[f.check.reason] += f.count
            examples = self.examples[f.check.reason]  # distinct values, first seen first
            seen = frame[f.rows].select(f.check.shown).unique(maintain_order=True).head(EXAMPLES)
            for row in seen.iter_rows(named=True):
                example = _example(row, f.check.shown)
                if len(examples) < EXAMPLES and example not in examples:
                    examples.append(example)
        self.complete &= all(len(f.rows) == f.count for f in failures)
        if failures and self.complete:
            self.bad.append(quarantine_rows(frame.select(columns), failures, sources, offsets))

    def failed(self) -> list[Check]:
        return [c for c in self.checks if self.counts[c.reason]]

    def summary(self) -> dict:
        """What `merge` needs of this tally, JSON-able (the failing rows themselves go in a file)."""
        return {"evaluated": self.evaluated, "counts": dict(self.counts), "examples": dict(self.examples),
                "complete": self.complete}

    def merge(self, summary: dict, bad: pl.DataFrame | None) -> None:
        """Add the tally of a later batch, as `add` would have counted it."""
        self.evaluated = max(self.evaluated, summary["evaluated"])
        self.counts.update(summary["counts"])
        for reason, found in summary["examples"].items():
            examples = self.examples[reason]
            examples += [e for e in found if e not in examples][:EXAMPLES - len(examples)]
        self.complete &= summary["complete"]
        if bad is not None and self.complete:
            self.bad.append(bad)


def quarantine_rows(frame: pl.DataFrame, failures: list[Failure], sources: list[str],
                    offsets: np.ndarray) -> pl.DataFrame:
    """The failing rows of `frame`, once each, with their reasons in check order, source file and the row's
    index in that file (`frame` is the files of `sources` concatenated; file i starts at offsets[i])."""
    hits = (pl.concat([pl.DataFrame({"row": f.rows, "reason": f.check.reason}) for f in failures])
            .group_by("row", maintain_order=True).agg(pl.col("reason").str.join("; ")).sort("row"))
    rows = hits["row"].to_numpy()
    file = np.searchsorted(offsets, rows, side="right") - 1
    return frame[rows].with_columns(hits["reason"], source_file=pl.Series(np.asarray(sources)[file]),
                                    file_row=pl.Series(rows - offsets[file]))


def _example(row: dict, columns: tuple[str, ...]):
    values = {c: _plain(row[c]) for c in columns}
    return values[columns[0]] if len(columns) == 1 else values


def _plain(value):
    """A JSON-safe value that shows what was in the data."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Stopwatch:
    """Seconds spent per phase, summed over calls."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- load


@dataclasses.dataclass(frozen=True)
class EventFile:
    day: dt.date
    path: Path
    rows: int


def select_window(files: list[tuple[dt.date, Path]], params: ValidationParams) -> tuple[Window | None, list]:
    """The window (pinned by params, else the data's first day .. last day + 1) and its files."""
    days = sorted({day for day, _ in files})
    start = params.window_start or (days[0] if days else None)
    end = params.window_end or (days[-1] + dt.timedelta(days=1) if days else None)
    if start is None or end is None:
        return None, []
    if start >= end:
        raise ParamsError(f"validation: window_start {start} must be before window_end {end}")
    window = Window(start, end)
    return window, [(day, path) for day, path in files if window.covers_day(day)]


def read_event_schemas(files: list[tuple[dt.date, Path]]) -> tuple[list[EventFile], list[str]]:
    """Check every file's schema before reading any data; all files must carry the same dense features."""
    found, dense = [], None
    for day, path in files:
        schema = contracts.read_schema(path)
        contracts.check_schema("events", schema, path)
        if dense is None:
            dense, first = contracts.dense_columns(schema), path
        if sorted(contracts.dense_columns(schema)) != sorted(dense):
            raise DataError(f"{path}: events has dense features {contracts.dense_columns(schema)}, "
                            f"but {first} has {dense}; every file must carry the same ones")
        found.append(EventFile(day, path, pq.read_metadata(path).num_rows))
    return found, dense or []


def batches(files: list[EventFile], chunk_rows: int) -> Iterator[list[EventFile]]:
    """Consecutive whole files, about `chunk_rows` rows a batch (one file at least)."""
    batch, rows = [], 0
    for f in files:
        if batch and rows + f.rows > chunk_rows:
            yield batch
            batch, rows = [], 0
        batch.append(f)
        rows += f.rows
    if batch:
        yield batch


def read_events(files: list[EventFile], dense: list[str]) -> pl.DataFrame:
    """The files concatenated in order, in contract dtypes, with the day each partition names."""
    return pl.concat([contracts.conform_events(pl.read_parquet(f.path)).select(*contracts.EVENTS, *dense)
                      .with_columns(partition_day=pl.lit(f.day)) for f in files], rechunk=False)


# --------------------------------------------------------------------------------------------- check


def check_items(items: pl.DataFrame, source: str, clock: Stopwatch) -> Tally:
    tally = Tally("items", items_checks(), rows=len(items))
    with clock("convert"):
        frame = to_gx(items, tally.checks)
    with clock("gx"):
        evaluated, failures = run_gx(tally.checks, frame, index_budget=math.inf)  # items are few: all rows
    tally.add(items, evaluated, failures, [source], np.zeros(1, dtype=np.int64), list(contracts.ITEMS))
    return tally


def check_event_batch(tally: Tally, batch: list[EventFile], dense: list[str], lookup: pl.DataFrame,
                      raw: DataDir, budget: float, clock: Stopwatch) -> None:
    """Read, derive and check one batch of whole partitions into `tally`, keeping failing rows while their
    count stays within `budget`."""
    with clock("read"):
        events = read_events(batch, dense)
    with clock("convert"):
        derived = derive_events(events, lookup)
        frame = to_gx(derived, tally.checks)
    with clock("gx"):
        evaluated, failures = run_gx(tally.checks, frame, budget)
    offsets = np.cumsum([0] + [f.rows for f in batch[:-1]])
    tally.add(derived, evaluated, failures, [str(f.path.relative_to(raw.root)) for f in batch], offsets,
              [*contracts.EVENTS, *dense])


def check_events(files: list[EventFile], dense: list[str], lookup: pl.DataFrame, window: Window,
                 params: ValidationParams, raw: DataDir, clock: Stopwatch, engine_params: EngineParams) -> Tally:
    """The events suite over the window's partitions: batch after batch here, or every batch at once as
    `CheckEvents` tasks on Ray (then each batch may keep up to the whole budget of failing rows; the counts,
    and the rows quarantined when the gate passes, are the same)."""
    tally = Tally("events", events_checks(dense, window), rows=sum(f.rows for f in files))
    if engine_params.kind == "local":
        for batch in batches(files, params.chunk_rows):
            budget = tally.budget(params.max_bad_fraction) - tally.bad_rows if tally.complete else -1
            check_event_batch(tally, batch, dense, lookup, raw, budget, clock)
        return tally
    work = [{"index": i, "files": [[f.day.isoformat(), str(f.path), f.rows] for f in batch]}
            for i, batch in enumerate(batches(files, params.chunk_rows))]
    with tempfile.TemporaryDirectory(prefix=f".validate.{os.getpid()}-spool", suffix=".tmp",
                                     dir=raw.root.parent) as spool:  # the workspace: every actor sees it
        lookup.write_parquet(Path(spool) / "lookup.parquet")  # read once per actor: the broadcast
        args = (spool, str(raw.root), dense, window.start.isoformat(), window.end.isoformat(),
                tally.budget(params.max_bad_fraction))
        records = engine.run_shards(engine_params, CheckEvents, args, work, "validating events")
        for record in records:
            tally.merge(record["tally"], pl.read_parquet(record["bad"]) if record["bad"] else None)
            clock.seconds.update(record["seconds"])
    return tally


class CheckEvents(engine.ShardTask):
    """The Ray engine's task: one batch of partitions checked by `check_event_batch` with the item lookup the
    driver wrote once to the spool; its failing rows go to a file there, its tally back as data."""

    def __init__(self, spool: str, raw: str, dense: list[str], start: str, end: str, budget: float):
        self.spool, self.raw, self.dense, self.budget = Path(spool), DataDir(Path(raw)), dense, budget
        self.window = Window(dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end))
        self.lookup = pl.read_parquet(self.spool / "lookup.parquet")

    def run(self, shard: dict) -> dict:
        batch = [EventFile(dt.date.fromisoformat(day), Path(path), rows) for day, path, rows in shard["files"]]
        tally, clock = Tally("events", events_checks(self.dense, self.window)), Stopwatch()
        check_event_batch(tally, batch, self.dense, self.lookup, self.raw, self.budget, clock)
        bad = None
        if tally.bad:
            bad = self.spool / f"bad-{shard['index']:05d}.parquet"
            pl.concat(tally.bad).write_parquet(bad)
        return {"tally": tally.summary(), "bad": bad and str(bad), "seconds": dict(clock.seconds)}


def kept_mask(rows: int, bad: pl.DataFrame) -> pl.Series:
    return pl.Series(~np.isin(np.arange(rows), bad["file_row"].to_numpy()))


def quarantined(tally: Tally, params: ValidationParams) -> bool:
    """Whether every failing row of the table can be quarantined (and the table passes)."""
    return tally.complete and tally.bad_rows <= tally.budget(params.max_bad_fraction)


def bad_frame(tally: Tally, schema: dict) -> pl.DataFrame:
    """The quarantine rows of a table (possibly none): `schema` columns, reason, source_file, file_row."""
    empty = pl.DataFrame(schema={**schema, **QUARANTINE, "file_row": pl.Int64})
    return pl.concat([empty, *tally.bad], how="vertical_relaxed")


def failure_lines(tally: Tally) -> list[str]:
    """One line per failed check: table, column, expectation, check, count and a few sample values."""
    lines = []
    for c in tally.failed():
        samples = ", ".join(_show(e) for e in tally.examples[c.reason])
        lines.append(f"{tally.table}.{c.column}: {c.expectation.expectation_type} ({c.name}) failed on "
                     f"{tally.counts[c.reason]:,} of {tally.rows:,} rows (e.g. {samples})")
    return lines


def _show(example) -> str:
    if isinstance(example, dict):
        return "(" + ", ".join(f"{k}={v}" for k, v in example.items()) + ")"
    return str(example)


# --------------------------------------------------------------------------------------------- write


def write_validated(raw: DataDir, target: Path, files: list[EventFile], items_bad: pl.DataFrame,
                    events_bad: pl.DataFrame) -> None:
    """data/validated, replaced whole: untouched files copied byte for byte, others rewritten without
    their quarantined rows. Only the window's partitions are kept."""
    by_file = {name: rows["file_row"].to_numpy()
               for (name,), rows in events_bad.partition_by("source_file", as_dict=True).items()}
    with staged_dir(target) as tmp:
        _copy_without(raw.items, DataDir(tmp).items, items_bad["file_row"].to_numpy())
        for f in files:
            name = str(f.path.relative_to(raw.root))
            _copy_without(f.path, tmp / name, by_file.get(name, np.empty(0, dtype=np.int64)))


def _copy_without(src: Path, dst: Path, drop: np.ndarray) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if len(drop) == 0:
        shutil.copyfile(src, dst)
    else:
        frame = pl.read_parquet(src)
        write_parquet(frame.filter(pl.Series(~np.isin(np.arange(len(frame)), drop))), dst)


def write_quarantine(layout: Layout, items_bad: pl.DataFrame, events_bad: pl.DataFrame) -> None:
    layout.quarantine.mkdir(parents=True, exist_ok=True)
    write_parquet(items_bad.drop("file_row"), layout.quarantine / "items.parquet")
    write_parquet(events_bad.drop("file_row"), layout.quarantine / "events.parquet")


def suite_metrics(tally: Tally, ok: bool, passed: bool) -> dict:
    """`ok`: this suite's rows are within max_bad_fraction; `passed`: the whole gate passed."""
    return {
        "success": ok,
        "rows": tally.rows,
        "quarantined_rows": tally.bad_rows if passed else 0,
        "evaluated_expectations": tally.evaluated,
        "failed_expectations": [
            {"expectation": c.expectation.expectation_type, "column": c.column, "check": c.name,
             "unexpected_count": tally.counts[c.reason], "unexpected_examples": tally.examples[c.reason]}
            for c in tally.failed()],
    }


def render_report(metrics: dict, tallies: list[Tally]) -> str:
    """reports/validation/report.md: the verdict, the suites, then every check with its count and samples."""
    window = metrics["window"] and f"{metrics['window']['start']}..{metrics['window']['end']}"
    lines = [f"# Validation: {'PASSED' if metrics['success'] else 'FAILED'}", "",
             f"window {window} - data_version {metrics['provenance']['data_version']} - "
             f"code_version {metrics['provenance']['code_version']}", ""]
    lines += [f"- **failed**: {line}" for line in metrics["failures"]]
    lines += [f"- quarantined: {line}" for line in metrics["quarantined"]]
    lines += ["", "| suite | success | rows | quarantined rows | expectations | failed |", "|---|---|---|---|---|---|"]
    for t in tallies:
        s = metrics[t.table]
        lines.append(f"| {t.table} | {s['success']} | {s['rows']:,} | {s['quarantined_rows']:,} | "
                     f"{s['evaluated_expectations']} | {len(s['failed_expectations'])} |")
    for t in tallies:
        lines += ["", f"## {t.table}", "", "| column | expectation | check | unexpected | examples |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c.column} | {c.expectation.expectation_type} | {c.name} | {t.counts[c.reason]:,} | "
                  f"{', '.join(_show(e) for e in t.examples[c.reason])} |"
                  for c in t.checks]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- stage


def run_validate(params: ValidationParams, layout: Layout, engine_params: EngineParams = EngineParams()) -> dict:
    """Gate data/raw (or the lake it lists): write data/validated and data/quarantine when it passes, metrics and
    report always.

    Raises DataError for an unreadable file or a broken schema, ValidationFailed when checks fail beyond
    `max_bad_fraction` or the window holds no events.
    """
    with readable_raw(layout, lambda days: window_of(days, params).covers_day) as raw:
        return validate(raw, params, layout, engine_params)


def window_of(days: list[dt.date], params: ValidationParams) -> Window:
    """The window select_window picks for events on `days` (none at all: an empty one)."""
    window, _ = select_window([(day, None) for day in days], params)
    return window or Window(dt.date.min, dt.date.min)


def validate(raw: DataDir, params: ValidationParams, layout: Layout,
             engine_params: EngineParams = EngineParams()) -> dict:
    engine.check(engine_params)
    clock = Stopwatch()
    window, tallies = None, []
    try:
        with clock("read"):
            contracts.check_schema("items", contracts.read_schema(raw.items), raw.items)
            found = raw.event_files()
            window, chosen = select_window(found, params)
            files, dense = read_event_schemas(chosen)
            if sum(f.rows for f in files) == 0:
                days = f"{found[0][0]}..{found[-1][0]}" if found else "none"
                raise ValidationFailed(f"events: window {window or 'unset'} holds no events ({len(files)} "
                                       f"file(s) in it; partition days under {raw.events}: {days})")
            items = pl.read_parquet(raw.items)
        tallies.append(check_items(items, str(raw.items.relative_to(raw.root)), clock))
        items_bad = bad_frame(tallies[0], contracts.ITEMS)
        lookup = item_lookup(items, kept_mask(len(items), items_bad))
        tallies.append(check_events(files, dense, lookup, window, params, raw, clock, engine_params))
    except SemidError as exc:
        _publish(raw, layout, params, window, tallies, [str(exc)], False, clock)
        raise
    events_bad = bad_frame(tallies[1], {**contracts.EVENTS, **{c: contracts.DENSE for c in dense}})
    passed = all(quarantined(t, params) for t in tallies)
    lines = [line for t in tallies for line in failure_lines(t)]
    if passed:
        with clock("write"):
            write_validated(raw, layout.validated.root, files, items_bad, events_bad)
            write_quarantine(layout, items_bad, events_bad)
    metrics = _publish(raw, layout, params, window, tallies, lines, passed, clock)
    if not passed:
        raise ValidationFailed("\n".join(lines))
    for line in lines:
        log.warning("quarantined (within max_bad_fraction %s): %s", params.max_bad_fraction, line)
    log.info("validated %s items and %s events in %.1f s", f"{len(items):,}", f"{tallies[1].rows:,}",
             sum(clock.seconds.values()))
    return metrics


def _publish(raw: DataDir, layout: Layout, params: ValidationParams, window: Window | None, tallies: list[Tally],
             failures: list[str], passed: bool, clock: Stopwatch) -> dict:
    """Write metrics/validation.json and the markdown report; return the metrics."""
    with clock("provenance"):
        sources = [p for p in (raw.items, raw.events) if p.exists()]
        version = {"code_version": provenance.code_version(), "data_version": provenance.data_version(sources)}
    metrics = {
        "success": passed,
        "window": window and {"start": f"{window.start:%Y-%m-%d}", "end": f"{window.end:%Y-%m-%d}"},
        "items": None, "events": None,  # until the suite ran
        **{t.table: suite_metrics(t, quarantined(t, params), passed) for t in tallies},
        "failures": failures if not passed else [],
        "quarantined": failures if passed else [],
        "provenance": version,
    }
    write_metrics(metrics, layout.metrics / "validation.json", layout.record("validation"))
    write_text(render_report(metrics, tallies), layout.reports / "validation" / "report.md")
    # Timings go to the caller (benchmarks/validate.py), not to the file: same inputs, same metrics bytes.
    return {**metrics, "seconds": {phase: round(s, 3) for phase, s in clock.seconds.items()}}

"""The drift stage on a small world: what it writes, --fail-on, and bad input (named error, nothing replaced)."""
import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from components.cli import app
from components.data.validation import run_validate
from components.data.world import run_generate
from components.errors import CodebookVersionMismatch, DataError, ParamsError
from components.monitoring import checks
from components.monitoring.drift import DriftFailed, run_drift
from components.params import (
    BackfillParams,
    DriftParams,
    DriftThresholds,
    EmbedParams,
    RQVAEParams,
    Thresholds,
    load_params,
)
from components.semid.backfill import run_backfill
from components.semid.embedding import run_embed
from components.semid.train_rqvae import run_train_rqvae
from components.storage import Layout, write_parquet

FAST = RQVAEParams(codebook_size=16, latent_dim=8, hidden_dims=(32,), steps=150, warmup_steps=50, batch_size=256,
                   restart_every=25, max_collision_rate=0.3)
PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
OUTPUTS = ("reports/drift/summary.json", "reports/drift/summary.html", "reports/drift/report.html",
           "reports/drift/history.csv", "metrics/drift.json")


@pytest.fixture(scope="module")
def small(tmp_path_factory, small_world_params) -> Layout:
    """A 10-day world through backfill (hashing-test vectors, K=16 codebooks), its drift outputs written once."""
    layout = Layout(tmp_path_factory.mktemp("drift-small"))
    run_generate(small_world_params, layout)
    run_validate(load_params(PARAMS).validation, layout)
    run_embed(EmbedParams(encoder="hashing-test"), layout)
    run_train_rqvae(FAST, layout)
    run_backfill(BackfillParams(), layout)
    run_drift(DriftParams(), layout)
    return layout


def snapshot(layout: Layout) -> dict[str, tuple[bytes, int]]:
    return {name: ((layout.root / name).read_bytes(), (layout.root / name).stat().st_mtime_ns) for name in OUTPUTS}


def test_writes_the_page_the_report_the_numbers_and_the_history(small):
    summary = json.loads((small.reports / "drift" / "summary.json").read_text())
    assert summary["verdict"] in checks.STATUSES and summary["as_of"] == "2026-01-11"
    assert summary["windows"]["current"] == {"start": "2026-01-10", "end": "2026-01-11",
                                             "impressions": summary["windows"]["current"]["impressions"]}
    assert summary["windows"]["reference"]["end"] == "2026-01-10"
    assert list(summary["checks"]) == [c.name for c in checks.CHECKS]
    for name, c in summary["checks"].items():
        assert set(c) >= {"value", "status", "warn", "alert", "meaning", "action"}, name
        assert c["meaning"].endswith(".") and c["action"].endswith(".")
    assert summary["checks"]["semid_coverage"]["value"] == 1.0
    assert summary["checks"]["codebook_age"]["value"] == 0.0  # the codebook was trained as of the data's end
    metrics = json.loads((small.metrics / "drift.json").read_text())
    numbers = [metrics["verdict"], *metrics["status"].values(),
               *(v for k, v in metrics.items() if k not in ("verdict", "status"))]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)  # numbers only
    assert metrics["verdict"] == checks.STATUSES.index(summary["verdict"])
    page = (small.reports / "drift" / "summary.html").read_text()
    assert f"Drift verdict: {summary['verdict']}" in page and 'href="report.html"' in page
    assert page.count("data:image/png;base64,") == 2
    report = (small.reports / "drift" / "report.html").read_text()
    assert "semid_l1" in report and "<script src=\"http" not in report  # self-contained: opens offline
    history = pl.read_csv(small.reports / "drift" / "history.csv")
    assert history["as_of"].to_list() == ["2026-01-11"] and "semid_prefix_shift" in history.columns


def test_same_inputs_give_the_same_summary_and_numbers(small):
    before = {n: (small.root / n).read_bytes() for n in ("reports/drift/summary.json", "metrics/drift.json",
                                                           "reports/drift/summary.html")}
    run_drift(DriftParams(), small)
    assert {n: (small.root / n).read_bytes() for n in before} == before


def test_fail_on_names_the_checks_at_or_above_it(small):
    tight = dataclasses.replace(DriftParams(), thresholds=dataclasses.replace(
        DriftThresholds(), content_drift=Thresholds(0.0, 0.0), semid_coverage=Thresholds(1.5, 1.2)))
    with pytest.raises(DriftFailed, match=r"drift verdict ALERT .*--fail-on alert.*semid_coverage ALERT"):
        run_drift(tight, small, fail_on="alert")
    summary = run_drift(DriftParams(), small, fail_on=None)  # without it: exit 0 whatever the verdict
    assert summary["checks"]["semid_coverage"]["status"] == "OK"


@pytest.mark.parametrize("case", ["empty reference", "foreign store", "unknown threshold", "warn above alert"])
def test_bad_input_is_a_named_error_and_leaves_the_reports(small, tmp_path, monkeypatch, case):
    before, store_bytes = snapshot(small), small.semids.read_bytes()
    params = yaml.safe_load(PARAMS.read_text())
    if case == "empty reference":
        params["drift"].update(as_of="2026-01-03", reference_days=5, gap_days=1)  # reference: Dec 27 .. Jan 1
        error, message = DataError, r"the reference window 2025-12-27..2026-01-01 holds no events"
    elif case == "foreign store":
        write_parquet(pl.read_parquet(small.semids).with_columns(codebook_version=pl.lit("0123456789abcdef")),
                      small.semids)
        error, message = CodebookVersionMismatch, "holds SemIDs of codebook_version 0123456789abcdef"
    elif case == "unknown threshold":
        params["drift"]["thresholds"]["ctr_spike"] = {"warn": 0.1, "alert": 0.2}
        error, message = ParamsError, r"drift:thresholds: unknown key\(s\) \['ctr_spike'\]"
    else:
        params["drift"]["thresholds"]["raw_id_churn"] = {"warn": 0.6, "alert": 0.4}
        error, message = ParamsError, "drift.thresholds.raw_id_churn: warn 0.6 is above alert 0.4"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        with pytest.raises(error, match=message):
            run_drift(load_params(tmp_path / "params.yaml").drift, small)
        monkeypatch.chdir(small.root)
        result = CliRunner().invoke(app, ["drift", "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 1
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] != []
        assert snapshot(small) == before
    finally:
        small.semids.write_bytes(store_bytes)


def test_cli_fail_on_exits_1_naming_the_checks(small, tmp_path, monkeypatch):
    params = yaml.safe_load(PARAMS.read_text())
    params["drift"]["thresholds"]["semid_coverage"] = {"warn": 1.5, "alert": 1.2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(small.root)
    args = ["drift", "--params", str(tmp_path / "params.yaml")]
    assert CliRunner().invoke(app, args).exit_code == 0  # the report is the product: exit 0 whatever the verdict
    failed = CliRunner().invoke(app, [*args, "--fail-on", "warn"])
    assert failed.exit_code == 1 and "semid_coverage ALERT" in failed.stderr


def test_as_of_comes_from_the_command_line_then_the_stage_then_the_loop(small, tmp_path, monkeypatch):
    monkeypatch.chdir(small.root)
    params = yaml.safe_load(PARAMS.read_text())
    params["loop"]["as_of"] = "2026-01-09"

    def as_of(*extra: str) -> str:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        result = CliRunner().invoke(app, ["drift", "--params", str(tmp_path / "params.yaml"), *extra])
        assert result.exit_code == 0, result.stderr
        return json.loads((small.reports / "drift" / "summary.json").read_text())["as_of"]
    assert as_of() == "2026-01-09"  # loop.as_of
    assert as_of("--as-of", "2026-01-08") == "2026-01-08"
    params["drift"]["as_of"] = "2026-01-07"
    assert as_of() == "2026-01-07" and as_of("--as-of", "2026-01-10") == "2026-01-10"
    bad = CliRunner().invoke(app, ["drift", "--as-of", "10 Jan"])
    assert bad.exit_code == 2 and "--as-of" in bad.stderr

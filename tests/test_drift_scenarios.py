"""The drift checks on default-size worlds (MiniLM, the default RQ-VAE: what the thresholds were calibrated on):
quiet worlds never alert, each injected change alerts its own check and no other, and the on-call page and the
Evidently report render in a real browser."""
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from drift_worlds import build, default_params, scenario

from components.monitoring.drift import run_drift
from components.semid import rqvae
from components.semid.backfill import run_backfill
from components.storage import Layout, write_parquet

pytestmark = pytest.mark.integration
SEEDS = (7, 1, 2, 3, 4)
DRIFT = default_params().drift  # params.yaml's: the calibrated thresholds


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    """Default worlds built on first use, once per session (kept in $SEMID_DRIFT_WORLDS when set, and reused from
    there by later sessions: about a minute each to build)."""
    kept = os.environ.get("SEMID_DRIFT_WORLDS")
    root = Path(kept) if kept else tmp_path_factory.mktemp("drift-worlds")
    built = {}

    def get(name: str) -> Layout:
        if name not in built:
            layout = Layout(root / name)
            if name.startswith("seed"):
                built[name] = build(layout, dataclasses.replace(default_params().world, seed=int(name[4:])))
            else:
                built[name] = scenario(layout, name.removeprefix("shift-"))
        return built[name]
    return get


def alerts(summary: dict) -> set[str]:
    return {name for name, c in summary["checks"].items() if c["status"] == "ALERT"}


def copy(layout: Layout, to) -> Layout:
    shutil.copytree(layout.root, to, ignore=shutil.ignore_patterns("reports", "metrics"))
    return Layout(to)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_quiet_world_is_ok_or_warn_never_alert(worlds, seed):
    summary = run_drift(DRIFT, worlds(f"seed{seed}"))
    assert summary["verdict"] in ("OK", "WARN"), {n: (c["value"], c["status"]) for n, c in summary["checks"].items()}


@pytest.mark.parametrize("kind, expected", [("topic", {"semid_prefix_shift", "content_drift"}),
                                            ("flood", {"raw_id_churn"}),
                                            ("concentration", {"popularity_skew"})])
def test_each_scenario_alerts_its_own_checks_and_no_other(worlds, kind, expected):
    summary = run_drift(DRIFT, worlds(f"shift-{kind}"))
    assert alerts(summary) == expected, {n: (c["value"], c["status"]) for n, c in summary["checks"].items()}


def test_items_shown_without_a_semid_alert_coverage(worlds, tmp_path):
    layout = copy(worlds("seed7"), tmp_path / "lag")
    current = pl.read_parquet(layout.validated.events / "date=2026-03-01")["item_id"].unique().sort()
    dropped = current.sample(fraction=0.05, seed=0)  # a backfill that missed a few of today's items
    write_parquet(pl.read_parquet(layout.semids).filter(~pl.col("item_id").is_in(dropped.implode())), layout.semids)
    summary = run_drift(DRIFT, layout)
    assert alerts(summary) == {"semid_coverage"}
    assert summary["checks"]["semid_coverage"]["details"]["items_without_semid"] == len(dropped)


def test_a_worn_out_codebook_alerts_codebook_fit(worlds, tmp_path):
    """Every level's codebook collapsed onto a few codes, under the training record of the healthy one."""
    layout = copy(worlds("seed7"), tmp_path / "worn")
    model, ckpt = rqvae.load_checkpoint(rqvae.read_current(layout.rqvae)[1])
    with torch.no_grad():
        codebooks = model.quantizer.codebooks  # (L, K, D'): all but 4 codes of each level far away, never chosen
        codebooks[:, 4:] = 1e6
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "codebook_version", "config", "state_dict")}
    version, _ = rqvae.save_checkpoint(model, layout.rqvae, extra)
    rqvae.write_current(layout.rqvae, version)
    run_backfill(default_params().backfill, layout)
    summary = run_drift(DRIFT, layout)
    assert alerts(summary) == {"codebook_fit"}, {n: (c["value"], c["status"]) for n, c in summary["checks"].items()}
    assert max(summary["checks"]["codebook_fit"]["details"]["utilization"]) <= 4 / 256


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("SEMID_REQUIRE_BROWSER"):
            pytest.fail("chromium not found; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not found (apt-get install chromium)")
    return found


def browse(page, *args: str, tmp) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}", "--virtual-time-budget=15000"]
    proc = subprocess.run([chromium(), *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_page_and_the_report_render_in_a_real_browser(worlds, tmp_path):
    layout = worlds("shift-topic")
    summary = run_drift(DRIFT, layout)
    page, report = layout.reports / "drift" / "summary.html", layout.reports / "drift" / "report.html"
    dom = browse(page, "--dump-dom", tmp=tmp_path / "a")
    assert f"Drift verdict: {summary['verdict']}" in dom and "semid_prefix_shift" in dom
    rendered = browse(report, "--dump-dom", tmp=tmp_path / "b")
    assert "semid_l1" in rendered and "Jensen-Shannon" in rendered  # the widgets were drawn by its scripts
    shot = tmp_path / "summary.png"
    browse(page, f"--screenshot={shot}", "--window-size=1280,1600", tmp=tmp_path / "c")
    pixels = __import__("matplotlib.image", fromlist=["imread"]).imread(shot)
    assert pixels.shape[0] >= 1000 and np.std(pixels[..., :3]) > 0.05  # not blank

"""The replay's timeline: one row per day (a re-run day replaces its row), and a page that draws the series."""
import polars as pl

from components.monitoring.timeline import append_row, render


def row(as_of: str, codebook: str, refreshed: int, verdict: str = "OK", seconds: float = 40.0) -> dict:
    return {"as_of": as_of, "codebook_version": codebook, "store_version": codebook, "champion": f"r-{as_of}",
            "refreshed": refreshed, "ranker_retrained": 1, "drift_verdict": verdict, "semid_coverage": 1.0,
            "ne_all": 0.94, "ne_new": 0.98, "seconds": seconds, "seconds_drift": 10.0}


def test_rows_stay_in_day_order_and_a_rerun_day_replaces_its_row(tmp_path):
    path = tmp_path / "timeline.csv"
    append_row(path, row("2026-04-01", "b", 1))
    append_row(path, row("2026-03-31", "a", 0))
    frame = append_row(path, row("2026-04-01", "b", 1, verdict="WARN", seconds=55.0))
    assert frame["as_of"].to_list() == ["2026-03-31", "2026-04-01"]
    assert frame.row(1, named=True)["drift_verdict"] == "WARN" and pl.read_csv(path).height == 2


def test_the_page_names_each_switch_and_embeds_the_plots(tmp_path):
    frame = pl.DataFrame([row("2026-03-30", "a", 0), row("2026-03-31", "a", 0, "ALERT"),
                          row("2026-04-01", "b", 1, seconds=400.0), row("2026-04-02", "b", 0)])
    page = render(frame)
    assert page.count("data:image/png;base64,") == 1 and "1 codebook refresh(es)" in page
    assert "<td>2026-03-30</td><td>a</td>" in page and "<td>2026-04-01</td><td>b</td>" in page

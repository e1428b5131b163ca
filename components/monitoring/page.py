"""The on-call page (reports/drift/summary.html): the verdict first, in words and colour, what to do, the checks,
and the paper's picture, raw-ID churn against SemID stability, on the user's own data. Self-contained: the two
PNG plots are embedded, the only link is to Evidently's report beside it. Also the markdown of the verdict for
the Prefect artifact."""
from __future__ import annotations

import base64
import datetime as dt
import html
import io

import polars as pl

from components.monitoring.checks import BY_NAME

COLOURS = {"OK": "#1b7f3b", "WARN": "#b26a00", "ALERT": "#b3261e"}
HEADLINE = {"OK": "nothing needs you now", "WARN": "something moved: look today", "ALERT": "act now"}


def png(fig) -> str:
    """A matplotlib figure as a data URI (no creation metadata, so the same figure gives the same bytes)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def churn_plot(series: pl.DataFrame, current_start: dt.date, lag_days: int) -> str:
    """(i) day by day: the share of impressions on items / prefixes not seen lag_days earlier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    days = series["day"].to_list()
    for column, label, colour in (("raw", "raw item IDs", "#b3261e"), ("l1", "SemID level-1 prefixes", "#1a5fb4"),
                                  ("l2", "SemID level-2 prefixes", "#6a9fdc")):
        ax.plot(days, series[column].to_list(), marker="o", markersize=3, label=label, color=colour)
    ax.axvspan(current_start, days[-1] + dt.timedelta(days=1), color="#999999", alpha=0.15, label="current window")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of impressions\nnot seen {lag_days} days earlier")
    ax.set_title("ID churn: raw IDs come and go, SemID prefixes should stay", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return png(fig)


def movers_plot(prefix_shares: pl.DataFrame, label: int = 6) -> str:
    """(ii) level-1 prefix shares of the items shown, reference against current, the biggest movers labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = (prefix_shares.drop_nulls("l1").sort("l1")
              .with_columns(move=(pl.col("current") - pl.col("reference")).abs()))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(shares["reference"], shares["current"], s=12, color="#1a5fb4", alpha=0.6)
    top = max(shares["reference"].max() or 0, shares["current"].max() or 0) * 1.05 or 1
    ax.plot([0, top], [0, top], color="#999999", linewidth=1, label="no change")
    for row in shares.sort(["move", "l1"], descending=[True, False]).head(label).iter_rows(named=True):
        ax.annotate(f"c1={row['l1']}", (row["reference"], row["current"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("share of the reference's items shown")
    ax.set_ylabel("share of the current window's items shown")
    ax.set_title("Level-1 SemID prefixes: reference vs current", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig)


def number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def render(summary: dict, churn_png: str, movers_png: str) -> str:
    """summary.html from summary.json's content and the two plots."""
    verdict = summary["verdict"]
    checks = summary["checks"]
    act = [(name, c) for name, c in checks.items() if c["status"] != "OK"]
    act.sort(key=lambda item: item[1]["status"] != "ALERT")
    todo = "".join(f"<li><b>{html.escape(name)}</b> ({c['status']}): {html.escape(c['action'])}</li>"
                   for name, c in act) or "<li>No check is above its WARN threshold.</li>"
    rows = "".join(
        f"<tr><td><b>{html.escape(name)}</b><br><small>{html.escape(BY_NAME[name].measures)}</small></td>"
        f"<td><span class='badge' style='background:{COLOURS[c['status']]}'>{c['status']}</span></td>"
        f"<td class='num'>{number(c['value'])}</td><td class='num'>{number(c['warn'])}</td>"
        f"<td class='num'>{number(c['alert'])}</td><td>{html.escape(c['meaning'])}"
        f"{'<br><small>' + html.escape(c['note']) + '</small>' if c.get('note') else ''}</td>"
        f"<td>{html.escape(c['action'])}</td></tr>" for name, c in checks.items())
    w = summary["windows"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>semid drift: {verdict}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1d; max-width: 1200px; }}
.verdict {{ color: white; background: {COLOURS[verdict]}; padding: 16px 20px; border-radius: 6px; }}
.verdict h1 {{ margin: 0; font-size: 28px; }}
table {{ border-collapse: collapse; width: 100%; margin-top: 12px; font-size: 14px; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
.badge {{ color: white; padding: 2px 8px; border-radius: 4px; font-weight: bold; font-size: 12px; }}
small {{ color: #555; }}
.note {{ background: #fff4e5; border-left: 4px solid #b26a00; padding: 8px 12px; }}
</style></head><body>
<div class="verdict" id="verdict"><h1>Drift verdict: {verdict}: {HEADLINE[verdict]}</h1>
<div>as of {summary['as_of']}: current {w['current']['start']}..{w['current']['end']}
({w['current']['impressions']:,} impressions) against reference {w['reference']['start']}..{w['reference']['end']}
({w['reference']['impressions']:,} impressions)</div></div>
{"".join(f"<p class='note'>Note: {html.escape(n)}.</p>" for n in summary["notes"])}
<h2>What to do</h2><ol>{todo}</ol>
<h2>Checks</h2>
<table><tr><th>check</th><th>status</th><th>value</th><th>warn</th><th>alert</th><th>what it means</th>
<th>what to do</th></tr>{rows}</table>
<h2>Raw IDs churn, SemIDs hold still</h2>
<p>Each day's share of impressions on items (and on SemID prefixes) that had no impression
{summary['churn_lag_days']} days earlier. Raw IDs turn over fast; prefixes stay put unless the content moves.</p>
<img alt="churn in raw-ID and SemID space" src="{churn_png}">
<h2>Which prefixes moved</h2><img alt="level-1 prefix shares, reference vs current" src="{movers_png}">
<p><a href="report.html">The detailed Evidently report</a> (prefix and feature distributions, its tests).</p>
<p><small>codebook {summary['codebook_version']} - data {summary['provenance']['data_version']} - code
{summary['provenance']['code_version']}</small></p>
</body></html>
"""


def markdown(summary: dict) -> str:
    """The verdict and the checks table, for the Prefect artifact `drift-verdict`."""
    lines = [f"# Drift verdict: {summary['verdict']} (as of {summary['as_of']})", "",
             "| check | status | value | warn | alert | what to do |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {c['status']} | {number(c['value'])} | {number(c['warn'])} | {number(c['alert'])} | "
              f"{c['action'] if c['status'] != 'OK' else ''} |" for name, c in summary["checks"].items()]
    return "\n".join(lines) + "\n"

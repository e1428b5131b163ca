"""The paper report (components/paper/): findings, intervals and verdicts on fabricated runs; the swap of the
click-loss measurement by hand; the report's files."""
import numpy as np
import polars as pl
import pytest

from components.errors import DataError
from components.paper import movielens, report
from components.paper.click_loss import pick_replacements, prefix_key

N = 3000


def runs(quality: dict[str, float], seed: int = 0, n: int = N) -> dict[tuple[str, int], pl.DataFrame]:
    """One predictions frame per setting, as train_ranker writes them: the same impressions (and copies) for
    all, p more informative about the click the higher the setting's quality."""
    rng = np.random.default_rng(seed)
    users, y = rng.integers(0, 300, n), (rng.random(n) < 0.15).astype(np.int8)
    segment = rng.choice(["head", "torso", "tail", "unseen"], n)
    copies = rng.random(n) < 0.2
    frames = {}
    for name, q in quality.items():
        parts = []
        for part in ("eval", "early", "late"):
            p = np.clip(0.15 + q * (y - 0.15) + rng.normal(0, 0.02, n), 0.01, 0.99)
            copy = np.where(copies, np.clip(p * (1 + rng.normal(0, 0.3 - q, n)), 0.01, 0.99), np.nan)
            parts.append(pl.DataFrame({
                "part": pl.Series([part] * n, dtype=pl.Enum(["eval", "early", "late"])), "ts": np.arange(n),
                "user_id": users, "item_id": np.arange(n), "clicked": y, "p": p.astype(np.float32),
                "p_copy": pl.Series(copy.astype(np.float32), nan_to_null=True),
                "segment": pl.Series(segment, dtype=pl.Enum(["head", "torso", "tail", "unseen"])),
                "new": (segment == "unseen") & (users % 2 == 0)}))
        frames[(name, seed)] = pl.concat(parts)
    return frames


def test_every_finding_names_settings_that_exist_and_quick_is_a_subset():
    for finding in report.FINDINGS:
        assert set(finding.settings) <= set(report.SETTINGS), finding
        assert finding.metric.split(":")[0] in ("ne", "drift", "aar") and finding.expect in ("lower", "neutral")
    assert set(report.QUICK) <= set(report.SETTINGS)
    assert report.SETTINGS["semid"] == {}  # the baseline: params.yaml as it is


def test_a_better_setting_holds_and_the_same_one_is_within_noise():
    frames = runs({"semid": 0.25, "rh": 0.1, "ie": 0.25})
    beats = report._versus("3", "x", "ne:all", "semid", "rh")
    found = report.measure(beats, [frames[("semid", 0)], frames[("rh", 0)]], seed=0, resamples=300)
    assert found["low"] <= found["difference"] <= found["high"] < 0
    assert report.verdict(beats, [found]) == "holds"
    reverse = report._versus("3", "x", "ne:all", "rh", "semid")
    assert report.verdict(reverse, [report.measure(reverse, [frames[("rh", 0)], frames[("semid", 0)]], 0, 300)]) \
        == "contradicts"
    same = report._versus("3", "x", "ne:all", "semid", "ie")  # equally informative: the interval spans 0
    interval = report.measure(same, [frames[("semid", 0)], frames[("ie", 0)]], 0, 300)
    assert interval["low"] < 0 < interval["high"] and report.verdict(same, [interval]) == "within noise"
    neutral = report._versus("3", "x", "ne:head", "semid", "ie", expect="neutral")
    assert report.verdict(neutral, [report.measure(neutral, [frames[("semid", 0)], frames[("ie", 0)]], 0, 300)]) \
        == "holds"


def test_an_effect_smaller_than_the_interval_is_explained_as_unresolvable():
    finding = report._versus("3", "x", "ne:new", "semid", "rh", paper=-0.004)
    results = [{"experiment": "rh", "seed": 0, "ne": {"new": 0.95}}]
    effect = report.paper_effect(finding, results)
    assert effect == pytest.approx(-0.0038)
    wide = [{"difference": -0.002, "low": -0.012, "high": 0.008}]
    assert "unresolvable here: the interval's half-width (0.0100) is 2.6x" in report.explanation(finding, wide, effect)
    narrow = [{"difference": 0.002, "low": 0.001, "high": 0.003}]
    assert report.explanation(finding, narrow, effect).startswith("resolvable here")
    assert "gives no size" in report.explanation(finding, wide, None)


def test_seeds_must_agree():
    finding = report._versus("3", "x", "ne:all", "semid", "rh")
    below, spans = {"difference": -0.02, "low": -0.03, "high": -0.01}, {"difference": -0.01, "low": -0.03,
                                                                          "high": 0.01}
    assert report.verdict(finding, [below, below, below]) == "holds"
    assert report.verdict(finding, [below, spans, below]) == "within noise"


def test_drift_aar_and_segment_contrasts_read_their_own_rows():
    frames = runs({"semid": 0.28, "rh": 0.05})
    pair = [frames[("semid", 0)], frames[("rh", 0)]]
    aar = report.measure(report._versus("A/A", "x", "aar", "semid", "rh"), pair, 0, 300)
    assert aar["high"] < 0  # semid's copies move less in runs(): noise 0.3 - q
    tail = report.measure(report._versus("3", "x", "ne:tail", "semid", "rh"), pair, 0, 300)
    assert tail["high"] < 0
    drift = report.measure(report._versus("3", "x", "drift:all", "semid", "rh"), pair, 0, 300)
    assert drift["low"] <= drift["difference"] <= drift["high"]


def test_runs_of_other_impressions_are_not_compared():
    frames = runs({"semid": 0.2, "rh": 0.1})
    other = frames[("rh", 0)].with_columns(pl.col("item_id") + 1)
    with pytest.raises(DataError, match="scored different eval impressions"):
        report.measure(report._versus("3", "x", "ne:all", "semid", "rh"), [frames[("semid", 0)], other], 0, 100)


def test_a_prediction_file_missing_from_the_cache_names_the_run(tmp_path):
    with pytest.raises(DataError, match="experiment rh-s1: its reports/ranker/predictions.parquet"):
        report.cached(tmp_path, "ab" + "0" * 30, "rh-s1")


def test_the_report_header_names_the_flags_that_give_its_seeds():
    assert report.command_flags(True, [0]) == " --quick"
    assert report.command_flags(False, [0, 1, 2]) == ""
    assert report.command_flags(False, [0]) == " --seed 0"
    assert report.command_flags(True, [3, 4]) == " --quick --seed 3 --seed 4"


def test_the_report_files(tmp_path):
    frames = runs({name: q for name, q in zip(report.QUICK, (0.3, 0.1, 0.12, 0.29, 0.2))})
    results = [{"experiment": name, "seed": 0, "ne": {s: 0.9 for s in report.SEGMENTS}, "aar": 0.3,
                "drift_sensitivity": {"all": 0.01}, "reused": name == "rh"} for name in report.QUICK]
    click = {"impressions": 50, "loss": {d: {"difference": -0.1, "low": -0.2, "high": 0.0} for d in range(4)},
             "deeper_loses_less": {f"{d}->{d + 1}": {"difference": 0.05, "low": 0.01, "high": 0.1} for d in range(3)}}
    judged = report.write_report(results, frames, click, quick=True, seconds=90, out=tmp_path, resamples=200)
    claims = {j["claim"] for j in judged}
    assert "SemID beats RH on new items" in claims and not any("K = " in c for c in claims)  # K needs other runs
    text = (tmp_path / "README.md").read_text()
    assert "Generated by `semid paper-report --quick`" in text
    assert "in 2 minutes on this machine (1 of 5 experiments finished by an earlier run of this commit)" in text
    assert "| 3 | SemID beats RH on new items (ne:new) | -0.0037 |" in text  # the paper's -0.41% of RH's NE 0.9
    assert "| 0->1 | +0.0500 [+0.0100, +0.1000] | **holds** |" in text
    assert (tmp_path / "ne_by_segment.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "click_loss.png").exists() and (tmp_path / "results.json").exists()


def test_a_replacement_shares_the_key_and_is_never_the_item_itself():
    rng = np.random.default_rng(0)
    items = np.array([10**12 + 1, 10**12 + 2, 10**12 + 3, 10**12 + 4, 10**12 + 5])  # raw IDs as large as real ones
    keys = np.array([7, 7, 9, 9, 16_000_000])
    candidates = np.array([10**12 + 1, 10**12 + 2, 10**12 + 3, 10**12 + 4, 10**12 + 9, 10**12 + 8])
    candidate_keys = np.array([7, 7, 9, 9, 9, 16_000_000])
    for _ in range(20):
        picked = pick_replacements(items, keys, candidates, candidate_keys, rng)
        assert picked[0] == items[1] and picked[1] == items[0]  # the only other one of key 7
        assert picked[2] in (items[3], 10**12 + 9) and picked[3] in (items[2], 10**12 + 9)
        assert picked[4] == 10**12 + 8  # the item itself is not a candidate here
    lonely = pick_replacements(np.array([5]), np.array([1]), np.array([5, 6]), np.array([1, 2]), rng)
    assert lonely.tolist() == [-1]
    assert prefix_key(np.array([[1, 2, 3]]), 2, 256).tolist() == [1 * 256 + 2]


def test_attention_verdicts_follow_the_seeds():
    """Table 7: SemID minus RH per seed; holds when every seed is below 0, within noise when they disagree."""
    def run(name, seed, entropy, padding):
        return {"experiment": name, "seed": seed, "attention": {"entropy": entropy, "padding_mass": padding}}
    results = [run("semid_transformer", 0, 1.0, 0.2), run("rh_transformer", 0, 1.5, 0.1),
               run("semid_transformer", 1, 1.1, 0.1), run("rh_transformer", 1, 1.4, 0.3),
               run("semid_pma", 0, 2.0, 0.5), run("rh_pma", 0, 1.0, 0.1)]  # no seed 1: PMA is not judged
    verdicts = {(v["module"], v["diagnostic"]): v for v in report.attention_verdicts(results)}
    assert set(verdicts) == {("transformer", "entropy"), ("transformer", "padding_mass")}
    assert verdicts[("transformer", "entropy")]["verdict"] == "holds"
    assert verdicts[("transformer", "entropy")]["differences"] == pytest.approx([-0.5, -0.3])
    assert verdicts[("transformer", "padding_mass")]["verdict"] == "within noise"
    results = [r for r in results if r["seed"] == 0]
    verdicts = {(v["module"], v["diagnostic"]): v["verdict"] for v in report.attention_verdicts(results)}
    assert verdicts[("pma", "entropy")] == "contradicts" and verdicts[("transformer", "padding_mass")] == "contradicts"


def test_movielens_settings_import_the_release_and_leave_the_default_world_alone(tmp_path):
    experiments = movielens.settings(tmp_path)
    assert list(experiments) == ["ml_semid", "ml_rh", "ml_ie", "ml_hybrid"]
    for name, overrides in experiments.items():
        assert overrides["data.source"] == "movielens" and overrides["data.movielens_dir"] == str(tmp_path)
        assert overrides["ranker.eval_share"] == "0.1" and overrides["ranker.train_days"] == "null"
        assert overrides.get("ranker.item_ids", "semid") == name.removeprefix("ml_")


def test_movielens_findings_on_fabricated_runs(tmp_path):
    """A model better than the base rate holds against it; SemID below RH and IE on new items holds."""
    frames = movielens.with_base_rate(runs({"ml_semid": 0.3, "ml_rh": 0.1, "ml_ie": 0.12, "ml_hybrid": 0.0}))
    assert frames[(movielens.BASE_RATE, 0)]["p"].n_unique() == 1
    results = [{"experiment": name, "seed": 0, "ne": {s: 0.9 for s in report.SEGMENTS},
                "events": {"all": N, "new": 900}} for name in ("ml_semid", "ml_rh", "ml_ie", "ml_hybrid")]
    judged = {j["claim"]: j for j in report.judge(results, frames, resamples=200, findings=movielens.FINDINGS)}
    assert judged["semid beats the base rate on all items"]["verdict"] == "holds"
    assert judged["hybrid beats the base rate on all items"]["verdict"] != "holds"  # quality 0: p is noise
    assert judged["SemID beats IE on new items"]["verdict"] == "holds"
    text = movielens.render(tmp_path, results, list(judged.values()), 120)
    assert f"--movielens {tmp_path}" in text and "3,000 impressions, 900 on new items" in text

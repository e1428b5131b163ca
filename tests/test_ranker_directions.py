"""Unit tests of components/ranker/directions.py: the report on fabricated results, the experiment queue with a
fake runner (no dvc process)."""
import json
import subprocess

import pytest

from components.errors import DataError, SemidError
from components.ranker.directions import (
    EXPERIMENTS,
    directions_table,
    experiment_command,
    main,
    queue_status,
    read_results,
    run_experiments,
)

SEEDS = (0, 1, 2)
SPREAD = (-0.001, 0.0, 0.001)  # seed s gets value + SPREAD[s]: mean = value, min..max = value -+ 0.001

# NE all, tail, new per experiment; chosen so every direction holds by a wide margin
GOOD = {
    "semid_prefix_ngram": {"all": 0.970, "tail": 0.920, "new": 0.900, "aar": 0.05},
    "rh":                 {"all": 0.972, "tail": 0.930, "new": 0.950, "aar": 0.10},
    "ie":                 {"all": 0.975, "tail": 0.940, "new": 0.960, "aar": 0.12},
    "semid_trigram":      {"all": 0.980, "tail": 0.925, "new": 0.910, "aar": 0.06},
    "semid_all_bigrams":  {"all": 0.985, "tail": 0.926, "new": 0.905, "aar": 0.06},
}


def fabricate(figures: dict[str, dict], seeds=SEEDS, spread=SPREAD) -> list[dict]:
    results = []
    for seed in seeds:
        for name, f in figures.items():
            d = spread[seed]
            ne = {s: f.get(s, 0.95) + d for s in ("all", "head", "torso", "tail", "seen", "unseen", "new")}
            results.append({"experiment": name, "seed": seed, "ne": ne, "aar": f["aar"] + d,
                            "drift_sensitivity": {s: 0.008 for s in ne}, "config": {}})
    return results


def line(report: str, label: str) -> str:
    return next(x for x in report.splitlines() if x.startswith(f"- **({label})**"))


def with_figure(figures, name, **changes):
    return {**figures, name: {**figures[name], **changes}}


# --- the experiments ---

def test_every_experiment_sets_the_same_keys_and_history_follows_the_item_ids():
    keys = {frozenset(overrides) for overrides in EXPERIMENTS.values()}
    assert keys == {frozenset({"ranker.item_ids", "ranker.history.item_ids", "ranker.parameterization"})}
    for overrides in EXPERIMENTS.values():
        assert overrides["ranker.history.item_ids"] == overrides["ranker.item_ids"]


def test_experiment_command():
    assert experiment_command("semid_trigram", 2) == [
        "dvc", "exp", "run", "--queue", "-S", "ranker.item_ids=semid", "-S", "ranker.history.item_ids=semid",
        "-S", "ranker.parameterization=trigram", "-S", "ranker.seed=2", "--name", "semid_trigram-s2"]


def nested(flat: dict[str, str]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = int(value) if value.isdigit() else value
    return out


class FakeDvc:
    """Stands in for subprocess.run: records each command; `dvc queue status` shows every queued run Running on
    the first poll and Success (Failed for names in `fail`) after; `dvc exp show --json` gives each run's params
    (as queued, or `params` instead) and metrics."""

    def __init__(self, fail=(), params=None, shown=True, existing=()):
        self.calls, self.queued, self.polls = [], [], 0
        self.fail, self.params, self.shown, self.existing = set(fail), params, shown, list(existing)

    def __call__(self, cmd, check, capture_output=False, text=False):
        assert check is True
        self.calls.append(cmd)
        stdout = ""
        if cmd[:4] == ["dvc", "exp", "run", "--queue"]:
            self.queued.append((cmd[-1], dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "-S")))
        elif cmd[:3] == ["dvc", "queue", "status"]:
            self.polls += 1
            rows = [f"{i:07x}  {name}  04:48 AM  "
                    f"{'Running' if self.polls == 1 else 'Failed' if name in self.fail else 'Success'}"
                    for i, (name, _) in enumerate(self.queued)]
            stdout = "Task     Name     Created    Status\n" + "\n".join(rows) + "\n\nWorker status: 0 active\n"
        elif cmd[:3] == ["dvc", "exp", "remove"]:
            self.existing = [name for name in self.existing if name not in cmd[3:]]
        elif cmd[:4] == ["dvc", "exp", "show", "--json"] and not self.queued:  # before the run: earlier ones
            revs = [{"name": name, "rev": f"{i + 100:040x}", "data": {}} for i, name in enumerate(self.existing)]
            stdout = json.dumps([{"rev": "workspace", "experiments": None},
                                 {"rev": "0" * 40, "name": "main", "experiments": [{"revs": [r]} for r in revs]}])
        elif cmd[:4] == ["dvc", "exp", "show", "--json"]:
            revs = [{"name": name, "rev": f"{i:040x}", "data": {
                "params": {"params.yaml": {"data": nested(self.params or params)}},
                "metrics": {"metrics/ranker.json": {"data": {"ne": {"all": 0.9 + (i + 1) / 1000}}}},
                "outs": {"reports/ranker/predictions.parquet": {"hash": f"{i:032x}", "use_cache": True}}}}
                for i, (name, params) in enumerate(self.queued) if self.shown]
            stdout = json.dumps([{"rev": "workspace", "experiments": None},
                                 {"rev": "0" * 40, "name": "main", "experiments": [{"revs": [r]} for r in revs]}])
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout)


def test_run_experiments_queues_them_runs_the_queue_and_reads_exp_show():
    fake, sleeps = FakeDvc(), []
    results = run_experiments(["semid_prefix_ngram", "rh"], [0, 1], jobs=2, runner=fake, sleep=sleeps.append)
    assert fake.calls[0] == ["dvc", "exp", "show", "--json"]  # no earlier experiment of these names: none removed
    assert fake.calls[1] == ["dvc", "queue", "remove", "--success", "--failed"]
    assert [c[-1] for c in fake.calls[2:6]] == ["semid_prefix_ngram-s0", "rh-s0", "semid_prefix_ngram-s1", "rh-s1"]
    assert fake.calls[3] == ["dvc", "exp", "run", "--queue", "-S", "ranker.item_ids=rh", "-S",
                             "ranker.history.item_ids=rh", "-S", "ranker.parameterization=prefix_ngram", "-S",
                             "ranker.seed=0", "--name", "rh-s0"]
    assert fake.calls[6:] == [["dvc", "queue", "start", "-j", "2"], ["dvc", "queue", "status"],
                              ["dvc", "queue", "status"], ["dvc", "exp", "show", "--json"]]
    assert len(sleeps) == 1  # one poll found them running
    assert [(r["experiment"], r["seed"], r["ne"]["all"]) for r in results] == [
        ("semid_prefix_ngram", 0, 0.901), ("rh", 0, 0.902), ("semid_prefix_ngram", 1, 0.903), ("rh", 1, 0.904)]
    assert [r["predictions"] for r in results] == [f"{i:032x}" for i in range(4)]  # the DVC hash of each run's


def test_a_second_run_replaces_the_earlier_experiments_of_the_same_names():
    fake = FakeDvc(existing=["rh-s0", "rh-s7", "other"])
    run_experiments(["rh"], [0], runner=fake, sleep=lambda s: None)
    assert fake.calls[1] == ["dvc", "exp", "remove", "rh-s0"]  # only the name this run will use again
    assert fake.existing == ["rh-s7", "other"]


def test_a_failed_experiment_is_named():
    with pytest.raises(SemidError, match=r"experiment\(s\) \['rh-s0'\] failed; see `dvc queue logs NAME`"):
        run_experiments(["semid_prefix_ngram", "rh"], [0], runner=FakeDvc(fail={"rh-s0"}), sleep=lambda s: None)


def test_params_the_run_did_not_apply_are_refused():
    wrong = {"ranker.item_ids": "semid", "ranker.history.item_ids": "rh", "ranker.parameterization": "prefix_ngram",
             "ranker.seed": "0"}
    with pytest.raises(DataError, match=r"experiment rh-s0: params.yaml has ranker.item_ids = 'semid', expected 'rh'"):
        run_experiments(["rh"], [0], runner=FakeDvc(params=wrong), sleep=lambda s: None)


def test_an_experiment_missing_from_exp_show_is_refused():
    with pytest.raises(DataError, match="`dvc exp show` has no experiment ie-s3"):
        run_experiments(["ie"], [3], runner=FakeDvc(shown=False), sleep=lambda s: None)


def test_run_experiments_stops_at_a_failed_command():
    def failing(cmd, check, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    with pytest.raises(subprocess.CalledProcessError):
        run_experiments(["rh"], [0], runner=failing)


def test_run_experiments_rejects_an_unknown_name():
    with pytest.raises(Exception, match=r"unknown experiment\(s\) \['semid_fourgram'\]"):
        run_experiments(["semid_fourgram"], [0], runner=FakeDvc())


# --- the report ---

def test_every_direction_holds():
    report = directions_table(fabricate(GOOD))
    # new: (0.900 - 0.950) / 0.950 = -5.263%, (0.900 - 0.960) / 0.960 = -6.250%
    assert line(report, "a") == (
        "- **(a)** SemID prefix-ngram beats RH and IE on new items: **holds**. NE(new) semid_prefix_ngram "
        "0.90000 ±0.00100; vs rh 0.95000 ±0.00100: -5.263% (holds); vs ie 0.96000 ±0.00100: -6.250% (holds).")
    assert "**holds**" in line(report, "b") and "-1.075%" in line(report, "b")  # (0.92 - 0.93) / 0.93
    # all: (0.970 - 0.980) / 0.980 = -1.020%, (0.970 - 0.985) / 0.985 = -1.523%; tail and new for context
    assert line(report, "c") == (
        "- **(c)** prefix-ngram beats trigram and all-bigrams: **holds**. NE(all) semid_prefix_ngram 0.97000 "
        "±0.00100; vs semid_trigram 0.98000 ±0.00100: -1.020% (holds); vs semid_all_bigrams 0.98500 ±0.00100: "
        "-1.523% (holds). NE(tail): -0.541% vs semid_trigram, -0.648% vs semid_all_bigrams. "
        "NE(new): -1.099% vs semid_trigram, -0.552% vs semid_all_bigrams.")
    assert line(report, "d") == ("- **(d)** SemID has a lower A/A ratio than RH: **holds**. AAR semid_prefix_ngram "
                                 "0.0500 ±0.0010; vs rh 0.1000 ±0.0010: -50.000% (holds).")  # (0.05 - 0.10) / 0.10


def test_the_table():
    report = directions_table(fabricate(GOOD))
    rows = [x for x in report.splitlines() if x.startswith("| ")]
    assert rows[0] == ("| experiment | seeds | NE all | NE head | NE torso | NE tail | NE seen | NE unseen | NE new "
                       "| AAR | drift sensitivity (all) |")
    assert rows[1] == ("| semid_prefix_ngram | 0, 1, 2 | 0.97000 ±0.00100 | 0.95000 ±0.00100 | 0.95000 ±0.00100 "
                       "| 0.92000 ±0.00100 | 0.95000 ±0.00100 | 0.95000 ±0.00100 | 0.90000 ±0.00100 "
                       "| 0.0500 ±0.0010 | 0.00800 ±0.00000 |")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| " + n for n in EXPERIMENTS]


def test_a_single_seed_shows_no_spread():
    report = directions_table(fabricate(GOOD, seeds=(1,)))
    assert "| rh | 1 | 0.97200 | " in report
    assert "**holds**" in line(report, "a")


def test_a_direction_that_does_not_hold():
    report = directions_table(fabricate(with_figure(GOOD, "rh", new=0.890)))
    assert line(report, "a").startswith("- **(a)** SemID prefix-ngram beats RH and IE on new items: **does not hold**")
    assert "vs rh 0.89000 ±0.00100: +1.124% (does not hold); vs ie" in line(report, "a")  # 0.9 / 0.89 - 1
    assert "**holds**" in line(report, "b")


def test_equal_means_do_not_hold():
    assert "**does not hold**" in line(directions_table(fabricate(with_figure(GOOD, "rh", tail=0.920))), "b")


def test_a_gap_within_the_seed_spread():
    # means 0.9200 vs 0.9215: semid is lower, but its worst seed (0.9210) is above rh's best (0.9205)
    report = directions_table(fabricate(with_figure(GOOD, "rh", tail=0.9215)))
    assert "**within seed noise**" in line(report, "b")
    assert "-0.163% (within seed noise)" in line(report, "b")
    # one clear and one within noise: the direction is within noise
    report = directions_table(fabricate(with_figure(GOOD, "ie", new=0.9005)))
    assert "**within seed noise**" in line(report, "a") and "(holds); vs ie" in line(report, "a")


def test_missing_figures_are_na():
    results = fabricate(GOOD)
    for r in results:
        if r["experiment"] == "semid_prefix_ngram":
            r["aar"] = None
            if r["seed"] == 1:
                r["ne"]["tail"] = None  # one seed lacking a figure makes the mean n/a
        if r["experiment"] == "rh":
            del r["drift_sensitivity"]
    results = [r for r in results if r["experiment"] != "ie"]  # an experiment not run at all
    report = directions_table(results)
    assert "| ie |" not in report
    assert "**n/a**" in line(report, "b") and "NE(tail) semid_prefix_ngram n/a; vs rh 0.93000" in line(report, "b")
    assert "**n/a**" in line(report, "d") and "n/a (n/a)" in line(report, "d")
    assert "vs ie n/a: n/a (n/a)" in line(report, "a") and "**n/a**" in line(report, "a")
    assert "NE(tail): n/a vs semid_trigram" in line(report, "c") and "**holds**" in line(report, "c")
    rh_row = next(x for x in report.splitlines() if x.startswith("| rh |"))
    assert rh_row.endswith("| 0.1000 ±0.0010 | n/a |")


def test_a_clear_failure_outweighs_a_missing_figure():
    results = [r for r in fabricate(with_figure(GOOD, "rh", new=0.80)) if r["experiment"] != "ie"]
    assert "**does not hold**" in line(directions_table(results), "a")


def test_an_empty_or_odd_result_set_does_not_crash():
    report = directions_table([])
    assert all(f"- **({x})**" in report for x in "abcd") and report.count("**n/a**") == 4
    odd = [{"experiment": "rh", "seed": 0, "ne": "broken", "aar": float("nan")},
           {"experiment": "my_variant", "seed": 0, "ne": {"all": 0.9}}]
    report = directions_table(odd)
    assert "| my_variant | 0 | 0.90000 | n/a |" in report and "| rh | 0 | n/a |" in report


# --- the command line ---

def test_main_from_json(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(fabricate(GOOD)))
    out = tmp_path / "reports" / "directions.md"
    main(["--from-json", str(earlier), "--out", str(out)])
    assert out.read_text() == directions_table(fabricate(GOOD))
    assert json.loads(out.with_suffix(".json").read_text()) == fabricate(GOOD)


def test_main_with_a_bad_results_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"seed": 0}]))
    with pytest.raises(SystemExit) as info:
        main(["--from-json", str(bad), "--out", str(tmp_path / "d.md")])
    assert info.value.code == 1
    assert "bad.json: result 0 should be an object with 'experiment' and 'seed'" in capsys.readouterr().err
    assert not (tmp_path / "d.md").exists()


def test_read_results_of_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="results file not found"):
        read_results(tmp_path / "nope.json")


def test_a_name_still_queued_or_running_is_not_done_whatever_finished_before():
    table = ("Task     Name    Created    Status\n"
             "9b9460d  ie-s0   04:31 PM   Running\n"
             "1270a5f  rh-s0   04:31 PM   Queued\n"
             "180c42a  ie-s0   03:47 PM   Success\n"
             "70b11bd  rh-s0   03:47 PM   Failed\n"
             "a874d20  semid-s0   04:31 PM   Success\n\nWorker status: 2 active, 0 idle\n")
    runner = lambda cmd, check, capture_output, text: subprocess.CompletedProcess(cmd, 0, stdout=table)  # noqa: E731
    assert queue_status(runner) == {"ie-s0": "Running", "rh-s0": "Queued", "semid-s0": "Success"}

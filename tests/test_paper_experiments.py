"""Unit tests of components/paper/experiments.py: the experiment queue with a fake runner (no dvc process)."""
import json
import subprocess

import pytest

from components.errors import DataError, SemidError
from components.paper.experiments import experiment_command, queue_status, run_experiments

EXPERIMENTS = {  # the shape of the paper report's settings: overrides per name, history switched with the items
    "semid_prefix_ngram": {"ranker.item_ids": "semid", "ranker.history.item_ids": "semid",
                           "ranker.parameterization": "prefix_ngram"},
    "rh": {"ranker.item_ids": "rh", "ranker.history.item_ids": "rh", "ranker.parameterization": "prefix_ngram"},
    "ie": {"ranker.item_ids": "ie", "ranker.history.item_ids": "ie", "ranker.parameterization": "prefix_ngram"},
    "semid_trigram": {"ranker.item_ids": "semid", "ranker.history.item_ids": "semid",
                      "ranker.parameterization": "trigram"},
}


def test_experiment_command():
    assert experiment_command("semid_trigram", 2, EXPERIMENTS) == [
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

    def __init__(self, fail=(), params=None, shown=True, existing=(), finished=(), orphans=()):
        self.calls, self.queued, self.polls = [], [], 0
        self.orphans = list(orphans)  # tasks left Running by a killed run: `dvc exp show` fails while they last
        self.fail, self.params, self.shown, self.existing = set(fail), params, shown, list(existing)
        self.finished = list(finished)  # (name, params) of runs an earlier report finished on this commit

    def __call__(self, cmd, check, capture_output=False, text=False):
        assert check is True
        self.calls.append(cmd)
        stdout = ""
        if cmd[:4] == ["dvc", "exp", "run", "--queue"]:
            self.queued.append((cmd[-1], dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "-S")))
        elif cmd[:3] == ["dvc", "queue", "status"] and self.orphans:
            rows = [f"{i:07x}  {name}  04:48 AM  Running" for i, name in enumerate(self.orphans)]
            stdout = "Task     Name     Created    Status\n" + "\n".join(rows) + "\n\nWorker status: 0 active, 0 idle\n"
        elif cmd[:3] == ["dvc", "queue", "kill"]:
            assert cmd[3] in self.orphans
        elif cmd[:3] == ["dvc", "queue", "remove"] and cmd[3] in self.orphans:
            self.orphans.remove(cmd[3])
        elif cmd[:3] == ["dvc", "exp", "show"] and self.orphans:
            raise subprocess.CalledProcessError(255, cmd)
        elif cmd[:3] == ["dvc", "queue", "status"] and not self.queued:  # the runner's check for orphans
            stdout = "Task     Name     Created    Status\n\nWorker status: 0 active, 0 idle\n"
        elif cmd[:3] == ["dvc", "queue", "status"]:
            self.polls += 1
            rows = [f"{i:07x}  {name}  04:48 AM  "
                    f"{'Running' if self.polls == 1 else 'Failed' if name in self.fail else 'Success'}"
                    for i, (name, _) in enumerate(self.queued)]
            stdout = "Task     Name     Created    Status\n" + "\n".join(rows) + "\n\nWorker status: 0 active\n"
        elif cmd[:3] == ["dvc", "exp", "remove"]:
            self.existing = [name for name in self.existing if name not in cmd[3:]]
            self.finished = [(name, params) for name, params in self.finished if name not in cmd[3:]]
        elif cmd[:4] == ["dvc", "exp", "show", "--json"] and not self.queued:  # before the run: earlier ones
            revs = [{"name": name, "rev": f"{i + 100:040x}", "data": {}} for i, name in enumerate(self.existing)]
            revs += self.finished_revs()
            stdout = json.dumps([{"rev": "workspace", "experiments": None},
                                 {"rev": "0" * 40, "name": "main", "experiments": [{"revs": [r]} for r in revs]}])
        elif cmd[:4] == ["dvc", "exp", "show", "--json"]:
            revs = [{"name": name, "rev": f"{i:040x}", "data": {
                "params": {"params.yaml": {"data": nested(self.params or params)}},
                "metrics": {"metrics/ranker.json": {"data": {"ne": {"all": 0.9 + (i + 1) / 1000}}}},
                "outs": {"reports/ranker/predictions.parquet": {"hash": f"{i:032x}", "use_cache": True}}}}
                for i, (name, params) in enumerate(self.queued) if self.shown] + self.finished_revs()
            stdout = json.dumps([{"rev": "workspace", "experiments": None},
                                 {"rev": "0" * 40, "name": "main", "experiments": [{"revs": [r]} for r in revs]}])
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout)

    def finished_revs(self) -> list[dict]:
        return [{"name": name, "rev": f"{i + 200:040x}", "data": {
            "params": {"params.yaml": {"data": nested(params)}},
            "metrics": {"metrics/ranker.json": {"data": {"ne": {"all": 0.8}}}},
            "outs": {"reports/ranker/predictions.parquet": {"hash": "f" * 32, "use_cache": True}}}}
            for i, (name, params) in enumerate(self.finished)]


def test_run_experiments_queues_them_runs_the_queue_and_reads_exp_show():
    fake, sleeps = FakeDvc(), []
    results = run_experiments(EXPERIMENTS, ["semid_prefix_ngram", "rh"], [0, 1], jobs=2, runner=fake,
                              sleep=sleeps.append)
    assert fake.calls[0] == ["dvc", "queue", "status"]  # no task left Running by a killed run
    assert fake.calls[1] == ["dvc", "exp", "show", "--json"]  # no earlier experiment of these names: none removed
    assert fake.calls[2] == ["dvc", "queue", "remove", "--success", "--failed"]
    assert [c[-1] for c in fake.calls[3:7]] == ["semid_prefix_ngram-s0", "rh-s0", "semid_prefix_ngram-s1", "rh-s1"]
    assert fake.calls[4] == ["dvc", "exp", "run", "--queue", "-S", "ranker.item_ids=rh", "-S",
                             "ranker.history.item_ids=rh", "-S", "ranker.parameterization=prefix_ngram", "-S",
                             "ranker.seed=0", "--name", "rh-s0"]
    assert fake.calls[7:] == [["dvc", "queue", "start", "-j", "2"], ["dvc", "queue", "status"],
                              ["dvc", "queue", "status"], ["dvc", "exp", "show", "--json"]]
    assert len(sleeps) == 1  # one poll found them running
    assert [(r["experiment"], r["seed"], r["ne"]["all"]) for r in results] == [
        ("semid_prefix_ngram", 0, 0.901), ("rh", 0, 0.902), ("semid_prefix_ngram", 1, 0.903), ("rh", 1, 0.904)]
    assert [r["predictions"] for r in results] == [f"{i:032x}" for i in range(4)]  # the DVC hash of each run's


def test_a_second_run_replaces_the_earlier_experiments_of_the_same_names():
    fake = FakeDvc(existing=["rh-s0", "rh-s7", "other"])
    run_experiments(EXPERIMENTS, ["rh"], [0], runner=fake, sleep=lambda s: None)
    assert fake.calls[2] == ["dvc", "exp", "remove", "rh-s0"]  # only the name this run will use again
    assert fake.existing == ["rh-s7", "other"]


def test_a_rerun_on_the_same_commit_reuses_the_finished_experiments():
    rh0 = ("rh-s0", {**EXPERIMENTS["rh"], "ranker.seed": "0"})
    stale = ("ie-s0", {**EXPERIMENTS["rh"], "ranker.seed": "0"})  # the name, but other params: not reused
    fake = FakeDvc(finished=[rh0, stale])
    results = run_experiments(EXPERIMENTS, ["semid_prefix_ngram", "rh", "ie"], [0], runner=fake, sleep=lambda s: None)
    assert [name for name, _ in fake.queued] == ["semid_prefix_ngram-s0", "ie-s0"]
    assert ["dvc", "exp", "remove", "ie-s0"] in fake.calls
    assert [(r["experiment"], r["ne"]["all"], r["reused"]) for r in results] == [
        ("semid_prefix_ngram", 0.901, False), ("rh", 0.8, True), ("ie", 0.902, False)]


def test_nothing_is_queued_when_every_run_is_finished():
    fake = FakeDvc(finished=[("rh-s0", {**EXPERIMENTS["rh"], "ranker.seed": "0"})])
    assert [r["experiment"] for r in run_experiments(EXPERIMENTS, ["rh"], [0], runner=fake)] == ["rh"]
    assert fake.calls == [["dvc", "queue", "status"]] + [["dvc", "exp", "show", "--json"]] * 2


def test_a_failed_experiment_is_named():
    with pytest.raises(SemidError, match=r"experiment\(s\) \['rh-s0'\] failed; see `dvc queue logs NAME`"):
        run_experiments(EXPERIMENTS, ["semid_prefix_ngram", "rh"], [0], runner=FakeDvc(fail={"rh-s0"}),
                        sleep=lambda s: None)


def test_params_the_run_did_not_apply_are_refused():
    wrong = {"ranker.item_ids": "semid", "ranker.history.item_ids": "rh", "ranker.parameterization": "prefix_ngram",
             "ranker.seed": "0"}
    with pytest.raises(DataError, match=r"experiment rh-s0: params.yaml has ranker.item_ids = 'semid', expected 'rh'"):
        run_experiments(EXPERIMENTS, ["rh"], [0], runner=FakeDvc(params=wrong), sleep=lambda s: None)


def test_an_experiment_missing_from_exp_show_is_refused():
    with pytest.raises(DataError, match="`dvc exp show` has no experiment ie-s3"):
        run_experiments(EXPERIMENTS, ["ie"], [3], runner=FakeDvc(shown=False), sleep=lambda s: None)


def test_run_experiments_stops_at_a_failed_command():
    def failing(cmd, check, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    with pytest.raises(subprocess.CalledProcessError):
        run_experiments(EXPERIMENTS, ["rh"], [0], runner=failing)


def test_run_experiments_rejects_an_unknown_name():
    with pytest.raises(Exception, match=r"unknown experiment\(s\) \['semid_fourgram'\]"):
        run_experiments(EXPERIMENTS, ["semid_fourgram"], [0], runner=FakeDvc())


def test_a_name_still_queued_or_running_is_not_done_whatever_finished_before():
    table = ("Task     Name    Created    Status\n"
             "9b9460d  ie-s0   04:31 PM   Running\n"
             "1270a5f  rh-s0   04:31 PM   Queued\n"
             "180c42a  ie-s0   03:47 PM   Success\n"
             "70b11bd  rh-s0   03:47 PM   Failed\n"
             "a874d20  semid-s0   04:31 PM   Success\n\nWorker status: 2 active, 0 idle\n")
    runner = lambda cmd, check, capture_output, text: subprocess.CompletedProcess(cmd, 0, stdout=table)  # noqa: E731
    assert queue_status(runner) == ({"ie-s0": "Running", "rh-s0": "Queued", "semid-s0": "Success"}, 2)


def test_queued_runs_without_a_worker_get_workers_again():
    """Workers that died (or obeyed an earlier `dvc queue stop`) leave tasks queued: on the second poll in a row
    that finds no worker (the first may be the workers' start-up), the runner starts workers again."""
    fake = FakeDvc()
    starts, polls = [], []

    def runner(cmd, check, capture_output=False, text=False):
        if cmd[:3] == ["dvc", "queue", "start"]:
            starts.append((cmd, len(polls)))
        if cmd[:3] == ["dvc", "queue", "status"] and fake.queued and len(starts) < 2:  # queued, no worker
            polls.append(cmd)
            rows = [f"{i:07x}  {name}  04:48 AM  Queued" for i, (name, _) in enumerate(fake.queued)]
            return subprocess.CompletedProcess(cmd, 0, stdout="Task Name Created Status\n" + "\n".join(rows)
                                               + "\n\nWorker status: 0 active, 0 idle\n")
        return fake(cmd, check, capture_output, text)

    results = run_experiments(EXPERIMENTS, ["rh"], [0], jobs=3, runner=runner, sleep=lambda s: None)
    start = ["dvc", "queue", "start", "-j", "3"]
    assert starts == [(start, 0), (start, 2)] and [r["experiment"] for r in results] == ["rh"]


def test_tasks_left_running_without_a_worker_are_cleared_before_exp_show():
    dvc = FakeDvc(orphans=["rh-s0"])  # a run killed mid-experiment: DVC still lists it Running, no worker alive
    results = run_experiments(EXPERIMENTS, ["rh"], [0], runner=dvc, sleep=lambda s: None)
    assert [r["experiment"] for r in results] == ["rh"] and not results[0]["reused"]
    first_show = dvc.calls.index(["dvc", "exp", "show", "--json"])
    assert dvc.calls[:first_show] == [["dvc", "queue", "status"], ["dvc", "queue", "kill", "rh-s0"],
                                      ["dvc", "queue", "remove", "rh-s0"]]

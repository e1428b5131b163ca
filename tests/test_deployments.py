"""Integration: the deployments of prefect.yaml on a real Prefect server with process workers, and the alerts of
infra/prefect/ reaching a webhook (a listener on localhost).

One server for the module (its own PREFECT_HOME); deployed from a copy of prefect.yaml whose schedules are
inactive, since active ones pre-create future runs a worker would pick up."""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_pipeline import repo  # noqa: F401  (the fixture: this repo's pipeline on a small world)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER_START_S = 120  # 2 busy cores: the server is healthy after about 8 s when idle
WORKER_S = 600  # a worker's --run-once returns when its flow run ends; the small-world day takes 1-2 min
WEBHOOK_S = 60  # events -> triggers -> actions -> the webhook: a few seconds
DEPLOYMENTS = ("semid-daily", "semid-codebook-refresh", "semid-ranker-retrain")  # each named like its flow
# What the drift task does with reports/drift/summary.json (argv[1]) of a workspace (argv[2]).
ANNOUNCE_VERDICT = ("import json, sys; from pathlib import Path; from flows.stages import announce_verdict; "
                    "announce_verdict(json.loads(sys.argv[1]), Path(sys.argv[2]))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group the command started (it was started in its own session), then wait."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Prefect:
    """A running Prefect server and the environment its clients (CLI, workers, flow runs) use."""

    def __init__(self, api_url: str, env: dict[str, str]):
        self.api_url, self.env = api_url, env

    def command(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
        """Run a client of this server in this checkout; its output, once it has exited 0."""
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise AssertionError(f"{cmd} ran past {timeout} s") from None
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{output}"
        return output

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
        return self.command([str(BIN / "prefect"), *args], env, timeout)

    def run_deployment(self, name: str, parameters: dict) -> str:
        """`prefect deployment run`; the new flow run's id."""
        output = self.cli("deployment", "run", name, "--params", json.dumps(parameters))
        return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)

    def work_once(self, pool: str) -> str:
        """A worker of the pool, started in this checkout, that runs what is due and returns."""
        return self.cli("worker", "start", "--pool", pool, "--run-once", env={"SEMID_REPO": str(REPO)},
                        timeout=WORKER_S)

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def state(self, flow_run_id: str) -> State:
        with self.client() as client:
            return client.read_flow_run(flow_run_id).state


@pytest.fixture(scope="module")
def prefect(tmp_path_factory) -> Iterator[Prefect]:
    """`prefect server start` on a free port with a throwaway PREFECT_HOME (SQLite, services included)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-ui"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, f"the server exited {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server was not healthy after {SERVER_START_S} s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        api_url = f"http://127.0.0.1:{port}/api"
        yield Prefect(api_url, {**env, "PREFECT_API_URL": api_url})
    finally:
        stop(server)


@pytest.fixture(scope="module")
def deployed(prefect, tmp_path_factory) -> Prefect:
    """The work pools and `prefect deploy --all` of prefect.yaml, its schedules made inactive."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        for schedule in deployment.get("schedules", []):
            schedule["active"] = False
    prefect_file = tmp_path_factory.mktemp("deploy") / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
    for pool in ("semid-process", "gpu"):
        prefect.cli("work-pool", "create", pool, "--type", "process")
    prefect.cli("deploy", "--all", "--prefect-file", str(prefect_file), "--no-prompt")
    return prefect


class WebhookListener:
    """An HTTP server on localhost that keeps the JSON body of every POST it receives."""

    def __init__(self):
        posts: queue.Queue = queue.Queue()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.posts, self.received = posts, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, wanted: Callable[[dict], bool]) -> dict:
        """The first post (received so far or within WEBHOOK_S) that `wanted` accepts."""
        deadline = time.monotonic() + WEBHOOK_S
        while not (found := [post for post in self.received if wanted(post)]):
            try:
                self.received.append(self.posts.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                raise AssertionError(f"no such webhook post within {WEBHOOK_S} s; received {self.received}") from None
        return found[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[WebhookListener]:
    listener = WebhookListener()
    yield listener
    listener.close()


def test_deployments_carry_schedules_pools_and_one_run_at_a_time(deployed):
    with deployed.client() as client:
        deployments = {name: client.read_deployment_by_name(f"{name}/{name}") for name in DEPLOYMENTS}
    crons = {name: [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules]
             for name, d in deployments.items()}
    assert crons == {"semid-daily": [("0 2 * * *", "UTC", False)],
                     "semid-codebook-refresh": [("0 3 1 1,4,7,10 *", "UTC", False)], "semid-ranker-retrain": []}
    for deployment in deployments.values():
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                          {"directory": "{{ $SEMID_REPO }}"}}]  # resolved by the worker
    assert {name: d.work_pool_name for name, d in deployments.items()} == {
        "semid-daily": "semid-process", "semid-codebook-refresh": "semid-process", "semid-ranker-retrain": "gpu"}
    assert deployments["semid-ranker-retrain"].job_variables == {"env": {"CUDA_VISIBLE_DEVICES": "0"}}


def test_daily_deployment_runs_the_day_on_a_process_worker(deployed, repo):  # noqa: F811
    flow_run = deployed.run_deployment("semid-daily/semid-daily", {"repo": str(repo)})
    log = deployed.work_once("semid-process")
    assert deployed.state(flow_run).name == "Completed", log
    for output in ("metrics/ranker.json", "reports/drift/summary.json", "models/serving.json"):
        assert (repo / output).is_file(), output
    records = [json.loads(p.read_text()) for p in (repo / "runs").glob("daily-*.json")]  # the run's record
    assert [(r["status"], r["flow"]) for r in records] == [("Completed", "semid-daily")]
    assert records[0]["metrics"]["ranker"]["ne"]["all"] > 0 and "train_ranker" in records[0]["dvc_lock"]
    serving = (repo / "models" / "serving.json").read_text()
    # The GPU pool's deployment runs the same stage on its own: up to date here, so the champion stays.
    flow_run = deployed.run_deployment("semid-ranker-retrain/semid-ranker-retrain", {"repo": str(repo)})
    log = deployed.work_once("gpu")
    assert deployed.state(flow_run).name == "Completed", log
    assert (repo / "models" / "serving.json").read_text() == serving


def test_a_failed_run_and_a_drift_alert_post_to_the_webhook(deployed, webhook, tmp_path):
    applied = deployed.command([sys.executable, "infra/prefect/apply.py", "--webhook-url", webhook.url])
    assert "automation 'semid-run-failed'" in applied and "automation 'semid-drift-alert'" in applied

    not_a_workspace = tmp_path / "empty"  # no params.yaml, no dvc.yaml: the daily flow fails there
    not_a_workspace.mkdir()
    flow_run = deployed.run_deployment("semid-daily/semid-daily", {"repo": str(not_a_workspace)})
    log = deployed.work_once("semid-process")
    failed = deployed.state(flow_run)
    assert failed.name == "Failed", log
    post = webhook.wait_for(lambda post: post.get("flow_run_id") == flow_run)
    assert post["deployment"] == "semid-daily" and post["state"] == "Failed"
    assert post["text"].startswith("semid: semid-daily run ") and failed.message in post["text"]

    checks = {"semid_prefix_shift": {"status": "WARN"}, "raw_id_churn": {"status": "ALERT"}}
    for verdict in ("OK", "ALERT"):  # OK first: it must not post
        summary = {"verdict": verdict, "as_of": "2026-03-02", "codebook_version": "5081a8755cd5f86e",
                   "checks": checks if verdict == "ALERT" else {}}
        deployed.command([sys.executable, "-c", ANNOUNCE_VERDICT, json.dumps(summary), str(tmp_path)])
    post = webhook.wait_for(lambda post: "verdict" in post)
    assert post["verdict"] == "ALERT" and post["alerts"] == ["raw_id_churn"] and post["as_of"] == "2026-03-02"
    assert str(tmp_path / "reports" / "drift" / "summary.html") in post["text"]
    assert [post["verdict"] for post in webhook.received if "verdict" in post] == ["ALERT"]

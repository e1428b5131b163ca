"""The loop's workspace lock (flows/workspace.py): a second run waits its turn, then is refused by name; a flow
run inside a flow holds it once; a killed holder frees it."""
import signal
import subprocess
import sys
import threading
import time

import pytest
from dvc.lock import make_lock
from prefect import flow

from flows import workspace
from flows.stages import WorkspaceBusy, recover_rwlock

HOLD = """
import sys, time
from flows import workspace
with workspace.held(sys.argv[1], "semid-daily"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder_process(root, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_by_name_after_its_wait(tmp_path):
    proc = holder_process(tmp_path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=rf"semid-daily \(pid {proc.pid}, since .*\) holds the loop's "
                                                r"workspace lock .*semid-replay waited 1 s and gave up"):
            with workspace.held(tmp_path, "semid-replay", wait_s=1):
                raise AssertionError("the body ran while another run held the workspace")
        assert time.monotonic() - started >= 1
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_waits_its_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace, "POLL_S", 0.2)
    proc = holder_process(tmp_path, 2)
    started = time.monotonic()
    with workspace.held(tmp_path, "semid-codebook-refresh", wait_s=60):
        waited = time.monotonic() - started
    assert proc.wait() == 0 and 1 < waited < 30


def test_a_killed_holder_frees_the_workspace(tmp_path):
    proc = holder_process(tmp_path, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with workspace.held(tmp_path, "semid-daily", wait_s=0):
        pass


def test_a_flow_inside_a_flow_holds_it_once(tmp_path):
    @flow
    def inner() -> str:
        with workspace.held(tmp_path, "semid-daily", wait_s=0):
            return threading.current_thread().name

    @flow
    def outer() -> list[str]:
        with workspace.held(tmp_path, "semid-replay", wait_s=0):
            return [inner(), inner()]

    assert len(outer()) == 2  # with wait_s=0 a second acquisition would have raised WorkspaceBusy
    with workspace.held(tmp_path, "semid-daily", wait_s=0):  # and it is free afterwards
        pass


def test_a_lock_table_a_killed_writer_left_unreadable_is_cleared(tmp_path):
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    assert recover_rwlock(tmp_path) is False  # no table: nothing to do
    (tmp / "rwlock").write_text('{"read": {}, "write": {"dvc.yaml": {"pid": 1, "cmd": "dvc repro"}}}')
    assert recover_rwlock(tmp_path) is False and (tmp / "rwlock").exists()  # readable: DVC's own to judge
    (tmp / "rwlock").write_text('{"read": {"data/va')  # cut mid-write
    assert recover_rwlock(tmp_path) is True and not (tmp / "rwlock").exists()
    (tmp / "rwlock").write_text("")  # truncated before the write
    assert recover_rwlock(tmp_path) is True
    (tmp / "rwlock").write_text('{"read"')
    with make_lock(str(tmp / "rwlock.lock"), tmp_dir=str(tmp)):  # a live DVC writing it now: left alone
        assert recover_rwlock(tmp_path) is False and (tmp / "rwlock").exists()

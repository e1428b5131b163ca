"""One loop run per workspace: a flow holds .dvc/tmp/semid-loop.lock (an flock, released by the kernel when its
process dies, so a killed worker never leaves it held) from its first task to its last.

DVC's own lock covers one stage at a time; between two stages, or while the daily flow lands the day outside
DVC, another flow (a codebook refresh started by hand, a second daily run) could interleave and mix two days'
inputs. Prefect's concurrency_limit 1 keeps runs of one deployment apart; this lock keeps all of them apart. A
second run waits its turn (polling, logged), then gives up with WorkspaceBusy naming the holder. A flow called
from a flow (replay -> daily) holds it once.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

from flows.stages import WorkspaceBusy

LOCK = Path(".dvc") / "tmp" / "semid-loop.lock"
WAIT_S = 3 * 3600  # a day's run takes minutes; a refresh with its full backfill and retrain under an hour
POLL_S = 5.0
_held = threading.local()  # lock paths this thread holds: a subflow does not wait for its parent


def logger():
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run (a script, a test)
        return get_logger("semid.workspace")


def holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another run"
    except FileNotFoundError:
        return "another run"


@contextlib.contextmanager
def held(root: Path, flow: str, wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold the workspace's loop lock for the body, waiting up to wait_s for the run that holds it."""
    path = (Path(root) / LOCK).resolve()
    mine = getattr(_held, "paths", set())
    if path in mine:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(f"{root}: {holder(path)} holds the loop's workspace lock ({path}); "
                                        f"{flow} waited {wait_s:.0f} s and gave up, nothing written") from None
                if not waiting:
                    logger().warning("%s holds the workspace (%s): %s waits its turn", holder(path), path,
                                             flow)
                    waiting = True
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.write(fd, f"{flow} (pid {os.getpid()}, since {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC)".encode())
        _held.paths = mine | {path}
        try:
            yield
        finally:
            _held.paths = mine
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock

"""The serving pointer: one file names codebook, store and champion together; switches are atomic, every earlier
triple stays resolvable, and a rollback moves the pointer back and pins it."""
import dataclasses
import json
import threading

import pytest

from components import serving
from components.errors import DataError
from components.storage import Layout, write_json


def artifacts(layout: Layout, codebook: str, champion: str) -> None:
    """The three files a triple names (their content does not matter to the pointer)."""
    for path in (layout.rqvae / f"{codebook}.pt", layout.store(codebook), layout.ranker / f"{champion}.pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{codebook}/{champion}")


@pytest.fixture
def layout(tmp_path) -> Layout:
    layout = Layout(tmp_path)
    for codebook, champion in (("cb1", "r1"), ("cb1", "r2"), ("cb2", "r3")):
        artifacts(layout, codebook, champion)
    return layout


def test_a_switch_names_codebook_store_and_champion_together(layout):
    assert serving.read(layout) is None
    with pytest.raises(DataError, match="nothing serves yet"):
        serving.resolve(layout)
    first = serving.switch(layout, "2026-03-31", "cb1", "r1")
    assert serving.resolve(layout) == first
    assert (first.seq, first.codebook, first.store, first.ranker) == (
        1, "models/rqvae/cb1.pt", "data/semids/cb1.parquet", "models/ranker/r1.pt")
    serving.switch(layout, "2026-04-01", "cb2", "r3")
    assert [s.champion for s in serving.history(layout)] == ["r1", "r3"] and serving.read(layout).seq == 2
    assert json.loads(layout.serving.read_text())["codebook_version"] == "cb2"


def test_a_switch_to_missing_files_is_refused_and_changes_nothing(layout):
    serving.switch(layout, "2026-03-31", "cb1", "r1")
    before = layout.serving.read_bytes(), layout.serving_log.read_bytes()
    with pytest.raises(DataError, match="data/semids/cb9.parquet"):
        serving.switch(layout, "2026-04-01", "cb9", "r1")
    assert (layout.serving.read_bytes(), layout.serving_log.read_bytes()) == before


def test_a_day_switched_again_decides_against_what_served_before_it(layout):
    """A day's stage run again after a crash: `before` gives what served before the day, and the switch does not
    add a second line, whether the crash came after the pointer moved or between the log and the pointer."""
    serving.switch(layout, "2026-03-30", "cb1", "r1")
    today = serving.switch(layout, "2026-03-31", "cb1", "r2")
    log = layout.serving_log.read_bytes()
    assert serving.before(layout, "2026-03-31").champion == "r1"
    assert serving.before(layout, "2026-04-01") == today
    assert serving.switch(layout, "2026-03-31", "cb1", "r2") == today and layout.serving_log.read_bytes() == log
    # killed between the log line and the pointer's rename: the pointer still names r1, the log already r2
    first = serving.history(layout)[0]
    write_json(dataclasses.asdict(first), layout.serving)
    assert serving.before(layout, "2026-03-31").champion == "r1"
    assert serving.switch(layout, "2026-03-31", "cb1", "r2") == today and layout.serving_log.read_bytes() == log
    assert serving.before(layout, "2026-03-31") is not None and serving.before(layout, "2026-03-30") is None


def test_rollback_goes_back_one_switch_pins_and_unpins(layout):
    serving.switch(layout, "2026-03-30", "cb1", "r1")
    serving.switch(layout, "2026-03-31", "cb1", "r2")
    serving.switch(layout, "2026-04-01", "cb2", "r3")
    back = serving.rollback(layout)
    assert (back.seq, back.codebook_version, back.champion, back.pinned) == (2, "cb1", "r2", True)
    assert serving.resolve(layout) == back and len(serving.history(layout)) == 3  # the log is not rewritten
    assert serving.rollback(layout).champion == "r1"  # and once more
    assert serving.rollback(layout, to_seq=3).champion == "r3"
    with pytest.raises(DataError, match="no earlier switch 0"):
        serving.rollback(layout, to_seq=0)
    assert serving.unpin(layout).pinned is False


def test_rollback_refuses_a_triple_whose_files_are_gone(layout):
    serving.switch(layout, "2026-03-31", "cb1", "r1")
    serving.switch(layout, "2026-04-01", "cb2", "r3")
    layout.store("cb1").unlink()
    with pytest.raises(DataError, match="cb1.parquet no longer exist"):
        serving.rollback(layout)
    assert serving.read(layout).champion == "r3"


def test_readers_never_see_a_codebook_with_another_versions_store_or_ranker(layout):
    """A reader polling the pointer while it switches back and forth always gets one whole triple."""
    serving.switch(layout, "2026-03-31", "cb1", "r1")
    pairs = {("cb1", "r1"), ("cb2", "r3")}
    stop, seen, bad = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            s = serving.read(layout)
            seen.append(s.seq)
            if (s.codebook_version, s.champion) not in pairs or s.store != f"data/semids/{s.codebook_version}.parquet":
                bad.append(dataclasses.asdict(s))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        serving.switch(layout, "2026-04-01", *(("cb2", "r3") if i % 2 == 0 else ("cb1", "r1")))
    stop.set()
    thread.join()
    assert not bad and len(seen) > 0 and serving.read(layout).seq == 201


def test_a_damaged_pointer_is_a_clear_error(layout):
    layout.serving.parent.mkdir(parents=True, exist_ok=True)
    layout.serving.write_text("{not json")
    with pytest.raises(DataError, match="models/serving.json: unreadable serving pointer"):
        serving.read(layout)

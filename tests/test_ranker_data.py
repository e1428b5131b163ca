"""The ranker's examples: history is exactly the user's earlier clicks (no leakage), codes come from the entity
store, the window follows the params, and streaming over day partitions changes nothing."""
import dataclasses
import datetime as dt
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from components.data import contracts
from components.data.world import run_generate
from components.errors import DataError, ParamsError
from components.params import HistoryParams, RankerParams
from components.ranker.examples import (
    AGE_BUCKETS,
    NO_COUNTS,
    USER_COUNTERS,
    Examples,
    add_counts,
    build_examples,
    iter_examples,
    load_clicks,
    load_examples,
    ranker_window,
)
from components.semid.store import SemIdStore
from components.storage import DataDir, Layout
from components.window import Window

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)


def events_frame(rows: list[tuple[float, int, int, int]]) -> pl.DataFrame:
    """Events of the contract from (hours after T0, user_id, item_id, clicked), with dense features whose
    values identify the row (f_b = row number, f_a = -row number)."""
    hours, users, items, clicked = zip(*rows)
    frame = pl.DataFrame({"ts": [T0 + dt.timedelta(hours=h) for h in hours], "user_id": users,
                          "item_id": items, "clicked": clicked,
                          "f_b": np.arange(len(rows)), "f_a": -np.arange(len(rows))})
    return contracts.conform_events(frame)


def clicks_of(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(pl.col("clicked") == 1).select("user_id", "item_id", "ts")


def bucket(age_hours: float) -> int:
    """The documented formula, computed the slow way."""
    return min(max(math.floor(math.log2(1 + age_hours)) + 1, 1), AGE_BUCKETS - 1)


def store_of(codes: dict[int, tuple[int, ...]], path: str = "semids.parquet") -> SemIdStore:
    levels = len(next(iter(codes.values())))
    table = pl.DataFrame({"item_id": list(codes), **{f"c{l + 1}": [c[l] for c in codes.values()]
                                                     for l in range(levels)}},
                         schema={"item_id": pl.Int64, **{f"c{l + 1}": pl.Int16 for l in range(levels)}})
    return SemIdStore(Path(path), "v1", table)


# ---------------------------------------------------------------------------------------------- history


def test_history_is_the_users_earlier_clicks_oldest_first_left_padded():
    rows = [(-100, 1, 9, 1),  # long ago
            (0, 1, 10, 1), (0.5, 2, 90, 1),  # another user's click
            (1, 1, 11, 0),  # an impression without a click is no history
            (2, 1, 12, 1),
            (3, 1, 13, 1), (3, 1, 14, 0),  # a click and an impression at one timestamp
            (5, 1, 15, 1), (7.5, 1, 16, 0)]
    events = events_frame(rows)
    ex = build_examples(events.reverse(), clicks_of(events), None, history_length=3)

    assert ex.ts.tolist() == sorted(ex.ts.tolist())
    assert ex.item_id.tolist() == [9, 10, 90, 11, 12, 14, 13, 15, 16]  # stable: reversed input at ts 3h
    assert ex.hist_item.tolist() == [
        [-1, -1, -1],
        [-1, -1, 9],
        [-1, -1, -1],  # user 2 never sees user 1's clicks
        [-1, 9, 10],
        [-1, 9, 10],  # its own click is not its history
        [9, 10, 12],
        [9, 10, 12],  # the click at the same ts (item 13) is not history for either event at 3h
        [10, 12, 13],  # truncated to T: the oldest (9) dropped
        [12, 13, 15]]
    ages = [[], [100], [], [101, 1], [102, 2], [103, 3, 1], [103, 3, 1], [5, 3, 2], [5.5, 4.5, 2.5]]
    assert ex.hist_age.tolist() == [[0] * (3 - len(a)) + [bucket(h) for h in a] for a in ages]
    assert ex.hist_age[1, 2] == 7 and ex.hist_age[8].tolist() == [3, 3, 2]  # floor(log2 101) + 1; log2 3.5..6.5
    assert ex.label.tolist() == [1, 1, 1, 0, 1, 0, 1, 1, 0]
    assert ex.dense_columns == ["f_a", "f_b", "user_click_rate", "user_impressions_log"]
    assert ex.dense[:, 1].tolist() == [0, 1, 2, 3, 4, 6, 5, 7, 8] and (ex.dense[:, 0] == -ex.dense[:, 1]).all()
    # the user's impressions and clicks strictly before each event; the two rows at 3h do not count each other
    impressions, clicks = [0, 1, 0, 2, 3, 4, 4, 6, 7], [0, 1, 0, 2, 2, 3, 3, 4, 5]
    assert np.allclose(ex.dense[:, 2], [(c + 1) / (n + 2) for n, c in zip(impressions, clicks)])
    assert np.allclose(ex.dense[:, 3], np.log1p(impressions))
    assert ex.codes.shape == (9, 0) and ex.hist_codes.shape == (9, 3, 0) and ex.missing_semid == 0


def test_age_buckets_at_their_edges_and_the_cap():
    hours = [0.0001, 0.999, 1, 2.999, 3, 2 ** 13 - 1.001, 2 ** 13 - 1, 2 ** 14 - 1, 10 ** 6]
    rows = [(0, 1, 1, 1)] + [(h, 1, 2, 0) for h in hours]
    ex = build_examples(events_frame(rows), clicks_of(events_frame(rows)), None, history_length=1)
    assert ex.hist_age[1:, 0].tolist() == [1, 1, 2, 2, 3, 13, 14, 15, 15]
    assert ex.hist_age[1:, 0].tolist() == [bucket(h) for h in hours]


def reference(events: pl.DataFrame, clicks: pl.DataFrame, store: SemIdStore, length: int) -> dict:
    """The examples built one event at a time with plain Python."""
    order = np.argsort(events["ts"].to_numpy(), kind="stable")
    rows = [events.row(int(i), named=True) for i in order]
    history = sorted(clicks.iter_rows(named=True), key=lambda c: (c["user_id"], c["ts"]))  # stable
    codes = {r[0]: list(r[1:]) for r in store.table.iter_rows()}
    levels = len(store.code_columns)
    out = {"item_id": [], "codes": [], "hist_item": [], "hist_codes": [], "hist_age": []}
    for e in rows:
        earlier = [c for c in history if c["user_id"] == e["user_id"] and c["ts"] < e["ts"]][-length:]
        pad = length - len(earlier)
        out["item_id"].append(e["item_id"])
        out["codes"].append(codes.get(e["item_id"], [-1] * levels))
        out["hist_item"].append([-1] * pad + [c["item_id"] for c in earlier])
        out["hist_codes"].append([[-1] * levels] * pad + [codes.get(c["item_id"], [-1] * levels) for c in earlier])
        out["hist_age"].append([0] * pad + [bucket((e["ts"] - c["ts"]) / dt.timedelta(hours=1)) for c in earlier])
    return out


def test_build_examples_equals_a_per_event_reference():
    rng = np.random.default_rng(0)
    n = 400
    minutes = 20 * rng.integers(0, 40, n) ** 3  # many ties, ages from 0 to 20k hours
    minutes[-6:] = 24 * 60 * 3000  # impressions 3000 days on: ages past the last bucket's 16k hours
    users = np.r_[rng.integers(0, 6, n - 6), np.arange(6)] * 1000
    events = contracts.conform_events(pl.DataFrame({
        "ts": [T0 + dt.timedelta(minutes=int(m)) for m in minutes], "user_id": users,
        "item_id": rng.integers(0, 25, n), "clicked": (rng.random(n) < 0.4).astype(np.int8)}))
    extra = pl.DataFrame({"user_id": [0, 3000, 99], "item_id": [24, 7, 1],  # clicks no event of theirs shows
                          "ts": [T0 - dt.timedelta(days=3), T0, T0]}).cast({"ts": contracts.UTC})
    clicks = pl.concat([extra, clicks_of(events)]).sample(fraction=1.0, shuffle=True, seed=1)
    store = store_of({i: (i % 4, i % 7) for i in range(0, 25, 2)})  # odd items have no SemID
    ex = build_examples(events, clicks, store, history_length=4)
    expected = reference(events, clicks, store, 4)
    for key, value in expected.items():
        assert getattr(ex, key).tolist() == value, key
    assert ex.missing_semid == int((events["item_id"] % 2 == 1).sum())
    assert ex.dense.shape == (n, 2) and ex.hist_codes.shape == (n, 4, 2)
    rows = events.sort("ts", maintain_order=True).rows(named=True)
    for i, row in enumerate(rows):  # the counters the slow way: the user's events strictly earlier
        before = [r["clicked"] for r in rows if r["user_id"] == row["user_id"] and r["ts"] < row["ts"]]
        assert ex.dense[i].tolist() == pytest.approx([(sum(before) + 1) / (len(before) + 2), math.log1p(len(before))])
    assert (ex.hist_age > 0).sum() > 300 and (ex.hist_age == AGE_BUCKETS - 1).any()  # a real test of ages


# ---------------------------------------------------------------------------------------------- SemIDs


def test_codes_come_from_the_store_and_missing_ones_are_counted_or_refused():
    events = events_frame([(0, 1, 10, 1), (1, 1, 11, 1), (2, 1, 12, 0), (3, 2, 11, 0)])
    store = store_of({10: (1, 2, 3), 12: (4, 5, 6), 99: (7, 8, 9)}, path="data/semids/semids.parquet")
    ex = build_examples(events, clicks_of(events), store, history_length=2, missing_semid="rh")
    assert ex.codes.tolist() == [[1, 2, 3], [-1, -1, -1], [4, 5, 6], [-1, -1, -1]]
    assert ex.missing_semid == 2 and ex.codes.dtype == np.int16 and ex.hist_codes.dtype == np.int16  # the store's type
    assert ex.hist_codes[2].tolist() == [[1, 2, 3], [-1, -1, -1]]  # item 11 has no SemID: -1, not counted
    assert ex.hist_codes[0].tolist() == [[-1, -1, -1]] * 2  # padding

    with pytest.raises(DataError) as err:
        build_examples(events, clicks_of(events), store, history_length=2, missing_semid="fail")
    message = str(err.value)
    assert "2 event(s) on 1 item(s)" in message and "[11]" in message
    assert "data/semids/semids.parquet" in message and "ranker.missing_semid" in message
    with pytest.raises(ParamsError, match="ranker.missing_semid"):
        build_examples(events, clicks_of(events), store, history_length=2, missing_semid="hash")

    picked = ex.take(np.array([3, 0]))  # rows in the order asked, the missing count follows the rows
    assert picked.item_id.tolist() == [11, 10] and picked.missing_semid == 1
    assert picked.hist_codes.tolist() == [ex.hist_codes[3].tolist(), ex.hist_codes[0].tolist()]
    assert ex.take(slice(0, 2)).missing_semid == 1 and len(ex.take(slice(4, 9))) == 0


# ---------------------------------------------------------------------------------------------- batches


def test_batches_are_views_in_row_order_and_concat_adds_up():
    rows = [(h, h % 3, h, h % 2) for h in range(10)]
    events = events_frame(rows)
    store = store_of({i: (i, i + 1) for i in range(10)})
    ex = build_examples(events, clicks_of(events), store, history_length=3)
    batches = list(ex.batches(4))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"label", "dense", "item_id", "codes", "hist_item", "hist_codes", "hist_age", "ts"}
    assert batches[1]["hist_codes"].shape == (4, 3, 2) and batches[2]["dense"].shape == (2, 2 + 2)  # f_a, f_b, counters
    assert np.shares_memory(batches[1]["hist_item"].numpy(), ex.hist_item)  # no copies
    assert batches[2]["item_id"].tolist() == [8, 9]
    with pytest.raises(ParamsError, match="ranker.batch_size"):
        next(ex.batches(0))

    parts = [build_examples(events[:6], clicks_of(events), store, 3),
             build_examples(events[6:], clicks_of(events), store, 3, counts=add_counts(NO_COUNTS, events[:6]))]
    whole = Examples.concat(parts)
    assert len(whole) == 10 and whole.missing_semid == ex.missing_semid == 0
    for f in dataclasses.fields(Examples):
        if f.name not in ("dense_columns", "missing_semid"):
            assert np.array_equal(getattr(whole, f.name), getattr(ex, f.name)), f.name


# ---------------------------------------------------------------------------------------------- window


@pytest.fixture
def ten_days(tmp_path) -> DataDir:
    """Ten day partitions, 2026-01-01..10, one click per day by user 1 at noon, plus an unreadable file in a
    partition no 2026 window needs (reading it would fail)."""
    data = DataDir(tmp_path)
    for day in range(10):
        data.write_events(T0.date() + dt.timedelta(days=day), events_frame([(24 * day + 12, 1, day, 1)]))
    bad = data.partition(dt.date(2025, 12, 1)) / "part-0.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_text("not parquet")
    return data


def test_ranker_window_defaults_to_the_end_of_the_data(ten_days):
    (ten_days.partition(dt.date(2025, 12, 1)) / "part-0.parquet").unlink()
    (ten_days.partition(dt.date(2025, 12, 1))).rmdir()
    p = RankerParams(train_days=4, eval_hours=24)
    day = lambda d, h=0: dt.datetime(2026, 1, d, h, tzinfo=UTC)  # noqa: E731
    assert ranker_window(p, ten_days) == (Window(day(6), day(10)), Window(day(10), day(11)))
    p = RankerParams(train_end=dt.date(2026, 1, 5), train_days=4, eval_hours=6)
    assert ranker_window(p, ten_days) == (Window(day(1), day(5)), Window(day(5), day(5, 6)))
    p = RankerParams(train_days=4, eval_hours=24)  # as of a day: the evaluation window ends there
    assert ranker_window(p, ten_days, as_of=dt.date(2026, 1, 8)) == (Window(day(3), day(7)), Window(day(7), day(8)))


def test_eval_share_sizes_the_evaluation_window_by_events(tmp_path):
    """Nine days of one event, then a day of nine (hours 1-9): half the events are that last day's, so the
    evaluation starts at its 01:00, and training without train_days goes back to the data's first day."""
    data = DataDir(tmp_path)
    for day in range(9):
        data.write_events(T0.date() + dt.timedelta(days=day), events_frame([(24 * day + 12, 1, day, 1)]))
    last_day = events_frame([(24 * 9 + h, 1, 10 + h, 1) for h in range(1, 10)])
    data.write_events(T0.date() + dt.timedelta(days=9), last_day)
    day = lambda d, h=0: dt.datetime(2026, 1, d, h, tzinfo=UTC)  # noqa: E731
    p = RankerParams(train_days=None, eval_share=0.5)
    assert ranker_window(p, data) == (Window(day(1), day(10, 1)), Window(day(10, 1), day(11)))
    p = RankerParams(train_days=2, eval_share=0.6)  # 11 of 18 events: day 9's nine and the two noons before it
    assert ranker_window(p, data) == (Window(day(6, 12), day(8, 12)), Window(day(8, 12), day(11)))
    as_of = ranker_window(RankerParams(train_days=None, eval_share=0.5), data, as_of=dt.date(2026, 1, 9))
    assert as_of == (Window(day(1), day(5, 12)), Window(day(5, 12), day(9)))  # 4 of the 8 days' events


@pytest.mark.parametrize("p, error, names", [
    (RankerParams(train_days=10), DataError, ["ranker.train_days", "starts before the data"]),
    (RankerParams(train_end=dt.date(2026, 1, 3), train_days=3), DataError, ["ranker.train_end", "2026-01-01"]),
    (RankerParams(train_end=dt.date(2026, 1, 10), train_days=3, eval_hours=25), DataError,
     ["ranker.eval_hours", "ends after"]),
    (RankerParams(train_days=0), ParamsError, ["ranker.train_days"]),
    (RankerParams(eval_hours=0), ParamsError, ["ranker.eval_hours"]),
    (RankerParams(eval_share=1.0), ParamsError, ["ranker.eval_share", "(0, 1)"]),
    (RankerParams(train_days=None, train_end=dt.date(2026, 1, 1)), DataError, ["ranker.train_end"]),
])
def test_ranker_window_outside_the_data_is_refused(tmp_path, p, error, names):
    data = DataDir(tmp_path)
    for day in range(10):
        data.write_events(T0.date() + dt.timedelta(days=day), events_frame([(24 * day, 1, day, 1)]))
    with pytest.raises(error) as err:
        ranker_window(p, data)
    assert all(name in str(err.value) for name in names), str(err.value)


def test_load_clicks_reads_only_the_window(ten_days):
    start, end = dt.datetime(2026, 1, 2, 12, tzinfo=UTC), dt.datetime(2026, 1, 4, 12, tzinfo=UTC)
    clicks = load_clicks(ten_days, start, end)  # the unreadable December file is never opened
    assert clicks.columns == ["user_id", "item_id", "ts"] and clicks["item_id"].to_list() == [1, 2]  # end excluded
    assert clicks["ts"].dtype == pl.Datetime("us", "UTC")


def test_an_empty_window_is_a_data_error(ten_days):
    start = dt.datetime(2026, 1, 3, 13, tzinfo=UTC)  # after the day's only event, at noon
    with pytest.raises(DataError, match="empty evaluation window") as err:
        load_examples(ten_days, start, start + dt.timedelta(hours=6), None, RankerParams(), "evaluation")
    assert str(ten_days.events) in str(err.value) and "2026-01-03 13:00" in str(err.value)


# ---------------------------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, small_world_params) -> DataDir:
    layout = Layout(tmp_path_factory.mktemp("ranker-data-world"))
    run_generate(small_world_params, layout)
    return layout.raw


def test_streaming_over_days_equals_one_build_and_history_reaches_back_the_lookback(small_world):
    data = small_world
    days = [day for day, _ in data.event_files()]
    start = dt.datetime.combine(days[3], dt.time(6), tzinfo=UTC)  # partial days at both edges
    end = dt.datetime.combine(days[7], dt.time(18), tzinfo=UTC)
    p = RankerParams(history=HistoryParams(length=5, lookback_days=2))
    items = pl.read_parquet(data.items)["item_id"].to_numpy()
    rng = np.random.default_rng(0)
    kept = items[rng.random(len(items)) < 0.9]
    store = SemIdStore(Path("semids.parquet"), "v1", pl.DataFrame(
        {"item_id": kept, "c1": rng.integers(0, 8, len(kept)), "c2": rng.integers(0, 8, len(kept))}))

    parts = list(iter_examples(data, start, end, store, p))
    assert len(parts) == 5
    assert all(np.diff(part.ts).min() >= 0 and part.ts[-1] < later.ts[0] for part, later in zip(parts, parts[1:]))
    streamed = Examples.concat(parts)

    events = pl.read_parquet([f for _, f in data.event_files()])
    in_window = events.filter((pl.col("ts") >= start) & (pl.col("ts") < end))
    lookback = start - dt.timedelta(days=2)
    before = events.filter((pl.col("ts") >= lookback) & (pl.col("ts") < start))
    once = build_examples(in_window, load_clicks(data, lookback, end), store, 5, counts=add_counts(NO_COUNTS, before))
    assert len(once) == len(in_window) == len(streamed) and streamed.missing_semid == once.missing_semid > 0
    for f in dataclasses.fields(Examples):
        if f.name not in ("dense_columns", "missing_semid"):
            assert np.array_equal(getattr(streamed, f.name), getattr(once, f.name)), f.name
    assert streamed.dense_columns == ["f_item_age_days", "f_position", "f_user_prior", *USER_COUNTERS]
    assert streamed.ts.min() >= start.timestamp() * 1e6 and streamed.ts.max() < end.timestamp() * 1e6

    # history length = the user's clicks in [start - lookback, ts), capped at T: clicks before `start` count,
    # clicks before the lookback do not
    clicks = clicks_of(events).with_columns(pl.col("ts").dt.epoch("us"))
    per_user = {u: np.sort(g["ts"].to_numpy()) for (u,), g in clicks.group_by("user_id")}
    def earlier(since: dt.datetime) -> np.ndarray:
        bound = int(since.timestamp() * 1e6)
        return np.array([np.sum((per_user.get(u, np.empty(0)) >= bound) & (per_user.get(u, np.empty(0)) < t))
                         for u, t in zip(streamed.user_id, streamed.ts)])
    length = (streamed.hist_item >= 0).sum(axis=1)
    assert (length == np.minimum(5, earlier(lookback))).all()
    assert (length > np.minimum(5, earlier(start))).any()  # clicks from before the window are history
    assert (length < np.minimum(5, earlier(T0 - dt.timedelta(days=365)))).any()  # the lookback bites

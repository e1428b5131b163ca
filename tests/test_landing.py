"""Landing: data/raw as it stood on a day, cut from the generated stream; idempotent, and restartable earlier."""
import dataclasses
import datetime as dt

import polars as pl
import pytest

from components.data.landing import land
from components.data.world import run_generate
from components.errors import DataError
from components.storage import Layout
from components.window import data_span, utc_midnight


@pytest.fixture(scope="module")
def stream(tmp_path_factory, small_world_params) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("landing"))
    run_generate(dataclasses.replace(small_world_params, days=10), layout, into=layout.stream)
    return layout


def partitions(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.raw.events.iterdir())


def test_landing_holds_exactly_what_was_known_before_the_day(stream, tmp_path):
    lake = Layout(tmp_path).raw
    start = data_span(stream.stream).start.date()
    as_of = start + dt.timedelta(days=4)
    moved = land(stream.stream, Layout(tmp_path), as_of)
    assert moved["partitions_landed"] == 4 and data_span(lake).end.date() == as_of
    for day in range(4):  # the same bytes as the stream
        name = f"date={start + dt.timedelta(days=day)}"
        for f in (stream.stream.events / name).iterdir():
            assert (lake.events / name / f.name).read_bytes() == f.read_bytes()
    items, every = pl.read_parquet(lake.items), pl.read_parquet(stream.stream.items)
    cut = utc_midnight(as_of)
    assert items["item_id"].to_list() == every.filter(pl.col("created_at") < cut)["item_id"].to_list()
    assert items.filter(pl.col("retired_at") >= cut).is_empty()  # a later retirement is not known yet
    assert items["retired_at"].null_count() > every.filter(pl.col("created_at") < cut)["retired_at"].null_count()


def test_landing_day_by_day_copies_one_partition_and_restarts_earlier(stream, tmp_path):
    lake = Layout(tmp_path).raw
    start = data_span(stream.stream).start.date()
    land(stream.stream, Layout(tmp_path), start + dt.timedelta(days=3))
    assert land(stream.stream, Layout(tmp_path), start + dt.timedelta(days=4))["partitions_landed"] == 1
    assert land(stream.stream, Layout(tmp_path), start + dt.timedelta(days=4))["partitions_landed"] == 0
    back = land(stream.stream, Layout(tmp_path), start + dt.timedelta(days=2))
    assert back["partitions_removed"] == 2 and len(list(lake.events.iterdir())) == 2


def test_landing_outside_the_stream_is_a_clear_error(stream, tmp_path):
    span = data_span(stream.stream)
    with pytest.raises(DataError, match="generate a longer world"):
        land(stream.stream, Layout(tmp_path), span.end.date() + dt.timedelta(days=1))
    with pytest.raises(DataError, match="nothing to land"):
        land(stream.stream, Layout(tmp_path), span.start.date())
    with pytest.raises(DataError, match="no generated stream"):
        land(Layout(tmp_path / "empty").stream, Layout(tmp_path), span.end.date())

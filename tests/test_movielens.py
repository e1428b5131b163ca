"""The MovieLens import: one hand-written fixture release per layout, the bad inputs, and the real sample."""
from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import polars as pl
import pytest

from components.data.contracts import check_schema, read_schema
from components.data.movielens import load_release, run_import
from components.errors import DataError
from components.storage import DataDir, Layout

FIXTURES = Path(__file__).parent / "fixtures" / "movielens"
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-latest-small"  # ../shared
UTC = dt.timezone.utc


def at(unix_seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_seconds, UTC)


def texts(items: pl.DataFrame) -> dict[int, str]:
    return dict(zip(items["item_id"], items["text"]))


def events_of(events: pl.DataFrame) -> list[tuple]:
    return [(int(e["ts"].timestamp()), e["user_id"], e["item_id"], e["clicked"]) for e in events.iter_rows(named=True)]


def check_contracts(items: pl.DataFrame, events: pl.DataFrame) -> None:
    check_schema("items", items.schema, "items")
    check_schema("events", events.schema, "events")
    assert items["item_id"].is_unique().all()
    assert events["ts"].is_sorted()
    created = events.join(items, on="item_id").filter(pl.col("ts") < pl.col("created_at"))
    assert created.is_empty(), "an event precedes its item's creation"


def release_copy(tmp_path: Path, layout: str) -> Path:
    """A writable copy of a fixture release, for the tests that break one of its files."""
    return Path(shutil.copytree(FIXTURES / layout, tmp_path / layout))


def test_csv_release_with_tags(caplog):
    with caplog.at_level(logging.WARNING, logger="components.data.movielens"):
        items, events = load_release(FIXTURES / "csv")

    check_contracts(items, events)
    assert texts(items) == {
        1: "Toy Story (1995) | Adventure, Animation, Children, Comedy, Fantasy | pixar, fun",
        2: "American President, The (1995) | Comedy, Drama, Romance | funny, political",
        3: "Unrated Film (2001) | Drama",
        4: "Empty Genres (2010)",
        # the 10 most frequent of 12 tags (case folded), ties alphabetical: j and k do not make it
        5: "Tag Magnet (2012) | Documentary | zeta, alpha, beta, c, d, e, f, g, h, i",
    }
    assert items["category"].to_list() == ["Adventure", "Comedy", "Drama", None, "Documentary"]
    assert items["retired_at"].null_count() == len(items)
    # created at the first rating; the unrated movie 3 at the release's last rating
    assert items["created_at"].to_list() == [at(946684799), at(946771200), at(946771300), at(946700000),
                                             at(946771300)]
    # sorted by ts, clicked = rating >= 4; the rating of unknown movie 99 is dropped with a warning
    assert events_of(events) == [(946684799, 1, 1, 1), (946684800, 2, 1, 0), (946700000, 2, 4, 0),
                                 (946771200, 1, 2, 1), (946771300, 3, 5, 1)]
    assert "dropped 1 rating(s) of 1 movie(s) that movies.csv does not list" in caplog.text


def test_csv_release_without_tags():
    items, events = load_release(FIXTURES / "csv-no-tags")

    check_contracts(items, events)
    assert texts(items) == {10: "GoldenEye (1995) | Action, Adventure, Thriller",
                            20: "Money Train, The (1995) | Action, Comedy, Crime, Drama, Thriller"}
    assert items["created_at"].to_list() == [at(1400000000), at(1500000000)]
    assert events_of(events) == [(1400000000, 8, 10, 0), (1500000000, 7, 20, 0), (1500000100, 7, 10, 1)]


def test_ml_1m_release_is_latin1_and_colon_safe():
    items, events = load_release(FIXTURES / "ml-1m")

    check_contracts(items, events)
    assert texts(items) == {1: "Toy Story (1995) | Animation, Children's, Comedy",
                            2: "Misérables, Les (1995) | Drama, Musical",
                            3: "Star Wars: Episode IV - A New Hope (1977) | Action, Adventure, Fantasy, Sci-Fi"}
    assert items["category"].to_list() == ["Animation", "Drama", "Action"]
    assert events_of(events) == [(978298413, 2, 3, 1), (978299000, 2, 1, 0), (978300760, 1, 1, 1),
                                 (978302109, 1, 2, 0)]


def test_ml_10m_release_reads_half_stars_and_tags():
    items, events = load_release(FIXTURES / "ml-10m")

    check_contracts(items, events)
    assert texts(items) == {5: "Heat (1995) | Action, Crime, Thriller | heist, based on: a true story",
                            6: "Sabrina (1995) | Comedy, Romance"}
    assert events["clicked"].to_list() == [0, 1, 1]  # 3.5, 4.5, 4


def test_ml_100k_release_maps_genre_flags():
    items, events = load_release(FIXTURES / "ml-100k")

    check_contracts(items, events)
    assert texts(items) == {1: "Toy Story (1995) | Animation, Children's, Comedy",
                            2: "Cité des enfants perdus, La (1995) | Adventure, Fantasy, Sci-Fi",
                            267: "unknown"}  # the "unknown" genre counts as none
    assert items["category"].to_list() == ["Animation", "Adventure", None]
    assert items["created_at"].to_list() == [at(878887116), at(891717742), at(891717742)]
    assert events_of(events) == [(878887116, 22, 1, 1), (881250949, 196, 1, 0), (891717742, 186, 2, 1)]


def test_run_import_writes_one_partition_per_utc_day(tmp_path):
    layout = Layout(tmp_path)
    run_import(FIXTURES / "csv", layout)

    raw = layout.raw
    check_schema("items", read_schema(raw.items), raw.items)
    files = raw.event_files()
    assert [(day, path.relative_to(raw.root).as_posix()) for day, path in files] == [
        (dt.date(1999, 12, 31), "events/date=1999-12-31/part-0.parquet"),
        (dt.date(2000, 1, 1), "events/date=2000-01-01/part-0.parquet"),
        (dt.date(2000, 1, 2), "events/date=2000-01-02/part-0.parquet"),
    ]
    for day, path in files:
        check_schema("events", read_schema(path), path)
        assert (pl.read_parquet(path)["ts"].dt.date() == day).all()
    items, events = load_release(FIXTURES / "csv")
    assert pl.read_parquet(raw.items).equals(items)
    assert pl.concat(pl.read_parquet(path) for _, path in files).equals(events)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]  # no staging directory left behind


def test_failed_import_leaves_the_old_raw_data(tmp_path, monkeypatch):
    layout = Layout(tmp_path)
    run_import(FIXTURES / "csv-no-tags", layout)
    before = sorted(p.relative_to(tmp_path) for p in layout.raw.root.rglob("*"))

    def crash(self, day, events, part=0):
        raise OSError("disk full")

    monkeypatch.setattr(DataDir, "write_events", crash)
    with pytest.raises(OSError, match="disk full"):
        run_import(FIXTURES / "csv", layout)

    assert sorted(p.relative_to(tmp_path) for p in layout.raw.root.rglob("*")) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]


def test_unrecognised_directory_lists_the_expected_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a release")

    with pytest.raises(DataError) as err:
        load_release(tmp_path)

    message = str(err.value)
    assert message.startswith(f"{tmp_path}: not a MovieLens release")
    for name in ("movies.csv", "ratings.csv", "tags.csv", "movies.dat", "ratings.dat", "u.item", "u.data", "u.genre"):
        assert name in message


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="MovieLens directory not found"):
        load_release(tmp_path / "nowhere")


def test_missing_ratings_file_is_named(tmp_path):
    release = release_copy(tmp_path, "csv")
    (release / "ratings.csv").unlink()

    with pytest.raises(DataError) as err:
        load_release(release)
    assert str(err.value) == (f"{release}: ratings.csv not found; "
                              "expected a ml-latest/ml-25m (movies.csv, ratings.csv, optional tags.csv) release")


@pytest.mark.parametrize(("layout", "file", "content", "expected"), [
    ("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,four,946684799\n",
     r"ratings\.csv: expected CSV columns userId,movieId,rating,timestamp \(could not parse `four`"),
    ("csv", "ratings.csv", "userId,movieId,rating\n1,1,4.0\n",
     r"ratings\.csv: expected CSV columns userId,movieId,rating,timestamp \(.*timestamp"),
    ("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,946684799\n2,1,,946684800\n",
     r"ratings\.csv: 1 row\(s\) with an empty userId/movieId/rating/timestamp field, first on line 3"),
    ("csv", "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n1,Again (1995),Drama\n",
     r"movies\.csv: 1 movie id\(s\) listed more than once, e\.g\. 1"),
    ("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,99,4.0,946684799\n",
     r"ratings\.csv: no ratings of a movie listed in movies\.csv"),
    ("ml-1m", "ratings.dat", "1::1::5::978300760\n1;;2;;3;;978302109\n",
     r"ratings\.dat: 1 line\(s\) not of the form UserID::MovieID::Rating::Timestamp, first line 2: '1;;2;;3"),
    ("ml-1m", "movies.dat", "1::::Comedy\n",
     r"movies\.dat: 1 movie\(s\) with an empty title, e\.g\. id 1"),
    ("ml-100k", "u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n",
     r"u\.item: 1 line\(s\) not of the form movie id\|title\|.*\|19 genre flags, first line 1"),
])
def test_bad_input_names_the_file_and_what_was_expected(tmp_path, layout, file, content, expected):
    release = release_copy(tmp_path, layout)
    (release / file).write_text(content)

    with pytest.raises(DataError, match=expected) as err:
        load_release(release)
    assert str(release / file) in str(err.value)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} is absent")
def test_real_ml_latest_small(tmp_path):
    layout = Layout(tmp_path)
    run_import(SAMPLE, layout)

    items = pl.read_parquet(layout.raw.items)
    files = layout.raw.event_files()
    events = pl.read_parquet(layout.raw.events / "**" / "*.parquet", hive_partitioning=False)
    check_contracts(items, events)
    assert len(items) == 9_742
    assert len(events) == 100_836
    assert len(files) == events["ts"].dt.date().n_unique()
    assert (files[0][0], files[-1][0]) == (dt.date(1996, 3, 29), dt.date(2018, 9, 24))
    assert texts(items)[1].startswith("Toy Story (1995) | Adventure, Animation, Children, Comedy, Fantasy | ")

"""Import a MovieLens release (GroupLens) as data/raw: one item per movie, one event per rating.

The mapping is the usual one in the literature:
- event: ts = the rating's unix timestamp (UTC); clicked = 1 when rating >= 4.0, else 0.
- item: item_id = movieId; text = "title | genres | tags": genres comma-separated ("(no genres listed)" and
  ml-100k's "unknown" count as none), then up to 10 most frequent tags, lower-cased, ties broken
  alphabetically; empty parts are dropped. category = the first listed genre (null when none); retired_at
  = null.
- created_at: MovieLens records no creation time, so a movie is created at its first rating, which keeps
  "no event before its item's creation" true. A movie nobody rated gets the release's last rating time: it
  is known to exist by the snapshot.

Layouts are told apart by the files present: ml-latest, ml-latest-small, ml-20m and ml-25m (CSV);
ml-1m and ml-10m (`::`-separated .dat); ml-100k (u.item, u.data, u.genre). Ratings of movies that the
movies file does not list are dropped with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import polars as pl
from rich.progress import track

from components.data.contracts import UTC, conform_events, conform_items
from components.errors import DataError
from components.storage import DataDir, Layout, staged_dir

log = logging.getLogger(__name__)

CLICK_MIN_RATING = 4.0
TOP_TAGS = 10
NO_GENRES = ["(no genres listed)", "unknown"]  # ml-latest's and ml-100k's marks for "no genre"
PROGRESS_MIN_DAYS = 100  # show a progress bar when writing at least this many event partitions


class Release(NamedTuple):
    """A release read into columns common to every layout, before it is mapped onto the contracts."""
    movies: pl.DataFrame   # movie_id Int64, title String, genres List[String] (in the release's order)
    ratings: pl.DataFrame  # user_id Int64, movie_id Int64, rating Float64, timestamp Int64 (unix seconds)
    tags: pl.DataFrame     # movie_id Int64, tag String


class LineFormat(NamedTuple):
    """A text file read line by line: `pattern` has one named group per column of `columns`."""
    spec: str
    pattern: str
    columns: dict[str, pl.DataType]


RATINGS = {"user_id": pl.Int64, "movie_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
NO_TAGS = pl.DataFrame(schema={"movie_id": pl.Int64, "tag": pl.String})

# Only a title or a tag may hold ':' or '|', so the greedy (.*) of that one free-text field is unambiguous.
MOVIES_DAT = LineFormat("MovieID::Title::Genres", r"^(?P<movie_id>\d+)::(?P<title>.*)::(?P<genres>[^:\r]*)\r?$",
                        {"movie_id": pl.Int64, "title": pl.String, "genres": pl.String})
RATINGS_DAT = LineFormat("UserID::MovieID::Rating::Timestamp",
                         r"^(?P<user_id>\d+)::(?P<movie_id>\d+)::(?P<rating>\d+(?:\.\d+)?)::(?P<timestamp>\d+)\r?$",
                         RATINGS)
TAGS_DAT = LineFormat("UserID::MovieID::Tag::Timestamp",
                      r"^(?P<user_id>\d+)::(?P<movie_id>\d+)::(?P<tag>.*)::(?P<timestamp>\d+)\r?$",
                      {"movie_id": pl.Int64, "tag": pl.String})
DATA_100K = LineFormat("user id<TAB>item id<TAB>rating<TAB>timestamp",
                       r"^(?P<user_id>\d+)\t(?P<movie_id>\d+)\t(?P<rating>\d+(?:\.\d+)?)\t(?P<timestamp>\d+)\r?$",
                       RATINGS)
GENRE_100K = LineFormat("name|index", r"^(?P<name>[^|]+)\|(?P<index>\d+)\r?$", {"name": pl.String, "index": pl.Int64})


def _item_100k(n_genres: int) -> LineFormat:
    """u.item: id|title|release date|video release date|IMDb URL| then one 0/1 flag per genre of u.genre."""
    return LineFormat(f"movie id|title|release date|video release date|IMDb URL|{n_genres} genre flags",
                      rf"^(?P<movie_id>\d+)\|(?P<title>[^|]*)\|[^|]*\|[^|]*\|[^|]*\|"
                      rf"(?P<flags>[01](?:\|[01]){{{n_genres - 1}}})\r?$",
                      {"movie_id": pl.Int64, "title": pl.String, "flags": pl.String})


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _read_csv(path: Path, columns: dict[str, pl.DataType], nullable: tuple[str, ...] = ()) -> pl.DataFrame:
    """The named columns of an ml-latest CSV file, ids renamed movie_id and user_id; a DataError naming the
    file when a column is absent, a value unparseable, or a field empty outside `nullable`."""
    try:
        df = pl.read_csv(path, columns=list(columns), schema_overrides=columns)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"{path}: expected CSV columns {','.join(columns)} ({_first_line(exc)})") from exc
    required = [c for c in columns if c not in nullable]
    empty = df.with_row_index("row", offset=2).filter(pl.any_horizontal(pl.col(required).is_null()))
    if len(empty):
        raise DataError(f"{path}: {len(empty):,} row(s) with an empty {'/'.join(required)} field, "
                        f"first on line {empty['row'][0]}")
    return df.rename({"movieId": "movie_id", "userId": "user_id"}, strict=False)


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, else latin-1 (how ml-100k and ml-1m are encoded)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_lines(path: Path, fmt: LineFormat) -> pl.DataFrame:
    """Parse every non-blank line of `path` with `fmt`, or raise a DataError quoting the first bad line."""
    lines = (pl.Series("line", [_read_text(path)]).str.split("\n").explode().to_frame()
             .with_row_index("line_no", offset=1).filter(pl.col("line").str.strip_chars() != ""))
    parsed = lines.with_columns(pl.col("line").str.extract_groups(fmt.pattern).alias("fields")).unnest("fields")
    bad = parsed.filter(pl.col(next(iter(fmt.columns))).is_null())
    if len(bad):
        line_no, line = bad.row(0)[:2]
        raise DataError(f"{path}: {len(bad):,} line(s) not of the form {fmt.spec}, "
                        f"first line {line_no}: {line[:100]!r}")
    try:
        return parsed.select(pl.col(c).cast(t) for c, t in fmt.columns.items())
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: a value out of range in {fmt.spec} ({_first_line(exc)})") from exc


def _read_ml_latest(d: Path) -> Release:
    movies = _read_csv(d / "movies.csv", {"movieId": pl.Int64, "title": pl.String, "genres": pl.String},
                       nullable=("genres",))
    ratings = _read_csv(d / "ratings.csv", {"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64,
                                            "timestamp": pl.Int64})
    tags = (_read_csv(d / "tags.csv", {"movieId": pl.Int64, "tag": pl.String}, nullable=("tag",))
            if (d / "tags.csv").is_file() else NO_TAGS)
    return Release(movies.with_columns(pl.col("genres").str.split("|")), ratings, tags)


def _read_ml_1m(d: Path) -> Release:
    movies = _read_lines(d / "movies.dat", MOVIES_DAT).with_columns(pl.col("genres").str.split("|"))
    tags = _read_lines(d / "tags.dat", TAGS_DAT) if (d / "tags.dat").is_file() else NO_TAGS
    return Release(movies, _read_lines(d / "ratings.dat", RATINGS_DAT), tags)


def _read_ml_100k(d: Path) -> Release:
    names = _read_lines(d / "u.genre", GENRE_100K).sort("index")["name"].to_list()
    flags = pl.col("flags").str.split("|")
    genres = pl.concat_list([pl.when(flags.list.get(i) == "1").then(pl.lit(name)) for i, name in enumerate(names)])
    movies = _read_lines(d / "u.item", _item_100k(len(names))).select("movie_id", "title",
                                                                      genres=genres.list.drop_nulls())
    return Release(movies, _read_lines(d / "u.data", DATA_100K), NO_TAGS)


@dataclasses.dataclass(frozen=True)
class Format:
    """A MovieLens file layout: the files it needs and how to read them."""
    name: str
    movies: str
    ratings: str
    read: Callable[[Path], Release]
    others: tuple[str, ...] = ()
    tags: str | None = None

    @property
    def required(self) -> tuple[str, ...]:
        return (self.movies, self.ratings, *self.others)

    def __str__(self) -> str:
        files = ", ".join(self.required) + (f", optional {self.tags}" if self.tags else "")
        return f"{self.name} ({files})"


FORMATS = (
    Format("ml-latest/ml-25m", "movies.csv", "ratings.csv", _read_ml_latest, tags="tags.csv"),
    Format("ml-1m/ml-10m", "movies.dat", "ratings.dat", _read_ml_1m, tags="tags.dat"),
    Format("ml-100k", "u.item", "u.data", _read_ml_100k, others=("u.genre",)),
)


def detect(directory: Path) -> Format:
    """The layout of the release in `directory`, told by its files."""
    if not directory.is_dir():
        raise DataError(f"{directory}: MovieLens directory not found")
    for fmt in FORMATS:
        missing = [f for f in fmt.required if not (directory / f).is_file()]
        if len(missing) < len(fmt.required):
            if missing:
                raise DataError(f"{directory}: {', '.join(missing)} not found; expected a {fmt} release")
            return fmt
    raise DataError(f"{directory}: not a MovieLens release; expected the files of one of: "
                    + "; ".join(str(f) for f in FORMATS))


def _check_movies(movies: pl.DataFrame, path: Path) -> None:
    """Movie ids are unique and every title is non-empty, so every item gets an id and a text."""
    duplicated = movies.filter(pl.col("movie_id").is_duplicated())["movie_id"].unique().sort()
    if len(duplicated):
        raise DataError(f"{path}: {len(duplicated):,} movie id(s) listed more than once, e.g. {duplicated[0]}")
    untitled = movies.filter(pl.col("title").str.strip_chars() == "")["movie_id"]
    if len(untitled):
        raise DataError(f"{path}: {len(untitled):,} movie(s) with an empty title, e.g. id {untitled[0]}")


def _known_ratings(release: Release, directory: Path, fmt: Format) -> pl.DataFrame:
    """The ratings of listed movies; the others are dropped with a warning."""
    known = release.ratings.join(release.movies.select("movie_id"), on="movie_id", how="semi")
    dropped = release.ratings.height - known.height
    if dropped:
        movies = release.ratings.join(known, on="movie_id", how="anti")["movie_id"].n_unique()
        log.warning("%s: dropped %d rating(s) of %d movie(s) that %s does not list",
                    directory / fmt.ratings, dropped, movies, fmt.movies)
    if known.is_empty():
        raise DataError(f"{directory / fmt.ratings}: no ratings of a movie listed in {fmt.movies}")
    return known


def _utc(unix_seconds: pl.Expr) -> pl.Expr:
    return pl.from_epoch(unix_seconds, time_unit="s").dt.replace_time_zone("UTC")


def _nonempty(text: pl.Expr) -> pl.Expr:
    return pl.when(text != "").then(text)


def _top_tags(tags: pl.DataFrame) -> pl.DataFrame:
    """movie_id, tags: a movie's TOP_TAGS most frequent tags, lower-cased, ties alphabetical, comma-joined."""
    return (tags.select("movie_id", tag=pl.col("tag").str.strip_chars().str.to_lowercase())
            .filter(pl.col("tag") != "")
            .group_by("movie_id", "tag").len()
            .sort(["movie_id", "len", "tag"], descending=[False, True, False])
            .group_by("movie_id", maintain_order=True)
            .agg(tags=pl.col("tag").head(TOP_TAGS).str.join(", ")))


def _items(movies: pl.DataFrame, ratings: pl.DataFrame, tags: pl.DataFrame) -> pl.DataFrame:
    """One item per movie, created at its first rating (the release's last rating when it has none)."""
    first_rating = ratings.group_by("movie_id").agg(first=pl.col("timestamp").min())
    items = (movies.join(first_rating, on="movie_id", how="left").join(_top_tags(tags), on="movie_id", how="left")
             .with_columns(genres=pl.col("genres").list.eval(pl.element().filter(~pl.element().is_in(NO_GENRES))))
             .select(item_id="movie_id",
                     created_at=_utc(pl.col("first").fill_null(ratings["timestamp"].max())),
                     text=pl.concat_str([pl.col("title"), _nonempty(pl.col("genres").list.join(", ")), "tags"],
                                        separator=" | ", ignore_nulls=True),
                     category=pl.col("genres").list.first(),
                     retired_at=pl.lit(None, dtype=UTC)))
    return conform_items(items.sort("item_id"))


def _events(ratings: pl.DataFrame) -> pl.DataFrame:
    """One event per rating, clicked when rated CLICK_MIN_RATING or more, in ts order."""
    events = ratings.select(ts=_utc(pl.col("timestamp")), user_id="user_id", item_id="movie_id",
                            clicked=(pl.col("rating") >= CLICK_MIN_RATING).cast(pl.Int8))
    return conform_events(events.sort("ts", "user_id", "item_id"))


def _load(fmt: Format, directory: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    release = fmt.read(directory)
    _check_movies(release.movies, directory / fmt.movies)
    ratings = _known_ratings(release, directory, fmt)
    return _items(release.movies, ratings, release.tags), _events(ratings)


def load_release(directory: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(items, events) of the release in `directory`, conformed to the contracts, events sorted by ts."""
    return _load(detect(directory), directory)


def _write_events(out: DataDir, events: pl.DataFrame) -> int:
    """Write one partition per UTC day of ts; return how many days there were."""
    days = events.with_columns(day=pl.col("ts").dt.date()).partition_by("day", as_dict=True, include_key=False)
    for (day,), part in track(days.items(), total=len(days), description="writing event partitions",
                              disable=len(days) < PROGRESS_MIN_DAYS):
        out.write_events(day, part)
    return len(days)


def run_import(directory: Path, layout: Layout, into: DataDir | None = None) -> None:
    """Replace data/raw (or `into`) with the release in `directory`, whole: a failed import leaves the old one as
    it was."""
    into = into or layout.raw
    fmt = detect(directory)
    items, events = _load(fmt, directory)
    with staged_dir(into.root) as tmp:
        out = DataDir(tmp)
        out.write_items(items)
        days = _write_events(out, events)
    log.info("imported %s release %s: %s items, %s events, %s .. %s (%s days) -> %s", fmt.name, directory,
             f"{len(items):,}", f"{len(events):,}", events["ts"][0].date(), events["ts"][-1].date(), f"{days:,}",
             into.root)

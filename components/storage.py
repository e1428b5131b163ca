"""Where every artifact lives, and how it is written: always to a temporary name, then renamed into place,
so a crash never leaves a half-written file or directory behind. Every S3 request goes through `S3` below:
botocore retries transient faults (adaptive mode), each upload is verified by its SHA256 checksum, and a
request that fails for good raises StorageError naming the operation and the URL. `Lake` is storage.root, the
one place raw partitions land and artifacts are published: a local directory or s3://bucket/prefix."""
from __future__ import annotations

import abc
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from components.errors import DataError, SemidError


@dataclasses.dataclass(frozen=True)
class DataDir:
    """One copy of the raw layout: items.parquet and events/date=YYYY-MM-DD/*.parquet."""
    root: Path

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def events(self) -> Path:
        return self.root / "events"

    def partition(self, day: dt.date) -> Path:
        return self.events / f"date={day.isoformat()}"

    def write_items(self, items: pl.DataFrame) -> None:
        write_parquet(items, self.items)

    def write_events(self, day: dt.date, events: pl.DataFrame, part: int = 0) -> None:
        """Write one file of the day's partition (the caller has kept only that day's rows)."""
        path = self.partition(day) / f"part-{part}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(events, path)

    def event_files(self) -> list[tuple[dt.date, Path]]:
        """Every events file with the day its partition names, in day order."""
        if not self.events.is_dir():
            raise DataError(f"{self.events}: events directory not found (expected "
                            f"{self.events}/date=YYYY-MM-DD/*.parquet)")
        files = []
        for part in sorted(self.events.iterdir()):
            if not part.is_dir():
                continue
            key, _, value = part.name.partition("=")
            try:
                day = dt.date.fromisoformat(value)
            except ValueError:
                day = None
            if key != "date" or day is None:
                raise DataError(f"{part}: partition directory must be named date=YYYY-MM-DD")
            files += [(day, f) for f in sorted(part.glob("*.parquet"))]
        return files


@dataclasses.dataclass(frozen=True)
class Layout:
    """All paths of the pipeline, relative to the repository root (the directory dvc runs in)."""
    root: Path = Path(".")

    @property
    def raw(self) -> DataDir:
        return DataDir(self.root / "data" / "raw")

    @property
    def validated(self) -> DataDir:
        return DataDir(self.root / "data" / "validated")

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def world(self) -> Path:
        """Ground truth of the synthetic world (taxonomy, item topics, copies): never an input to models."""
        return self.root / "data" / "world"

    @property
    def embeddings(self) -> Path:
        """CU embeddings of validated items: item_id, content_hash, vector (also the re-run cache)."""
        return self.root / "data" / "embeddings" / "items.parquet"

    @property
    def rqvae(self) -> Path:
        """RQ-VAE checkpoints, one file per codebook version, and the `current` pointer."""
        return self.root / "models" / "rqvae"

    @property
    def ranker(self) -> Path:
        """Ranker checkpoints, one file per model version (models/serving.json names the champion)."""
        return self.root / "models" / "ranker"

    @property
    def serving(self) -> Path:
        """The serving pointer: codebook version, SemID store and ranker champion together
        (components/serving.py)."""
        return self.root / "models" / "serving.json"

    @property
    def serving_log(self) -> Path:
        """Every switch of the serving pointer, oldest first: what `semid rollback` goes back to."""
        return self.root / "models" / "serving_log.jsonl"

    def store(self, codebook_version: str) -> Path:
        """The SemID entity store of one codebook version: item_id, codebook_version, c1..cL."""
        return self.root / "data" / "semids" / f"{codebook_version}.parquet"

    @property
    def semids(self) -> Path:
        """The store of the current codebook (models/rqvae/current.json), the one the stages work on."""
        pointer = self.rqvae / "current.json"
        try:
            return self.store(json.loads(pointer.read_text())["codebook_version"])
        except FileNotFoundError:
            raise DataError(f"{pointer}: no current RQ-VAE checkpoint (run `semid train_rqvae` first)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{pointer}: unreadable pointer, expected {{\"codebook_version\": ...}} ({exc})") from exc

    @property
    def stream(self) -> DataDir:
        """The whole generated event stream that `semid replay` lands into data/raw one day at a time."""
        return DataDir(self.root / "data" / "stream")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def record(self, stage: str) -> Path:
        """reports/<stage>/record.json: everything behind a stage's metrics, strings and provenance included."""
        return self.reports / stage / "record.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: done once, at import, before any threads
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    """An empty file beside `path`, named for this process (`sweep_temporaries` removes it once the process is
    gone), with the mode a plain open() would give it: mkstemp makes 0600, which a report server or a worker
    running as another user could not read once it is renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    tmp = _temp_sibling(path, path.suffix)
    try:
        yield tmp
        if path.is_dir():  # a sharded table (components/shards.py) becomes one file
            _replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet(data: pl.DataFrame | Iterable[pa.Table], path: Path, metadata: dict[str, str] | None = None,
                  schema: pa.Schema | None = None) -> None:
    """Write a frame, or a stream of Arrow tables of `schema` (memory bounded by one table), to `path` atomically,
    zstd-compressed with statistics. `metadata` goes into the file's key-value metadata (an encoder version, a
    provenance record), where `pl.read_parquet_metadata` finds it."""
    with atomic_path(path) as tmp:
        if isinstance(data, pl.DataFrame):
            data.write_parquet(tmp, compression="zstd", statistics=True, metadata=metadata)
        else:
            with pq.ParquetWriter(tmp, schema.with_metadata(metadata), compression="zstd") as writer:
                for table in data:
                    writer.write_table(table)


def write_json(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


RECORD_ONLY = ("config", "window", "provenance", "gate")  # settings and versions behind the figures: record only


def numbers_only(figures: dict) -> dict:
    """The numeric leaves of `figures`, nesting kept: booleans as 0/1, a list of numbers keyed by position
    ("1", "2", ...); strings, nulls, lists of records and the RECORD_ONLY sections left out."""
    out = {}
    for key, value in figures.items():
        if key in RECORD_ONLY:
            continue
        if isinstance(value, dict):
            value = numbers_only(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            value = {str(i): v if not isinstance(v, bool) else int(v) for i, v in enumerate(value, 1)}
        elif isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, (int, float)):
            continue
        if value != {}:
            out[key] = value
    return out


def write_metrics(figures: dict, path: Path, record: Path, timings: dict | None = None) -> None:
    """A stage's figures in two files: `path` (metrics/<stage>.json) holds the numbers only, the table that
    `dvc metrics show` and `dvc metrics diff` read, the same for the same inputs; `record`
    (reports/<stage>/record.json) holds all of them, with the versions, config, windows, provenance and curves
    that produced the numbers, and the run's `timings`, which differ from run to run."""
    write_json({**figures, **(timings or {})}, record)
    write_json(numbers_only(figures), path)


def write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` whole, on error it is deleted
    and `path` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700; the directory gets the mode mkdir would give it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace_dir(new: Path, path: Path) -> None:
    """Rename `new` onto `path` when either of them is a directory: the old one is moved aside first (and put
    back by sweep_temporaries if the process is killed between the two renames)."""
    old = path.with_name(f".{path.name}.{os.getpid()}-old.tmp")
    _remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    _remove(old)


TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-(?P<tag>[^.]+)\.tmp.*")  # _temp_sibling's, staged_dir's
ARTIFACT_DIRS = ("data", "models", "metrics", "reports")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_temporaries(layout: Layout) -> list[Path]:
    """Clear what a killed run left under the artifact directories: its temporaries (named for their process,
    removed once that process is gone, so a concurrent writer's are left alone); a directory that `staged_dir`
    had moved aside is put back when the kill came before the new one was renamed into its place.
    Returns what was removed or restored."""
    swept = []
    for top in ARTIFACT_DIRS:
        for path in sorted((layout.root / top).rglob(".*")) if (layout.root / top).is_dir() else []:
            match = TEMPORARY.fullmatch(path.name)
            if not match or alive(int(match["pid"])) or not path.exists():
                continue
            final = path.with_name(match["name"])
            if match["tag"] == "old" and not final.exists():
                os.replace(path, final)  # killed between staged_dir's two renames: the previous one is whole
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            swept.append(path)
    return swept


# ---------------------------------------------------------------------------------------------------------------- S3

S3_URL = re.compile(r"s3://(?P<bucket>[^/]+)/(?P<prefix>[^/].*?)/*")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3 naming rules: 3-63 characters
# botocore retries 503 SlowDown, throttling and dropped connections with jittered backoff; the standard
# AWS_RETRY_MODE and AWS_MAX_ATTEMPTS settings override these defaults.
RETRY_MODE, MAX_ATTEMPTS = "adaptive", 10
PART_BYTES = 8 * 1024 * 1024  # multipart threshold and part size: fixed, so the composite checksum is predictable


class StorageError(SemidError):
    """An S3 location is malformed, or a request failed for good (after botocore's retries)."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix, checked before anything touches the network."""
    match = S3_URL.fullmatch(url)
    if not match:
        raise StorageError(f"{url!r}: expected an S3 location s3://bucket/prefix (a prefix is required)")
    bucket, prefix = match["bucket"], match["prefix"]
    if not BUCKET.fullmatch(bucket):
        raise StorageError(f"{url!r}: bucket name {bucket!r} is invalid, expected 3-63 characters of lower-case "
                           f"letters, digits, dots and hyphens, starting and ending with a letter or digit")
    return bucket, prefix


def s3_checksum(path: Path) -> str:
    """The ChecksumSHA256 S3 stores for `path` uploaded in PART_BYTES parts (base64, as S3 reports it): the
    file's SHA256, or for a multipart upload the SHA256 of its parts' SHA256s and the part count."""
    with Path(path).open("rb") as fh:
        return checksum_of(iter(lambda: fh.read(PART_BYTES), b""))


def checksum_of(chunks: Iterable[bytes]) -> str:
    """`s3_checksum` of the bytes `chunks` yield, whatever their sizes (re-blocked into PART_BYTES parts)."""
    parts, buffer, size = [], b"", 0
    for chunk in chunks:
        buffer += chunk
        size += len(chunk)
        while len(buffer) >= PART_BYTES:
            parts.append(hashlib.sha256(buffer[:PART_BYTES]).digest())
            buffer = buffer[PART_BYTES:]
    if buffer or not parts:
        parts.append(hashlib.sha256(buffer).digest())
    if size < PART_BYTES:
        return base64.b64encode(parts[0]).decode()
    return f"{base64.b64encode(hashlib.sha256(b''.join(parts)).digest()).decode()}-{len(parts)}"


def same_checksum(a: str, b: str) -> bool:
    """Whether two checksums agree (S3 reports a multipart one with or without its "-N" part count)."""
    return a.split("-")[0] == b.split("-")[0]


def sha256_of(path: Path) -> str:
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class S3:
    """One S3 client for every request semid makes. Credentials, region and endpoint come from the standard AWS
    chain (AWS_ENDPOINT_URL_S3 included); `endpoint_url` overrides the endpoint for S3-compatible stores."""

    def __init__(self, endpoint_url: str | None = None):
        import boto3  # heavy: only S3 users pay for it
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        retries = {"mode": os.environ.get("AWS_RETRY_MODE", RETRY_MODE),
                   "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", MAX_ATTEMPTS))}
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(retries=retries))
        self.transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES)

    @contextlib.contextmanager
    def request(self, operation: str, bucket: str, key: str) -> Iterator[None]:
        """Turn a failed request (retries spent) into a StorageError that says what was tried, where, and why."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            inner = exc.__cause__ or exc.__context__  # upload_file raises its own error while handling S3's
            cause = inner if isinstance(inner, ClientError) else exc
            reason = str(exc)
            if isinstance(cause, ClientError):
                error = cause.response.get("Error", {})
                attempts = cause.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
                reason = f"{error.get('Code', '?')}: {error.get('Message', cause)} (after {attempts} attempt(s))"
            raise StorageError(f"{operation} s3://{bucket}/{key} failed: {reason}") from None

    def upload(self, path: Path, bucket: str, key: str) -> None:
        """Upload a file, then check that S3 stored exactly its bytes (the SHA256 checksum S3 computed on
        arrival, or the bytes read back where a store keeps no checksum)."""
        expected = s3_checksum(path)
        with self.request("upload", bucket, key):
            self.client.upload_file(str(path), bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                                    Config=self.transfer)
        with self.request("verify (HeadObject)", bucket, key):
            found = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
        if found is None:  # an S3-compatible store without checksums: read it back
            found, expected = self.sha256_of_object(bucket, key), sha256_of(path)
        if not same_checksum(found, expected):
            raise StorageError(f"verify s3://{bucket}/{key}: stored checksum {found}, expected {expected} "
                               f"of {path}")

    def list(self, bucket: str, prefix: str) -> list[str]:
        """Every key under `prefix`, in key order (one paginated listing: bounded memory per page)."""
        keys = []
        with self.request("list", bucket, prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(keys)

    def checksum(self, bucket: str, key: str) -> str:
        """The object's ChecksumSHA256 as S3 reports it (`s3_checksum`'s form); read back where a store keeps
        none (an object someone uploaded without one)."""
        with self.request("HeadObject", bucket, key):
            found = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
        if found is None:
            with self.request("read back (GetObject)", bucket, key):
                found = checksum_of(self.client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(PART_BYTES))
        return found

    def sha256_of_object(self, bucket: str, key: str) -> str:
        digest = hashlib.sha256()
        with self.request("read back (GetObject)", bucket, key):
            for chunk in self.client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(PART_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def download(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        """Download to `path` atomically, refusing (DataError, nothing left behind) bytes whose sha256 differs."""
        with atomic_path(path) as tmp:
            with self.request("download", bucket, key):
                self.client.download_file(bucket, key, str(tmp), Config=self.transfer)
            found = sha256_of(tmp)
            if found != sha256:
                raise DataError(f"s3://{bucket}/{key}: sha256 {found}, expected {sha256} (corrupt or overwritten)")

    def put_json(self, obj: object, bucket: str, key: str) -> None:
        """One PUT: a reader sees the old object or the new one, never a mix."""
        body = json.dumps(obj, indent=2).encode()
        with self.request("put", bucket, key):
            self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                                   ChecksumAlgorithm="SHA256")

    def get_json(self, bucket: str, key: str) -> dict:
        with self.request("get", bucket, key):
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        try:
            return json.loads(body)
        except ValueError as exc:
            raise DataError(f"s3://{bucket}/{key}: not valid JSON ({exc})") from exc


# -------------------------------------------------------------------------------------------------------------- Lake


class Lake(abc.ABC):
    """storage.root: a tree of objects under '/'-separated keys, on a local disk or S3, with the same verified
    operations on both. A checksum is the one S3 reports for an upload in PART_BYTES parts (`s3_checksum`)."""
    url: str

    @staticmethod
    def at(root: str, base: Path = Path(".")) -> Lake:
        """The lake of a storage.root value: s3://bucket/prefix, or a local path (relative to `base`)."""
        if root.startswith("s3://"):
            return S3Lake(*parse_s3_url(root))
        if "://" in root:
            raise StorageError(f"storage.root {root!r}: expected a local path or s3://bucket/prefix")
        return LocalLake(Path(base) / root)

    @abc.abstractmethod
    def child(self, prefix: str) -> Lake:
        """The lake under `prefix` (keys relative to it)."""

    @abc.abstractmethod
    def checksums(self) -> dict[str, str]:
        """{key: checksum} of every object under this lake."""

    @abc.abstractmethod
    def put_file(self, path: Path, key: str) -> None:
        """Store `path` under `key`; a reader sees the old object or the new one whole."""

    @abc.abstractmethod
    def fetch(self, key: str, path: Path, checksum: str) -> None:
        """Copy `key` to `path` atomically, refusing bytes whose checksum is not `checksum`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` (gone already: nothing to do)."""

    @abc.abstractmethod
    def put_json(self, obj: object, key: str) -> None:
        """Store `obj` as JSON under `key`, whole (one PUT, or one rename)."""

    @abc.abstractmethod
    def get_json(self, key: str) -> dict:
        """The JSON object under `key`; an error naming it when it is missing or unreadable."""


def _refuse_changed(where: str, path: Path, checksum: str) -> None:
    found = s3_checksum(path)
    if not same_checksum(found, checksum):
        raise DataError(f"{where}: checksum {found}, expected {checksum} (changed since it was listed, or corrupt)")


class LocalLake(Lake):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def child(self, prefix: str) -> LocalLake:
        return LocalLake(self.root / prefix)

    def checksums(self) -> dict[str, str]:
        if not self.root.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): s3_checksum(p) for p in sorted(self.root.rglob("*"))
                if p.is_file() and not TEMPORARY.fullmatch(p.name)}

    def put_file(self, path: Path, key: str) -> None:
        with atomic_path(self.root / key) as tmp:
            shutil.copyfile(path, tmp)

    def fetch(self, key: str, path: Path, checksum: str) -> None:
        with atomic_path(path) as tmp:
            try:
                shutil.copyfile(self.root / key, tmp)
            except FileNotFoundError:
                raise DataError(f"{self.root / key}: not found in the lake (removed since it was listed)") from None
            _refuse_changed(str(self.root / key), tmp, checksum)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)
        for parent in (self.root / key).parents:  # empty partition directories go with their last file
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    def put_json(self, obj: object, key: str) -> None:
        write_json(obj, self.root / key)

    def get_json(self, key: str) -> dict:
        try:
            return json.loads((self.root / key).read_text())
        except FileNotFoundError:
            raise DataError(f"{self.root / key}: not found") from None
        except ValueError as exc:
            raise DataError(f"{self.root / key}: not valid JSON ({exc})") from exc


class S3Lake(Lake):
    def __init__(self, bucket: str, prefix: str, s3: S3 | None = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}"
        self.s3 = s3 or S3()

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def child(self, prefix: str) -> S3Lake:
        return S3Lake(self.bucket, f"{self.prefix}/{prefix}", self.s3)

    def checksums(self) -> dict[str, str]:
        return {key[len(self.prefix) + 1:]: self.s3.checksum(self.bucket, key)
                for key in self.s3.list(self.bucket, f"{self.prefix}/")}

    def put_file(self, path: Path, key: str) -> None:
        self.s3.upload(Path(path), self.bucket, self.key(key))

    def fetch(self, key: str, path: Path, checksum: str) -> None:
        with atomic_path(path) as tmp:
            with self.s3.request("download", self.bucket, self.key(key)):
                self.s3.client.download_file(self.bucket, self.key(key), str(tmp), Config=self.s3.transfer)
            _refuse_changed(f"s3://{self.bucket}/{self.key(key)}", tmp, checksum)

    def delete(self, key: str) -> None:
        with self.s3.request("delete", self.bucket, self.key(key)):
            self.s3.client.delete_object(Bucket=self.bucket, Key=self.key(key))

    def put_json(self, obj: object, key: str) -> None:
        self.s3.put_json(obj, self.bucket, self.key(key))

    def get_json(self, key: str) -> dict:
        return self.s3.get_json(self.bucket, self.key(key))

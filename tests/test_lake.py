"""The raw lake on S3 (storage.root s3://...): landing uploads and verifies each partition, data/raw holds the
listing, validate reads the listed objects and writes what it writes from a local lake; transient 503s change
nothing stored, a persistent outage is a named error that leaves data/raw as it was, and an object changed after
it was listed is refused by name."""
import dataclasses
import datetime as dt
import json

import boto3
import pytest

from components.data.lake import LISTING, raw_days, read_listing
from components.data.landing import land
from components.data.validation import run_validate
from components.data.world import run_generate
from components.errors import DataError
from components.params import ValidationParams
from components.storage import Layout, StorageError
from components.window import data_span
from conftest import new_bucket
from s3_faults import FaultyProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stream(tmp_path_factory, small_world_params) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("lake"))
    run_generate(dataclasses.replace(small_world_params, days=6), layout, into=layout.stream)
    return layout


@pytest.fixture
def endpoint(s3_endpoint, monkeypatch) -> str:
    """The endpoint, given to the code the standard way: AWS_ENDPOINT_URL_S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    return s3_endpoint


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_landing_in_s3_lists_the_lake_and_validate_reads_it_like_a_local_lake(stream, tmp_path, endpoint):
    bucket = new_bucket(endpoint, "lake")
    as_of = data_span(stream.stream).start.date() + dt.timedelta(days=4)
    on_s3, local = Layout(tmp_path / "s3"), Layout(tmp_path / "local")
    moved = land(stream.stream, on_s3, as_of, f"s3://{bucket}/prod")
    assert moved["partitions_landed"] == 4
    stored = objects(endpoint, bucket)
    assert sorted(stored) == ["prod/raw/events/" + p.relative_to(stream.stream.events).as_posix()
                              for p in sorted(stream.stream.events.rglob("*.parquet"))][:4] + ["prod/raw/items.parquet"]
    assert [p.name for p in on_s3.raw.root.iterdir()] == [LISTING]  # data/raw: the listing, not the data
    listing = read_listing(on_s3)
    assert listing["url"] == f"s3://{bucket}/prod/raw" and len(listing["objects"]) == 5
    assert raw_days(on_s3) == [as_of - dt.timedelta(days=d) for d in (4, 3, 2, 1)]

    land(stream.stream, local, as_of)  # the default root: the workspace's data/raw
    for key, body in files(local.raw.root).items():
        assert stored[f"prod/raw/{key}"] == body
    run_validate(ValidationParams(), on_s3)
    run_validate(ValidationParams(), local)
    assert files(on_s3.validated.root) == files(local.validated.root)
    assert json.loads((on_s3.metrics / "validation.json").read_text()) == \
        json.loads((local.metrics / "validation.json").read_text())
    assert not [p for p in (tmp_path / "s3" / "data").iterdir() if p.name.startswith(".")]  # spool removed

    again = land(stream.stream, on_s3, as_of + dt.timedelta(days=1), f"s3://{bucket}/prod")
    assert again["partitions_landed"] == 1  # the rest is there with the same checksums
    back = land(stream.stream, on_s3, as_of - dt.timedelta(days=1), f"s3://{bucket}/prod")
    assert back["partitions_removed"] == 2 and len(read_listing(on_s3)["objects"]) == 4


def test_transient_503s_while_landing_store_the_same_objects(stream, tmp_path, endpoint, monkeypatch):
    """503 SlowDown to the first 3 requests, then to every 5th: landing completes and the bucket holds exactly
    what a fault-free landing stores."""
    as_of = data_span(stream.stream).end.date()
    fault_free, faulty = new_bucket(endpoint, "fault-free-lake"), new_bucket(endpoint, "faulty-lake")
    land(stream.stream, Layout(tmp_path / "a"), as_of, f"s3://{fault_free}/prod")
    with FaultyProxy(endpoint, first=3, every=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        land(stream.stream, Layout(tmp_path / "b"), as_of, f"s3://{faulty}/prod")
    assert proxy.faults >= 5 and proxy.requests > proxy.faults
    assert objects(endpoint, faulty) == objects(endpoint, fault_free)
    listed = [read_listing(Layout(tmp_path / d))["objects"] for d in "ab"]
    assert listed[0] == listed[1]


def test_a_persistent_outage_while_landing_is_named_and_leaves_data_raw_as_it_was(stream, tmp_path, endpoint,
                                                                                  monkeypatch):
    bucket = new_bucket(endpoint, "outage-lake")
    layout = Layout(tmp_path)
    first = data_span(stream.stream).start.date()
    land(stream.stream, layout, first + dt.timedelta(days=2), f"s3://{bucket}/prod")
    before = files(layout.raw.root)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with FaultyProxy(endpoint, fail_from=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/prod/raw/ failed: SlowDown: .* \(after 2 attempt"):
            land(stream.stream, layout, first + dt.timedelta(days=4), f"s3://{bucket}/prod")
    assert files(layout.raw.root) == before


def test_an_object_changed_after_it_was_listed_is_refused_by_name(stream, tmp_path, endpoint):
    bucket = new_bucket(endpoint, "changed-lake")
    layout = Layout(tmp_path)
    land(stream.stream, layout, data_span(stream.stream).end.date(), f"s3://{bucket}/prod")
    run_validate(ValidationParams(), layout)
    validated = files(layout.validated.root)
    key = read_listing(layout)["objects"]
    key = sorted(k for k in key if k.startswith("events/"))[1]
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=f"prod/raw/{key}", Body=b"edited")
    with pytest.raises(DataError, match=rf"s3://{bucket}/prod/raw/{key}: checksum .*, expected .* \(changed since "
                                        r"it was listed"):
        run_validate(ValidationParams(), layout)
    assert files(layout.validated.root) == validated

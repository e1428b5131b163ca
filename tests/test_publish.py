"""Publishing the SemID store to S3 on a real local endpoint (moto server): round trip, transient 503s from a
fault-injecting proxy survived with the same bytes stored, a persistent outage that leaves CURRENT on the
previous version with a named error, checksums, and bad URLs refused before any upload."""
import dataclasses

import boto3
import numpy as np
import polars as pl
import pytest
import torch

from components import shards, storage
from components.errors import CodebookVersionMismatch, DataError
from components.params import BackfillParams, RQVAEParams
from components.semid import publish as pub
from components.semid import rqvae
from components.semid.backfill import run_backfill
from components.semid.store import read_store
from components.storage import Layout, StorageError
from conftest import new_bucket
from s3_faults import FaultyProxy

pytestmark = pytest.mark.integration

KMEANS = RQVAEParams(method="rqkmeans", levels=2, codebook_size=8)  # no training loop: milliseconds


@pytest.fixture
def endpoint(s3_endpoint) -> str:
    return s3_endpoint


@pytest.fixture
def bucket(endpoint, request) -> str:
    """A fresh bucket per test, named for it."""
    return new_bucket(endpoint, request.node.name)


def release(root, seed: int) -> Layout:
    """A layout holding a current checkpoint (codebook version depends on seed) and its backfilled store."""
    layout = Layout(root)
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    model, _ = rqvae.train(torch.from_numpy(x), dataclasses.replace(KMEANS, seed=seed))
    version, _ = rqvae.save_checkpoint(model, layout.rqvae, {})
    rqvae.write_current(layout.rqvae, version)
    layout.embeddings.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"item_id": np.arange(300), "content_hash": ["h"] * 300,
                  "vector": pl.Series(x, dtype=pl.Array(pl.Float32, 8))}).write_parquet(layout.embeddings)
    run_backfill(BackfillParams(), layout)
    return layout


def test_publish_then_read_pointer_and_download_the_same_bytes(tmp_path, endpoint, bucket):
    layout = release(tmp_path / "a", seed=0)
    version, checkpoint = rqvae.read_current(layout.rqvae)
    url = f"s3://{bucket}/semids/prod"
    pointer = pub.publish_current(layout, url, endpoint_url=endpoint)
    assert pointer == {"codebook_version": version, "manifest": f"{version}/manifest.json"}
    assert pub.read_current_pointer(url, endpoint) == pointer
    files = pub.download(url, None, tmp_path / "dest", endpoint)
    store = layout.semids.name  # <codebook_version>.parquet beside <codebook_version>.pt
    assert files == {store: tmp_path / "dest" / store, checkpoint.name: tmp_path / "dest" / checkpoint.name}
    assert files[store].read_bytes() == layout.semids.read_bytes()
    assert files[checkpoint.name].read_bytes() == checkpoint.read_bytes()
    assert pub.download(url, version, tmp_path / "again", endpoint)  # by explicit version too


def test_a_sharded_store_is_published_part_by_part_and_downloads_whole(tmp_path, endpoint, bucket):
    layout = release(tmp_path / "a", seed=0)
    _, checkpoint = rqvae.read_current(layout.rqvae)
    store = pl.read_parquet(layout.semids)
    layout.semids.unlink()
    layout.semids.mkdir()  # the store as the Ray engine writes it: parts plus their manifest
    records = []
    for index, part in enumerate((store[:100], store[100:])):
        file = layout.semids / shards.part_name(index)
        part.write_parquet(file)
        records.append(shards.part_record(file, part.to_arrow()))
    shards.write_manifest(layout.semids, records, {}, source=layout.semids)
    url = f"s3://{bucket}/semids"
    pub.publish_current(layout, url, endpoint_url=endpoint)
    files = pub.download(url, None, tmp_path / "dest", endpoint)
    name = layout.semids.name
    assert set(files) == {f"{name}/part-00000.parquet", f"{name}/part-00001.parquet", f"{name}/manifest.json",
                          checkpoint.name}
    assert read_store(tmp_path / "dest" / name).table.equals(read_store(layout.semids).table)


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_transient_503s_are_retried_and_the_same_bytes_are_stored(tmp_path, endpoint, request):
    """503 SlowDown to the first 3 requests and then to every 4th: publish completes, and the bucket holds
    exactly what a fault-free publish stores."""
    layout = release(tmp_path / "a", seed=0)
    fault_free, faulty = new_bucket(endpoint, "fault-free"), new_bucket(endpoint, "faulty")
    pub.publish_current(layout, f"s3://{fault_free}/semids", endpoint_url=endpoint)
    with FaultyProxy(endpoint, first=3, every=4) as proxy:
        pointer = pub.publish_current(layout, f"s3://{faulty}/semids", endpoint_url=proxy.url)
        assert pub.read_current_pointer(f"s3://{faulty}/semids", proxy.url) == pointer
        files = pub.download(f"s3://{faulty}/semids", None, tmp_path / "dest", proxy.url)
    assert proxy.faults >= 4 and proxy.requests > proxy.faults
    assert objects(endpoint, faulty) == objects(endpoint, fault_free)
    assert files[layout.semids.name].read_bytes() == layout.semids.read_bytes()


def test_a_persistent_outage_names_the_request_and_leaves_current_on_the_previous_version(
        tmp_path, endpoint, bucket, monkeypatch):
    url = f"s3://{bucket}/semids"
    old = release(tmp_path / "old", seed=0)
    pub.publish_current(old, url, endpoint_url=endpoint)
    before = objects(endpoint, bucket)
    new = release(tmp_path / "new", seed=1)
    new_version = rqvae.read_current(new.rqvae)[0]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with FaultyProxy(endpoint, fail_from=3) as proxy:  # the outage starts during the first part's upload
        with pytest.raises(StorageError, match=rf"publishing codebook_version {new_version} to {url}: "
                                               rf"\w.* s3://{bucket}/semids/{new_version}/\S+ failed: SlowDown: .*"
                                               r"\(after 2 attempt\(s\)\); CURRENT left unchanged"):
            pub.publish_current(new, url, endpoint_url=proxy.url)
    old_version = rqvae.read_current(old.rqvae)[0]
    assert pub.read_current_pointer(url, endpoint)["codebook_version"] == old_version
    after = objects(endpoint, bucket)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not any(k.endswith("manifest.json") for k in set(after) - set(before))  # no manifest: unreadable
    files = pub.download(url, None, tmp_path / "dest", endpoint)
    assert files[old.semids.name].read_bytes() == old.semids.read_bytes()


def test_an_upload_whose_stored_checksum_differs_is_refused(tmp_path, endpoint, bucket, monkeypatch):
    """The check behind "verified": S3's checksum of what it stored against the local file's."""
    layout = release(tmp_path / "a", seed=0)
    url = f"s3://{bucket}/semids"
    monkeypatch.setattr(storage, "s3_checksum", lambda path: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(StorageError, match=rf"verify s3://{bucket}/semids/.*: stored checksum .*, expected "
                                           r"AAAA.*; CURRENT left unchanged"):
        pub.publish_current(layout, url, endpoint_url=endpoint)
    assert not any(k.endswith(pub.POINTER) for k in objects(endpoint, bucket))


def test_the_multipart_checksum_is_the_one_s3_computes(tmp_path, endpoint, bucket):
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(2 * storage.PART_BYTES + 1000))
    s3 = storage.S3(endpoint)
    s3.upload(big, bucket, "big.bin")  # raises unless the composite checksum matches
    assert storage.s3_checksum(big).endswith("-3")
    s3.download(bucket, "big.bin", tmp_path / "back.bin", storage.sha256_of(big))
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_download_refuses_a_part_that_does_not_match_the_manifest(tmp_path, endpoint, bucket):
    layout = release(tmp_path / "a", seed=0)
    url = f"s3://{bucket}/semids"
    pub.publish_current(layout, url, endpoint_url=endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].endswith(".parquet"))
    s3.put_object(Bucket=bucket, Key=key, Body=b"not the store")
    with pytest.raises(DataError, match=f"s3://{bucket}/{key}: sha256 .*, expected .* \\(corrupt or overwritten\\)"):
        pub.download(url, None, tmp_path / "dest", endpoint)
    assert not any((tmp_path / "dest").iterdir())  # nothing half-downloaded left behind


def test_a_store_and_checkpoint_of_different_versions_are_refused(tmp_path, endpoint, bucket):
    a, b = release(tmp_path / "a", seed=0), release(tmp_path / "b", seed=1)
    with pytest.raises(CodebookVersionMismatch, match="publish them as a pair"):
        pub.publish(a.semids, rqvae.read_current(b.rqvae)[1], f"s3://{bucket}/semids", endpoint)
    assert "Contents" not in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)


@pytest.mark.parametrize("url, message", [
    ("https://bucket/prefix", "expected an S3 location s3://bucket/prefix"),
    ("s3://bucket", "expected an S3 location s3://bucket/prefix"),
    ("s3://bucket/", "expected an S3 location s3://bucket/prefix"),
    ("s3://ab/prefix", "bucket name 'ab' is invalid, expected 3-63 characters"),
    (f"s3://{'b' * 64}/prefix", "is invalid, expected 3-63 characters"),
    ("s3://My_Bucket/prefix", "bucket name 'My_Bucket' is invalid"),
])
def test_a_bad_url_is_refused_before_any_upload(tmp_path, monkeypatch, url, message):
    def no_client(endpoint_url=None):
        raise AssertionError("S3 was contacted")

    monkeypatch.setattr(pub, "S3", no_client)
    with pytest.raises(StorageError, match=message):
        pub.publish(tmp_path / "semids.parquet", tmp_path / "ckpt.pt", url)
    with pytest.raises(StorageError, match=message):
        pub.read_current_pointer(url)


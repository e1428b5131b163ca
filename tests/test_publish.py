"""Publishing the SemID store to S3 on a real local endpoint (moto server): round trip, a failed upload that
leaves CURRENT on the previous version, checksums, and bad URLs refused before any upload."""
import dataclasses

import boto3
import numpy as np
import polars as pl
import pytest
import torch
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from components.errors import CodebookVersionMismatch, DataError
from components.params import BackfillParams, RQVAEParams
from components.semid import publish as pub
from components.semid import rqvae
from components.semid.backfill import run_backfill
from components.storage import Layout

pytestmark = pytest.mark.integration

KMEANS = RQVAEParams(method="rqkmeans", levels=2, codebook_size=8)  # no training loop: milliseconds


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on a free localhost port, with dummy AWS_* credentials for the module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint, request) -> str:
    """A fresh bucket per test (name from the test's name, within S3's 63 characters)."""
    name = request.node.name.lower().replace("_", "-")[:50].strip("-")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


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
    assert pointer == {"codebook_version": version, "manifest": f"semids/prod/{version}/manifest.json"}
    assert pub.read_current_pointer(url, endpoint) == pointer
    files = pub.download(url, None, tmp_path / "dest", endpoint)
    store = layout.semids.name  # <codebook_version>.parquet beside <codebook_version>.pt
    assert files == {store: tmp_path / "dest" / store, checkpoint.name: tmp_path / "dest" / checkpoint.name}
    assert files[store].read_bytes() == layout.semids.read_bytes()
    assert files[checkpoint.name].read_bytes() == checkpoint.read_bytes()
    assert pub.download(url, version, tmp_path / "again", endpoint)  # by explicit version too


def test_a_failed_upload_leaves_current_on_the_previous_version(tmp_path, endpoint, bucket, monkeypatch):
    url = f"s3://{bucket}/semids"
    old = release(tmp_path / "old", seed=0)
    pub.publish_current(old, url, endpoint_url=endpoint)
    new = release(tmp_path / "new", seed=1)
    client, calls = pub.s3_client(endpoint), []
    upload = client.upload_file

    def second_part_fails(filename, bucket_name, key, **kwargs):
        calls.append(key)
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "connection reset"}}, "PutObject")
        return upload(filename, bucket_name, key, **kwargs)

    monkeypatch.setattr(client, "upload_file", second_part_fails)
    monkeypatch.setattr(pub, "s3_client", lambda endpoint_url: client)
    with pytest.raises(pub.PublishError, match="connection reset.*CURRENT left unchanged"):
        pub.publish_current(new, url, endpoint_url=endpoint)
    old_version = rqvae.read_current(old.rqvae)[0]
    assert old_version != rqvae.read_current(new.rqvae)[0] and len(calls) == 2
    assert pub.read_current_pointer(url, endpoint)["codebook_version"] == old_version
    files = pub.download(url, None, tmp_path / "dest", endpoint)
    assert files[old.semids.name].read_bytes() == old.semids.read_bytes()


def test_download_refuses_a_part_that_does_not_match_the_manifest(tmp_path, endpoint, bucket):
    layout = release(tmp_path / "a", seed=0)
    url = f"s3://{bucket}/semids"
    pub.publish_current(layout, url, endpoint_url=endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].endswith(".parquet"))
    s3.put_object(Bucket=bucket, Key=key, Body=b"not the store")
    with pytest.raises(DataError, match=f"s3://{bucket}/{key}: sha256 .*, expected .* from the manifest"):
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
    def no_client(endpoint_url):
        raise AssertionError("S3 was contacted")

    monkeypatch.setattr(pub, "s3_client", no_client)
    with pytest.raises(pub.PublishError, match=message):
        pub.publish(tmp_path / "semids.parquet", tmp_path / "ckpt.pt", url)
    with pytest.raises(pub.PublishError, match=message):
        pub.read_current_pointer(url)


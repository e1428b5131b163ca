"""Publish the SemID store and its checkpoint to S3 (or an S3-compatible store) for online readers.

    s3://bucket/prefix/<codebook_version>/<sha256[:16]>/<codebook_version>.parquet  parts, content-addressed:
    s3://bucket/prefix/<codebook_version>/<sha256[:16]>/<codebook_version>.pt       a re-publish never
                                                                                    overwrites bytes
    s3://bucket/prefix/<codebook_version>/manifest.json                   a reader may be downloading
    s3://bucket/prefix/CURRENT                                            {"codebook_version", "manifest"}

Order: every part is uploaded and verified (head_object size), then the manifest, and only then the small
CURRENT pointer is overwritten, in one PUT. A failure anywhere before that leaves CURRENT on the previous
version, so readers never see a half-published one. Readers verify each part's sha256 against the manifest.
Credentials come from the usual AWS_* environment; `endpoint_url` selects an S3-compatible store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from components.errors import CodebookVersionMismatch, DataError, SemidError
from components.semid import rqvae
from components.semid.store import read_store
from components.storage import Layout, atomic_path

log = logging.getLogger(__name__)

POINTER = "CURRENT"
MANIFEST = "manifest.json"
URL = re.compile(r"s3://(?P<bucket>[^/]+)/(?P<prefix>[^/].*?)/*")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3 naming rules: 3-63 characters


class PublishError(SemidError):
    """An S3 location is malformed or unreachable, or an upload or download failed."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix, checked before anything touches the network."""
    match = URL.fullmatch(url)
    if not match:
        raise PublishError(f"{url!r}: expected an S3 location s3://bucket/prefix (a prefix is required)")
    bucket, prefix = match["bucket"], match["prefix"]
    if not BUCKET.fullmatch(bucket):
        raise PublishError(f"{url!r}: bucket name {bucket!r} is invalid, expected 3-63 characters of lower-case "
                           f"letters, digits, dots and hyphens, starting and ending with a letter or digit")
    return bucket, prefix


def s3_client(endpoint_url: str | None):
    """A boto3 S3 client; credentials and region from the AWS_* environment."""
    import boto3  # heavy; only publishing needs it

    return boto3.client("s3", endpoint_url=endpoint_url)


def sha256_of(path: Path) -> str:
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def manifest_of(version: str, prefix: str, files: list[Path]) -> dict:
    """Name, key, size and sha256 of each part to publish under prefix/<version>/."""
    parts = []
    for f in files:
        digest = sha256_of(f)
        parts.append({"name": f.name, "key": f"{prefix}/{version}/{digest[:16]}/{f.name}",
                      "size": f.stat().st_size, "sha256": digest})
    return {"codebook_version": version, "parts": parts}


def checked_version(store_path: Path, checkpoint_path: Path) -> str:
    """The codebook version that the store and the checkpoint share, else CodebookVersionMismatch."""
    store = read_store(store_path).codebook_version
    _, ckpt = rqvae.load_checkpoint(checkpoint_path)
    if ckpt["codebook_version"] != store:
        raise CodebookVersionMismatch(f"{store_path}: holds codebook_version {store}, but checkpoint "
                                      f"{checkpoint_path} is {ckpt['codebook_version']}; publish them as a pair")
    return store


def publish(store_path: Path, checkpoint_path: Path, url: str, endpoint_url: str | None = None) -> dict:
    """Upload the store and its checkpoint under url/<codebook_version>/, verify them, then move CURRENT.
    Returns the pointer written."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_url(url)
    version = checked_version(Path(store_path), Path(checkpoint_path))
    manifest = manifest_of(version, prefix, [Path(store_path), Path(checkpoint_path)])
    manifest_key = f"{prefix}/{version}/{MANIFEST}"
    pointer = {"codebook_version": version, "manifest": manifest_key}
    client = s3_client(endpoint_url)
    try:
        for part, path in zip(manifest["parts"], [store_path, checkpoint_path]):
            client.upload_file(str(path), bucket, part["key"])
        for part in manifest["parts"]:
            found = client.head_object(Bucket=bucket, Key=part["key"])["ContentLength"]
            if found != part["size"]:
                raise PublishError(f"s3://{bucket}/{part['key']}: {found} bytes after upload, expected "
                                   f"{part['size']}; CURRENT left unchanged")
        client.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest, indent=2).encode(),
                          ContentType="application/json")
        client.put_object(Bucket=bucket, Key=f"{prefix}/{POINTER}", Body=json.dumps(pointer).encode(),
                          ContentType="application/json")
    except (BotoCoreError, ClientError) as exc:
        raise PublishError(f"{url}: publishing codebook_version {version} failed ({exc}); CURRENT left "
                           f"unchanged") from exc
    log.info("published codebook_version %s to %s", version, url)
    return pointer


def publish_current(layout: Layout, url: str, endpoint_url: str | None = None) -> dict:
    """Publish the store of `layout` with the checkpoint models/rqvae/current.json points at."""
    _, checkpoint = rqvae.read_current(layout.rqvae)
    return publish(layout.semids, checkpoint, url, endpoint_url)


def read_json(client, bucket: str, key: str) -> dict:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as exc:
        raise PublishError(f"s3://{bucket}/{key}: cannot read ({exc})") from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise DataError(f"s3://{bucket}/{key}: not valid JSON ({exc})") from exc


def read_current_pointer(url: str, endpoint_url: str | None = None) -> dict:
    """{"codebook_version", "manifest"} of the published version."""
    bucket, prefix = parse_url(url)
    return read_json(s3_client(endpoint_url), bucket, f"{prefix}/{POINTER}")


def download(url: str, version: str | None, dest: Path, endpoint_url: str | None = None) -> dict[str, Path]:
    """Download every part of a published version (None: the CURRENT one) into dest, each checked against
    the manifest's sha256 before it is renamed into place. Returns {part name: local path}."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_url(url)
    client = s3_client(endpoint_url)
    version = version or read_json(client, bucket, f"{prefix}/{POINTER}")["codebook_version"]
    manifest = read_json(client, bucket, f"{prefix}/{version}/{MANIFEST}")
    paths = {}
    for part in manifest["parts"]:
        path = Path(dest) / part["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            try:
                client.download_file(bucket, part["key"], str(tmp))
            except (BotoCoreError, ClientError) as exc:
                raise PublishError(f"s3://{bucket}/{part['key']}: download failed ({exc})") from exc
            found = sha256_of(tmp)
            if found != part["sha256"]:
                raise DataError(f"s3://{bucket}/{part['key']}: sha256 {found}, expected {part['sha256']} from "
                                f"the manifest of {version} (corrupt or overwritten part)")
        paths[part["name"]] = path
    return paths

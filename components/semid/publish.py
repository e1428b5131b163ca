"""Publish the SemID store and its checkpoint to S3 (or an S3-compatible store) for online readers.

    s3://bucket/prefix/<codebook_version>/<sha256[:16]>/<codebook_version>.parquet  parts, content-addressed:
    s3://bucket/prefix/<codebook_version>/<sha256[:16]>/<codebook_version>.pt       a re-publish never
                                                                                    overwrites bytes
    s3://bucket/prefix/<codebook_version>/manifest.json                   a reader may be downloading
    s3://bucket/prefix/CURRENT                                            {"codebook_version", "manifest"}

Order: every part is uploaded and verified (the SHA256 checksum S3 computed on arrival against the local
file's), then the manifest, and only then the small CURRENT pointer is overwritten, in one PUT. A failure
anywhere before that leaves CURRENT on the previous version, so readers never see a half-published one.
Readers verify each part's sha256 against the manifest. S3 access, retries and errors: components/storage.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

from components.errors import CodebookVersionMismatch
from components.semid import rqvae
from components.semid.store import read_store
from components.storage import S3, Layout, StorageError, parse_s3_url, sha256_of

log = logging.getLogger(__name__)

POINTER = "CURRENT"
MANIFEST = "manifest.json"


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
    bucket, prefix = parse_s3_url(url)
    version = checked_version(Path(store_path), Path(checkpoint_path))
    manifest = manifest_of(version, prefix, [Path(store_path), Path(checkpoint_path)])
    manifest_key = f"{prefix}/{version}/{MANIFEST}"
    pointer = {"codebook_version": version, "manifest": manifest_key}
    s3 = S3(endpoint_url)
    try:
        for part, path in zip(manifest["parts"], [store_path, checkpoint_path]):
            s3.upload(Path(path), bucket, part["key"])
        s3.put_json(manifest, bucket, manifest_key)
        s3.put_json(pointer, bucket, f"{prefix}/{POINTER}")
    except StorageError as exc:
        raise StorageError(f"publishing codebook_version {version} to {url}: {exc}; CURRENT left "
                           f"unchanged") from None
    log.info("published codebook_version %s to %s", version, url)
    return pointer


def publish_current(layout: Layout, url: str, endpoint_url: str | None = None) -> dict:
    """Publish the store of `layout` with the checkpoint models/rqvae/current.json points at."""
    _, checkpoint = rqvae.read_current(layout.rqvae)
    return publish(layout.semids, checkpoint, url, endpoint_url)


def read_current_pointer(url: str, endpoint_url: str | None = None) -> dict:
    """{"codebook_version", "manifest"} of the published version."""
    bucket, prefix = parse_s3_url(url)
    return S3(endpoint_url).get_json(bucket, f"{prefix}/{POINTER}")


def download(url: str, version: str | None, dest: Path, endpoint_url: str | None = None) -> dict[str, Path]:
    """Download every part of a published version (None: the CURRENT one) into dest, each checked against
    the manifest's sha256 before it is renamed into place. Returns {part name: local path}."""
    bucket, prefix = parse_s3_url(url)
    s3 = S3(endpoint_url)
    version = version or s3.get_json(bucket, f"{prefix}/{POINTER}")["codebook_version"]
    manifest = s3.get_json(bucket, f"{prefix}/{version}/{MANIFEST}")
    paths = {}
    for part in manifest["parts"]:
        path = Path(dest) / part["name"]
        s3.download(bucket, part["key"], path, part["sha256"])
        paths[part["name"]] = path
    return paths

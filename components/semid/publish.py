"""Publish the SemID store and its checkpoint to S3 (or an S3-compatible store, or any storage.root) for online
readers. Keys are relative to the prefix, so a published tree can be moved:

    s3://bucket/prefix/<codebook_version>/<sha256[:16]>/<codebook_version>.parquet  parts, content-addressed:
    s3://bucket/prefix/<codebook_version>/<sha256[:16]>/<codebook_version>.pt       a re-publish never
                                                                                    overwrites bytes
    s3://bucket/prefix/<codebook_version>/manifest.json                   a reader may be downloading
A sharded store (components/shards.py) is published part by part, named <codebook_version>.parquet/<file>.
    s3://bucket/prefix/CURRENT                                            {"codebook_version", "manifest"}

Order: every part is uploaded and verified (the SHA256 checksum S3 computed on arrival against the local
file's), then the manifest, and only then the small CURRENT pointer is overwritten, in one PUT. A failure
anywhere before that leaves CURRENT on the previous version, so readers never see a half-published one.
Readers verify each part's sha256 against the manifest. S3 access, retries and errors: components/storage.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

from components import shards
from components.errors import CodebookVersionMismatch
from components.semid import rqvae
from components.semid.store import read_store
from components.storage import S3, Lake, Layout, S3Lake, StorageError, parse_s3_url, s3_checksum, sha256_of

log = logging.getLogger(__name__)

POINTER = "CURRENT"
MANIFEST = "manifest.json"


def published_files(store_path: Path, checkpoint_path: Path) -> list[tuple[str, Path]]:
    """(name, local path) of each file to publish: the store (one file, or a sharded store's parts and its own
    manifest, named <store>/<file> so a download rebuilds the directory), then the checkpoint."""
    if store_path.is_dir():
        store = [(f"{store_path.name}/{f.name}", f) for f in [*shards.files(store_path), store_path / shards.MANIFEST]]
    else:
        store = [(store_path.name, store_path)]
    return [*store, (checkpoint_path.name, checkpoint_path)]


def manifest_of(version: str, files: list[tuple[str, Path]]) -> dict:
    """Name, key, size, sha256 and S3 checksum of each part to publish under <version>/."""
    parts = []
    for name, f in files:
        digest = sha256_of(f)
        parts.append({"name": name, "key": f"{version}/{digest[:16]}/{name}", "size": f.stat().st_size,
                      "sha256": digest, "checksum": s3_checksum(f)})
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
    return publish_in(S3Lake(bucket, prefix, S3(endpoint_url)), Path(store_path), Path(checkpoint_path), version)


def publish_in(lake: Lake, store_path: Path, checkpoint_path: Path, version: str | None = None) -> dict:
    """`publish` into a lake: parts (each verified), manifest, then CURRENT, each step only after the one before."""
    version = version or checked_version(store_path, checkpoint_path)
    files = published_files(store_path, checkpoint_path)
    manifest = manifest_of(version, files)
    manifest_key = f"{version}/{MANIFEST}"
    pointer = {"codebook_version": version, "manifest": manifest_key}
    try:
        for part, (_, path) in zip(manifest["parts"], files):
            lake.put_file(path, part["key"])
        lake.put_json(manifest, manifest_key)
        lake.put_json(pointer, POINTER)
    except StorageError as exc:
        raise StorageError(f"publishing codebook_version {version} to {lake.url}: {exc}; CURRENT left "
                           f"unchanged") from None
    log.info("published codebook_version %s to %s", version, lake.url)
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
        s3.download(bucket, f"{prefix}/{part['key']}", path, part["sha256"])
        paths[part["name"]] = path
    return paths

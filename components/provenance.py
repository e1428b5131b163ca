"""Which code and which data produced an artifact: recorded in every model, SemID table and metrics file."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import components


def code_version() -> str:
    """The git commit of the code, with "-dirty" when tracked files under components/ or flows/ differ."""
    repo = Path(components.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "components", "flows"], cwd=repo, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def data_version(paths: list[Path]) -> str:
    """A content hash (sha256, first 16 hex digits) over files, in path order: same bytes, same version.

    Directories are expanded to every file below them, sorted by relative path, so the version is
    independent of the file system's listing order.
    """
    digest = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]

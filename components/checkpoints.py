"""Versioned model artifacts: one content-hashed checkpoint file per version, and a pointer naming the one in use.

    <directory>/<version>.pt     {"format", <version key>, "config", "state_dict", **extra}
    <directory>/<pointer>.json   {<version key>: version, "checkpoint": "<version>.pt"}

version is a content hash (sha256 over the config and every tensor's dtype, shape and bytes, 16 hex digits): the
same weights give the same version, so a retrained model that changed nothing is recognised as such. Files are
written under a temporary name and renamed into place (the pointer too, so readers never see half of it).
Loading never executes code (torch.load with weights_only=True) and verifies the hash against the recorded
version. The RQ-VAE (codebook_version, current.json) and the ranker (model_version; models/serving.json names the
champion, components/serving.py) are the two kinds today.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from components.errors import DataError, IncompatibleCheckpoint
from components.storage import atomic_path, write_json

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Kind:
    """What one family of checkpoints is called, on disk and in messages."""
    name: str  # "RQ-VAE", "ranker"
    version_key: str  # "codebook_version", "model_version"
    pointer: str | None  # "current.json"; None: serving.json points at it
    made_by: str  # the command that writes one, quoted when none is found


def content_hash(config: dict, state: dict[str, torch.Tensor]) -> str:
    """Hash of a checkpoint's config and tensors: same weights, same version."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def save(kind: Kind, directory: Path, config: dict, state: dict[str, torch.Tensor], extra: dict) -> tuple[str, Path]:
    """Write <directory>/<version>.pt atomically; return the version and the path."""
    state = {key: t.detach().cpu() for key, t in state.items()}
    version = content_hash(config, state)
    path = Path(directory) / f"{version}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        # Saved through a file object: torch names the archive inside after a path's file name (here a random
        # temporary one), after a file object "archive", so the same checkpoint gives the same bytes.
        torch.save({"format": FORMAT, kind.version_key: version, "config": config, "state_dict": state, **extra}, fh)
    return version, path


def load(kind: Kind, path: Path, build: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """The model `build(config)` with the checkpoint's weights, in eval mode, and the checkpoint dict; a missing,
    damaged, code-carrying or edited file is a DataError naming it."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = build(ckpt["config"])
    except FileNotFoundError:
        raise DataError(f"{path}: {kind.name} checkpoint not found (run `{kind.made_by}` first)") from None
    except Exception as exc:  # corrupt zip, unpickling refused, a config the code cannot build
        raise DataError(f"{path}: not a valid semid {kind.name} checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]})") from exc
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as exc:  # missing or unexpected weights, other shapes
        raise IncompatibleCheckpoint(f"{path}: its weights do not fit the {kind.name} this code builds (saved by "
                                     f"an earlier model version? {type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())[:300]})") from exc
    found = content_hash(ckpt["config"], model.state_dict())
    if found != ckpt.get(kind.version_key):
        raise DataError(f"{path}: checkpoint content hash {found} does not match its recorded {kind.version_key} "
                        f"{ckpt.get(kind.version_key)} (corrupt or edited file)")
    model.eval()
    return model, ckpt


def read_pointer(kind: Kind, directory: Path) -> str | None:
    """The version the pointer names, or None when there is no pointer yet."""
    pointer = Path(directory) / kind.pointer
    try:
        return json.loads(pointer.read_text())[kind.version_key]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{pointer}: unreadable pointer, expected {{\"{kind.version_key}\": ...}} ({exc})") from exc


def write_pointer(kind: Kind, directory: Path, version: str) -> None:
    """Point at a checkpoint that exists, with one atomic rename."""
    if not (Path(directory) / f"{version}.pt").exists():
        raise DataError(f"{directory}/{version}.pt: cannot point {kind.pointer} at a missing checkpoint")
    write_json({kind.version_key: version, "checkpoint": f"{version}.pt"}, Path(directory) / kind.pointer)

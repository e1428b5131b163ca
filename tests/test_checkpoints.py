"""The versioned-artifact helper: content-hashed checkpoints and their pointer files, for any model."""
import json
import os

import pytest
import torch
from torch import nn

from components import checkpoints
from components.errors import DataError

KIND = checkpoints.Kind("toy", "toy_version", "current.json", "make toy")


def toy(config: dict) -> nn.Module:
    return nn.Linear(config["inputs"], 1)


def test_the_same_weights_give_the_same_version_and_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = toy({"inputs": 3})
    a, path_a = checkpoints.save(KIND, tmp_path / "a", {"inputs": 3}, model.state_dict(), {"note": "x"})
    b, path_b = checkpoints.save(KIND, tmp_path / "b", {"inputs": 3}, model.state_dict(), {"note": "x"})
    assert a == b and path_a.name == f"{a}.pt" and path_a.read_bytes() == path_b.read_bytes()
    loaded, ckpt = checkpoints.load(KIND, path_a, toy)
    assert torch.equal(loaded.weight, model.weight) and ckpt["toy_version"] == a and ckpt["note"] == "x"
    assert not loaded.training
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert checkpoints.content_hash({"inputs": 3}, model.state_dict()) != a


def test_an_edited_or_missing_checkpoint_is_refused(tmp_path):
    version, path = checkpoints.save(KIND, tmp_path, {"inputs": 2}, toy({"inputs": 2}).state_dict(), {})
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["bias"] += 1.0
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(DataError, match=f"does not match its recorded toy_version {version}"):
        checkpoints.load(KIND, tmp_path / "edited.pt", toy)
    with pytest.raises(DataError, match=r"toy checkpoint not found \(run `make toy` first\)"):
        checkpoints.load(KIND, tmp_path / "missing.pt", toy)


class Payload:
    """What a malicious checkpoint carries: unpickling it would run os.system."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_bearing_checkpoint_is_refused_by_name_and_runs_nothing(tmp_path):
    version, path = checkpoints.save(KIND, tmp_path, {"inputs": 2}, toy({"inputs": 2}).state_dict(), {})
    ckpt = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**ckpt, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=rf"{tmp_path / 'evil.pt'}: not a valid semid toy checkpoint "
                                        r"\(UnpicklingError: Weights only load failed"):
        checkpoints.load(KIND, tmp_path / "evil.pt", toy)
    assert not marker.exists()


def test_the_pointer_names_an_existing_checkpoint(tmp_path):
    assert checkpoints.read_pointer(KIND, tmp_path) is None
    version, _ = checkpoints.save(KIND, tmp_path, {"inputs": 2}, toy({"inputs": 2}).state_dict(), {})
    checkpoints.write_pointer(KIND, tmp_path, version)
    assert checkpoints.read_pointer(KIND, tmp_path) == version
    assert json.loads((tmp_path / "current.json").read_text()) == {"toy_version": version,
                                                                   "checkpoint": f"{version}.pt"}
    with pytest.raises(DataError, match="cannot point current.json at a missing checkpoint"):
        checkpoints.write_pointer(KIND, tmp_path, "0000000000000000")
    assert checkpoints.read_pointer(KIND, tmp_path) == version
    (tmp_path / "current.json").write_text("{}")
    with pytest.raises(DataError, match="unreadable pointer"):
        checkpoints.read_pointer(KIND, tmp_path)

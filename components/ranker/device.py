"""Where the ranker runs: CUDA with bf16 autocast, pinned memory and non-blocking copies when present, else the CPU."""
from __future__ import annotations

import torch

from components.errors import ParamsError


def pick_device(name: str) -> torch.device:
    """ranker.device: "auto" (CUDA when present), "cpu" or "cuda"."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("ranker.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

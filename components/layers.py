"""Building blocks the models share."""
from __future__ import annotations

from torch import nn


def mlp(dims: list[int], activation: type[nn.Module] = nn.ReLU, last_activation: bool = False) -> nn.Sequential:
    """Linear layers dims[0] -> dims[1] -> ... with `activation` between them (and after the last one when
    asked); a list of one dim is an empty Sequential (the identity)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_activation:
            layers.append(activation())
    return nn.Sequential(*layers)

"""Architectures the tests register with `--architecture NAME=helpers.models:FN`."""

from __future__ import annotations

import torch
from torch import nn


class MemoryHog(nn.Module):
    """Allocates `x[0, 0]` gigabytes per call: a real out-of-memory on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gigabytes = int(x[0, 0].item())
        if gigabytes > 0:
            block = torch.ones(gigabytes << 28, dtype=torch.float32, device=x.device)
            del block
        return x * self.scale


def memory_hog() -> nn.Module:
    return MemoryHog()


def tiny_mlp(features: int = 4, hidden: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def broken(**kwargs: object) -> nn.Module:
    raise ValueError("this builder always fails (a test of builder errors)")

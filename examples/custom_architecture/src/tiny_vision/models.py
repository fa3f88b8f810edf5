"""TinyCNN: a small image classifier that is not part of torchvision."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head, for RGB images of any size."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tiny_cnn(num_classes: int = 10, width: int = 16) -> TinyCNN:
    """Builds a TinyCNN; modelhost passes LoadModel's architecture arguments as keywords."""
    return TinyCNN(num_classes=num_classes, width=width)


# What the model takes: RGB images of any size, any number of rows. The server then checks
# each request against it, knows the outputs at load, and bounds the activations.
tiny_cnn.input_shape = (-1, 3, -1, -1)  # type: ignore[attr-defined]
tiny_cnn.input_dtype = "float32"  # type: ignore[attr-defined]

"""A small CNN with BatchNorm for the 8x8 handwritten digits of scikit-learn."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def build(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks (8x8 -> 4x4), global average pooling, a linear classifier.

    In float64: the model is tiny, so this costs little, and it keeps the rounding differences
    between CPU builds of torch (BLAS libraries, vector instruction sets) far below what training
    amplifies into different accuracies.
    """
    net = nn.Sequential(
        _block(1, width),
        _block(width, 2 * width),
        nn.MaxPool2d(2),
        _block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
    return net.to(torch.float64)

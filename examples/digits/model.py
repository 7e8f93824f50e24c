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
    net = net.to(torch.float64)
    init_exactly(net)
    return net


@torch.no_grad()
def init_exactly(net: nn.Module) -> None:
    """torch's default init range (uniform in +-1/sqrt(fan_in)) drawn in float64 and snapped to the
    training grid: torch draws it in float32, where CPUs with and without FMA differ in the last bit."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = m.weight[0].numel() ** -0.5
            for p in (m.weight, m.bias):
                if p is not None:
                    p.copy_((torch.rand(p.shape, dtype=torch.float64) * 2 - 1) * bound)
    snap_to_grid(net)


#: Parameters and BatchNorm buffers are rounded to multiples of GRID after every step. CPUs differ
#: in the last bits of float64 reductions (vector widths, FMA, BLAS kernels); SGD at this learning
#: rate is chaotic and would grow those bits into a different model within one epoch. Rounded to a
#: grid about 1e11 times coarser than the differences, every CPU lands on the same values (a
#: difference could only survive if a value fell within ~1e-16 of a half-grid point).
GRID = 2.0**-16


@torch.no_grad()
def snap_to_grid(net: nn.Module) -> None:
    """Round every floating-point parameter and buffer of ``net`` to a multiple of GRID in place."""
    for t in [*net.parameters(), *net.buffers()]:
        if t.is_floating_point():
            t.mul_(1 / GRID).round_().mul_(GRID)

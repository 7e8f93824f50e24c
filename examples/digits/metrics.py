"""The held-out metric named in bn.toml's [eval] section (used by ``ckptavg sweep`` and ``ckptavg soup``)."""

from __future__ import annotations

from torch import nn


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy over ``loader``'s (images, labels) batches; ckptavg calls it in eval mode, without gradients."""
    device = next(model.parameters()).device
    correct = count = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        correct += (pred == y).sum().item()
        count += len(y)
    return correct / count



def loss(model: nn.Module, loader) -> float:
    """Mean cross-entropy over ``loader`` (lower is better: set ``higher_is_better = false``). Finer-grained than
    accuracy on the 180 validation images, where many averages tie at 100 %."""
    device = next(model.parameters()).device
    total = count = 0.0
    for x, y in loader:
        total += nn.functional.cross_entropy(model(x.to(device)).cpu(), y, reduction="sum").item()
        count += len(y)
    return total / count

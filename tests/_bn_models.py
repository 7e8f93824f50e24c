"""Small models and helpers shared by the BatchNorm recalibration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv/BN blocks, a shared BN called twice per forward, dropout, Lazy and Sync BN, a BN1d head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.shared = nn.BatchNorm2d(8)  # applied to two different tensors in each forward
        self.drop = nn.Dropout(0.3)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.lazy = nn.LazyBatchNorm2d()
        self.sync = nn.SyncBatchNorm(16)
        self.fc = nn.Linear(16, 12)
        self.bn_head = nn.BatchNorm1d(12)
        self.out = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        a = self.shared(self.conv2(x))
        b = self.shared(self.drop(x) * 2.0 + 1.0)
        x = torch.relu(a + b)
        x = torch.relu(self.lazy(self.conv3(x)))
        x = torch.relu(self.sync(x))
        x = x.mean(dim=(2, 3))
        x = torch.relu(self.bn_head(self.fc(self.drop(x))))
        return self.out(x)


class VarietyNet(nn.Module):
    """One of each BatchNorm-like layer kind, fed with shapes each accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.lazy = nn.LazyBatchNorm2d()
        self.sync = nn.SyncBatchNorm(4)
        self.bn3d = nn.BatchNorm3d(2)
        self.bn1d_seq = nn.BatchNorm1d(4)  # (N, C, L) input
        self.bn1d_flat = nn.BatchNorm1d(4)  # (N, C) input
        self.untracked = nn.BatchNorm2d(4, track_running_stats=False)  # not BN-like: no statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn2d(x)
        x = self.inorm(x * 3.0 + 1.0)
        x = self.lazy(x + x.mean(dim=(2, 3), keepdim=True) ** 2)
        x = self.sync(x)
        n, c, h, w = x.shape
        v = self.bn3d(x.reshape(n, 2, 2, h, w) * 2.0).reshape(n, c, h, w)
        s = self.bn1d_seq(v.flatten(2) - 0.5)
        f = self.bn1d_flat(s.mean(dim=2) * 4.0)
        return self.untracked(x).sum() + f.sum()


class DictNet(nn.Module):
    """forward(image, scale) -> keyword arguments from dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(self.bn(image * scale.view(-1, 1, 1, 1))))


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def image_batches(
    n_batches: int = 3, batch_size: int = 6, size: int = 16, seed: int = 0, offsets: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches; with ``offsets`` each batch has its own mean (between-batch variance)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(batch_size, 3, size, size, generator=g) * (1.0 + 0.5 * b)
        if offsets:
            x = x + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1) * (b - 1)
        y = torch.randint(0, 10, (batch_size,), generator=g)
        out.append((x, y))
    return out


def population(inputs: list[torch.Tensor], channel_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per-channel mean and unbiased variance of all ``inputs`` together, in float64."""
    flat = [x.detach().double().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1) for x in inputs]
    allv = torch.cat(flat, dim=1)
    return allv.mean(dim=1), allv.var(dim=1, correction=1)


class InputRecorder:
    """Forward pre-hooks recording (clones of) every input each given module receives."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[name].append(args[0].detach().clone())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def counting(batches: list, fetched: list[int]) -> Iterator:
    """A generator over ``batches`` that records how many were fetched."""
    for b in batches:
        fetched.append(1)
        yield b


def scramble_stats(model: nn.Module, seed: int = 1) -> None:
    """Give every BN layer arbitrary stale statistics (so that reset/overwrite is observable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                if isinstance(m.running_mean, nn.parameter.UninitializedBuffer):
                    continue
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)

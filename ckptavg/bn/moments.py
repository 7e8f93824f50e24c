"""What each normalisation layer saw: per-channel moments in float64 (precise mode), forward-call
counters (torch mode), the statistics saved and restored around a pass, and their combination
across the ranks of a process group."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

#: The buffers recalibration rewrites; every other tensor of a state dict is left alone.
BN_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")

__all__ = ["BN_STAT_NAMES", "SHIFT_RATIO", "Moments", "BatchStatMoments", "uses_batch_stats", "CallCounter",
           "channel_dim", "single_device", "initialised", "snapshot", "restore", "combine_ranks"]


def channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and x.dim() == module._get_no_batch_dim():
        return 0  # unbatched InstanceNorm input (C, *)
    return 1


#: Shift a layer's inputs when the first batch has a channel whose |mean| exceeds this many standard
#: deviations. Below it the kernels' own fp32 moments were accurate to about 1e-7 relative (measured on
#: CPU up to 100 standard deviations; 3e-4 at 1e6), and not shifting saves a pass over the activations.
SHIFT_RATIO = 16.0


class Moments:
    """Per-channel count, mean and sum of squared deviations of everything a layer saw (float64).

    When the first batch shows a large mean against the spread (see :data:`SHIFT_RATIO`), every
    value is first shifted by a per-channel reference ``shift`` (the first batch's mean, in the
    input's dtype), so the per-batch moments are computed on values centred near zero; the
    float64 summary then holds moments of ``x - shift`` and :meth:`population` adds ``shift`` back.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.count = 0
        self.calls = 0
        self.shift: torch.Tensor | None = None
        self.shifting = False
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def shifted(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``x`` minus the per-channel reference, which the first call decides on from its batch."""
        if self.shift is None:
            dims = [d for d in range(x.dim()) if d != channel_dim]
            xf = x if x.dtype == torch.float64 else x.float()
            var, mean = torch.var_mean(xf, dim=dims, correction=0) if dims else (torch.zeros_like(xf), xf)
            self.shifting = bool((mean.abs() > SHIFT_RATIO * var.sqrt()).any())
            # Kept in the input's dtype: what is subtracted is exactly what is added back.
            self.shift = (mean if self.shifting else torch.zeros_like(mean)).to(x.dtype)
        if not self.shifting:
            return x
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return x - self.shift.to(x.device, x.dtype).view(shape)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.calls += 1
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        cdim = channel_dim(module, x)
        dims = [d for d in range(x.dim()) if d != cdim]
        with torch.no_grad():
            xs = x.detach()
            if xs.dtype not in (torch.float32, torch.float64):
                xs = xs.float()
            xs = self.shifted(xs, cdim)
            if dims:
                var, mean = torch.var_mean(xs, dim=dims, correction=0)
            else:
                mean, var = xs, torch.zeros_like(xs)
            self.combine(mean, var, x.numel() // x.shape[cdim])

    def combine(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Add one batch's per-channel (shifted) mean and biased variance over ``n`` values."""
        acc_device = mean.device if mean.device.type != "mps" else torch.device("cpu")  # no float64 on MPS
        # copy=True: ``mean`` may be a float64 buffer the next forward overwrites in place.
        mean_b = mean.to(acc_device, torch.float64, copy=True)
        m2_b = var.to(acc_device, torch.float64, copy=True) * n
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean_b, m2_b
        else:  # Chan et al.: combine two (count, mean, M2) summaries exactly
            total = self.count + n
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2_b + delta.square() * (self.count * n / total)
        self.count += n

    def population(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance with Bessel's correction ``M2 / (N - 1)``), float64."""
        assert self.mean is not None and self.m2 is not None and self.shift is not None
        mean = self.mean + self.shift.to(self.mean.device, self.mean.dtype)
        var = self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)
        return mean, var


class BatchStatMoments(Moments):
    """The same summary for a BatchNorm layer, without a second pass over its input.

    A forward pre-hook (:meth:`pre`) hands the layer ``x - shift`` instead of ``x``: in train mode
    BatchNorm's output does not change under a per-channel shift (up to rounding, which the
    shift reduces), and with ``momentum = 1`` the layer's own kernel leaves the shifted batch's
    mean and unbiased variance in its running buffers, which a forward hook reads.
    """

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dim() < 2:
            return None
        with torch.no_grad():
            return (self.shifted(x.detach(), 1), *args[1:])

    def __call__(self, module: Any, args: tuple[Any, ...], output: Any = None) -> None:
        x = args[0]
        self.calls += 1
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            var = module.running_var.detach() * ((n - 1) / n)  # unbiased -> biased
            self.combine(module.running_mean.detach(), var, n)


def uses_batch_stats(m: nn.Module) -> bool:
    """A BatchNorm layer whose own forward can report its batch statistics exactly enough."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
        return False
    rm = m.running_mean
    return not isinstance(rm, torch.Tensor) or not initialised(rm) or rm.dtype in (torch.float32, torch.float64)


class CallCounter:
    """Counts forward calls; for InstanceNorm in ``torch`` mode, sets the cumulative-average momentum."""

    def __init__(self, cumulative: bool) -> None:
        self.calls = 0
        self.cumulative = cumulative

    def __call__(self, module: Any, args: tuple[Any, ...]) -> None:
        self.calls += 1
        if self.cumulative:
            module.momentum = 1.0 / self.calls  # running <- running + (batch - running) / k


def single_device(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def initialised(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedBuffer)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the layer's running statistics (restored after a failed or unused pass)."""
    out: dict[str, torch.Tensor] = {}
    for name in BN_STAT_NAMES:
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and initialised(t):
            out[name] = t.detach().clone()
    return out


def restore(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and initialised(t) and t.shape == value.shape:
                t.copy_(value)




def combine_ranks(layers: list[Moments], batches: int, samples: int) -> tuple[int, int]:
    """Turn each rank's moments into those of every rank's inputs together (on every rank), with
    ``all_reduce`` in float64: ``N = sum n_r``, the mean ``G = sum n_r m_r / N`` and
    ``M2 = sum (M2_r + n_r (m_r - G)^2)`` (the law of total variance, as Chan's update, so no
    sum of squares cancels), each rank's mean ``m_r`` taken with its shift added back. Forward
    calls, batches and samples are summed. Returns the total (batches, samples)."""
    import torch.distributed as dist

    nccl = "nccl" in str(dist.get_backend())
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    f64 = torch.float64

    def channels(acc: Moments) -> int:
        if acc.mean is not None:
            return acc.mean.numel()
        rm = getattr(acc.module, "running_mean", None)
        return rm.numel() if isinstance(rm, torch.Tensor) and initialised(rm) else 0

    sizes = torch.tensor([channels(acc) for acc in layers], dtype=f64, device=dev)
    if layers:
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)  # a layer that never ran here still takes part
    width = [int(c) for c in sizes.tolist()]

    def mean_here(acc: Moments, c: int) -> torch.Tensor:
        if acc.mean is None or acc.shift is None:
            return torch.zeros(c, dtype=f64, device=dev)
        return (acc.mean + acc.shift.to(acc.mean.device, f64)).to(dev).reshape(-1)

    counts = [float(acc.count) for acc in layers]
    head = torch.tensor([batches, samples, *[acc.calls for acc in layers], *counts], dtype=f64, device=dev)
    sums = [mean_here(acc, c) * n for acc, c, n in zip(layers, width, counts)]
    flat = torch.cat([head, *sums])
    dist.all_reduce(flat)
    total_calls = flat[2:2 + len(layers)].tolist()
    total_counts = flat[2 + len(layers):2 + 2 * len(layers)].tolist()
    means, pos = [], 2 + 2 * len(layers)
    for c, n in zip(width, total_counts):
        means.append(flat[pos:pos + c] / n if n > 0 else flat[pos:pos + c])
        pos += c
    parts = []
    for acc, c, n, g in zip(layers, width, counts, means):
        if acc.mean is None or acc.m2 is None or n == 0:
            parts.append(torch.zeros(c, dtype=f64, device=dev))
        else:
            parts.append(acc.m2.to(dev).reshape(-1) + (mean_here(acc, c) - g).square() * n)
    m2 = torch.cat(parts) if parts else torch.zeros(0, dtype=f64, device=dev)
    if layers:
        dist.all_reduce(m2)
    pos = 0
    for acc, c, calls, n, g in zip(layers, width, total_calls, total_counts, means):
        shape_dev: Any = acc.mean.device if acc.mean is not None else acc.module.running_mean.device
        acc.calls, acc.count = int(calls), int(n)
        if n > 0:
            acc.mean = g.to(shape_dev)
            acc.m2 = m2[pos:pos + c].to(shape_dev)
            acc.shift = torch.zeros(c, dtype=f64, device=shape_dev)
        else:
            acc.mean = acc.m2 = None
        pos += c
    return int(flat[0].item()), int(flat[1].item())



"""Recompute BatchNorm statistics after averaging weights.

Averaged weights come with stale BatchNorm statistics; they must be recomputed from data.
Two modes:

``precise`` (default)
    For every BatchNorm-like layer, the exact per-channel mean and variance of *all* the
    inputs the layer saw over the pass (the population statistics). Each forward call
    contributes its count ``n_b``, mean ``m_b`` and biased variance ``v_b``; they are
    combined with the law of total variance (Chan's pairwise update, in float64), so the
    result does not depend on how the data was split into batches. The rest of the model
    runs in eval mode (dropout off) while the BN layers run in train mode: each normalises
    with its batch statistics, as during training, so deeper layers see the inputs they
    saw in training. At the end ``running_mean`` gets the population mean and
    ``running_var`` the population variance with Bessel's correction, ``M2 / (N - 1)``
    where ``N`` is the number of values per channel over the whole pass -- the same
    unbiased convention torch uses for ``running_var`` (so a one-batch pass gives exactly
    what torch's ``update_bn`` gives). ``num_batches_tracked`` is set to the number of
    forward calls the layer received.

    What is exact, and to what precision: the combination of per-batch moments over batches is
    float64 and exact up to rounding, whatever the batch split. The per-batch moments are in the
    input's precision (fp32 for a float32 model, fp64 for a float64 one). When a layer's first
    batch has a channel whose mean exceeds ``SHIFT_RATIO`` (16) standard deviations, every input
    of that layer is first shifted by a per-channel reference (the first batch's mean, held in
    the input's dtype and added back in float64 at the end), so a large mean costs no precision:
    activations around 1e4 with a spread of 0.01 come out with a relative variance error of a
    few 1e-7, not 1e-2. For BatchNorm layers with float32/float64 statistics the layer itself
    receives the (shifted) input -- its train-mode output does not change under a per-channel
    shift -- and, with ``momentum = 1``, its own kernel computes the batch mean and variance,
    which a forward hook reads: no second pass over the activations. Other layers
    (InstanceNorm, low-precision statistics) get a ``var_mean`` over their input in a pre-hook.
    Precision degrades only for inputs drifting from the first batch by many standard deviations.

``torch``
    What :func:`torch.optim.swa_utils.update_bn` does: reset the statistics, set
    ``momentum=None`` (cumulative average over forward calls) and run the whole model in
    train mode (dropout on). The per-batch variances are averaged, so the between-batch
    part of the variance is missed. Differences from ``update_bn``: dict batches, ``input``
    and ``call`` are supported; each module's own training flag is restored afterwards
    (``update_bn`` sets every module to the top module's flag); a layer that never ran
    keeps its previous statistics (``update_bn`` leaves it reset to 0 / 1); InstanceNorm
    layers with ``track_running_stats=True`` are averaged cumulatively too (``update_bn``
    leaves them alone, and torch's InstanceNorm ignores ``momentum=None``).

Layers covered ("BatchNorm-like"): every ``_NormBase`` with ``track_running_stats=True``:
BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d (initialised by the first batch), SyncBatchNorm
and InstanceNorm1d/2d/3d. SyncBatchNorm needs no conversion: without an initialised
process group torch runs it as a plain BatchNorm on any device, which is what a
single-process recalibration wants (with an initialised process group, ``torch`` mode
would synchronise normalisation across ranks while ``precise`` statistics are always this
process's own). For InstanceNorm, ``precise`` pools every instance and position of a
channel like BatchNorm does (the statistics of everything the layer saw), whereas torch's
own tracking (``torch`` mode) averages per-instance means and variances.

A layer called several times per forward (a shared module) accumulates every call: in
``precise`` mode all the inputs of all its calls form one population; in ``torch`` mode
each call is one step of the cumulative average, exactly as torch does it.
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CkptavgWarning, OptionError

__all__ = [
    "BNReport",
    "BN_STAT_NAMES",
    "MODES",
    "check_device",
    "is_bn_like",
    "recalibrate_bn",
]

#: The buffers recalibration rewrites; every other tensor of a state dict is left alone.
BN_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
MODES = ("precise", "torch")

Feed = Callable[[nn.Module, Any, "torch.device | None"], "int | None"]


def exc_text(exc: BaseException, *, bare_import_error: bool = False) -> str:
    """One short line (at most 300 characters) for an exception raised by user code: ``Type: text``.

    ``bare_import_error``: an ImportError's text alone (it already says what was missing).
    """
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    if bare_import_error and isinstance(exc, ImportError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that it exists here; ``ValueError`` with the reason otherwise.

    Example::

        >>> check_device("cpu")
        device(type='cpu')
    """
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("MPS is not available on this machine")
    return dev


def parse_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` without checking this machine has it (the meta device is refused)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a device ({exc_text(exc)})") from None
    if dev.type == "meta":
        raise ValueError("the meta device holds no data")
    return dev


def device_or_error(device: str | torch.device) -> torch.device:
    """:func:`check_device`, failing with the one-line :class:`OptionError` the CLI's ``--device`` gives."""
    try:
        return check_device(device)
    except ValueError as exc:
        raise OptionError(f"device {str(device)!r}: {exc}") from None


def is_bn_like(module: nn.Module) -> bool:
    """True for layers whose running statistics recalibration updates.

    BatchNorm*, LazyBatchNorm*, SyncBatchNorm and InstanceNorm* (every ``_NormBase``)
    with ``track_running_stats=True``.
    """
    return isinstance(module, nn.modules.batchnorm._NormBase) and bool(module.track_running_stats)


@dataclass
class BNReport:
    """What a recalibration did.

    Attributes:
        mode: ``"precise"`` or ``"torch"``.
        layers: qualified names of the layers whose statistics were updated.
        batches: batches fed to the model.
        samples: samples seen (first dimension of the model input, best effort).
        seconds: wall time of the pass.
        skipped: True when the model has no BatchNorm-like layer (no data pass was run).
        unused: BatchNorm-like layers that never ran during the pass (their statistics are unchanged).
    """

    mode: str
    layers: list[str]
    batches: int
    samples: int
    seconds: float
    skipped: bool
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if self.skipped:
            return "BN recalibration skipped: the model has no BatchNorm-like layer (no data pass run)"
        n = len(self.layers)
        text = (
            f"BN recalibrated ({self.mode}): {n} layer{'s' if n != 1 else ''} over {self.batches} "
            f"batch{'es' if self.batches != 1 else ''} / {self.samples} samples in {self.seconds:.1f} s"
        )
        if self.unused:
            text += f"; {len(self.unused)} layer(s) never ran and kept their statistics"
        return text


# -- feeding batches -----------------------------------------------------------------------


def _to_device(obj: Any, device: torch.device | None) -> Any:
    """Move tensors to ``device`` recursively through tuples, lists and mappings."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        items = {k: _to_device(v, device) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except Exception:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _leading_dim(obj: Any) -> int | None:
    """First dimension of the first tensor found in ``obj`` (the batch size, best effort)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() >= 1 else None
    if isinstance(obj, Mapping):
        values: Iterable[Any] = obj.values()
    elif isinstance(obj, list | tuple):
        values = obj
    else:
        return None
    for value in values:
        n = _leading_dim(value)
        if n is not None:
            return n
    return None


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return "a tensor"
    if isinstance(batch, Mapping):
        keys = ", ".join(repr(k) for k in list(batch)[:10])
        return f"a dict with keys {keys}" if keys else "an empty dict"
    if isinstance(batch, list | tuple):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def _model_arguments(batch: Any, input: int | str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments a batch gives the model (see :func:`recalibrate_bn`)."""
    if input is not None:
        if isinstance(batch, Mapping):
            if input not in batch:
                raise OptionError(f"input={input!r}: the batch is {_describe_batch(batch)}; no key {input!r}")
            return (batch[input],), {}
        if isinstance(batch, list | tuple):
            if not isinstance(input, int) or not -len(batch) <= input < len(batch):
                raise OptionError(f"input={input!r}: the batch is {_describe_batch(batch)}")
            return (batch[input],), {}
        raise OptionError(f"input={input!r}: the batch is {_describe_batch(batch)}, which cannot be indexed")
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise OptionError(f"a dict batch is passed as keyword arguments but has non-string keys {bad[:5]!r}")
        return (), dict(batch)
    if isinstance(batch, list | tuple):
        if not batch:
            raise OptionError("an empty list/tuple batch has no model input")
        return (batch[0],), {}
    return (batch,), {}


def _make_feed(call: Callable[[nn.Module, Any], Any] | None, input: int | str | None) -> Feed:
    if call is not None:

        def feed_call(model: nn.Module, batch: Any, device: torch.device | None) -> int | None:
            batch = _to_device(batch, device)
            call(model, batch)
            return _leading_dim(batch)

        return feed_call

    def feed(model: nn.Module, batch: Any, device: torch.device | None) -> int | None:
        args, kwargs = _model_arguments(batch, input)
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        model(*args, **kwargs)
        return _leading_dim((args, kwargs))

    return feed


# -- statistics ----------------------------------------------------------------------------


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and x.dim() == module._get_no_batch_dim():
        return 0  # unbatched InstanceNorm input (C, *)
    return 1


#: Shift a layer's inputs when the first batch has a channel whose |mean| exceeds this many standard
#: deviations. Below it the kernels' own fp32 moments were accurate to about 1e-7 relative (measured on
#: CPU up to 100 standard deviations; 3e-4 at 1e6), and not shifting saves a pass over the activations.
SHIFT_RATIO = 16.0


class _Moments:
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
        channel_dim = _channel_dim(module, x)
        dims = [d for d in range(x.dim()) if d != channel_dim]
        with torch.no_grad():
            xs = x.detach()
            if xs.dtype not in (torch.float32, torch.float64):
                xs = xs.float()
            xs = self.shifted(xs, channel_dim)
            if dims:
                var, mean = torch.var_mean(xs, dim=dims, correction=0)
            else:
                mean, var = xs, torch.zeros_like(xs)
            self.combine(mean, var, x.numel() // x.shape[channel_dim])

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


class _BatchStatMoments(_Moments):
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

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:  # type: ignore[override]
        x = args[0]
        self.calls += 1
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            var = module.running_var.detach() * ((n - 1) / n)  # unbiased -> biased
            self.combine(module.running_mean.detach(), var, n)


def _uses_batch_stats(m: nn.Module) -> bool:
    """A BatchNorm layer whose own forward can report its batch statistics exactly enough."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
        return False
    rm = m.running_mean
    return not _initialised(rm) or rm.dtype in (torch.float32, torch.float64)


class _CallCounter:
    """Counts forward calls; for InstanceNorm in ``torch`` mode, sets the cumulative-average momentum."""

    def __init__(self, cumulative: bool) -> None:
        self.calls = 0
        self.cumulative = cumulative

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1
        if self.cumulative:
            module.momentum = 1.0 / self.calls  # running <- running + (batch - running) / k


def _single_device(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def _initialised(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedBuffer)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name in BN_STAT_NAMES:
        t = getattr(module, name, None)
        if _initialised(t):
            out[name] = t.detach().clone()
    return out


def _restore(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            t = getattr(module, name, None)
            if _initialised(t) and t.shape == value.shape:
                t.copy_(value)


def _check_args(mode: str, max_batches: int | None) -> None:
    if mode not in MODES:
        raise OptionError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise OptionError(f"max_batches {max_batches!r}: expected a positive integer or None")


def _total(loader: Any, max_batches: int | None) -> int | None:
    try:
        n: int | None = len(loader)
    except Exception:
        n = None
    if max_batches is not None:
        n = max_batches if n is None else min(n, max_batches)
    return n


def _recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    feed: Feed,
    mode: str,
    device: torch.device | str | None,
    max_batches: int | None,
    progress: bool,
    total: int | None,
    ranks: Any = None,
) -> tuple[BNReport, dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """The pass itself; returns the report and, in precise mode, the float64 (mean, var) per layer.

    ``ranks``: an object with ``rank``, ``world`` and ``agree(error_or_None)`` (raises on every
    rank if any rank failed) for a pass split across the ranks of an initialised process group:
    see :func:`_combine_ranks`."""
    _check_args(mode, max_batches)
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    if ranks is not None and mode != "precise":
        raise OptionError("--bn-mode torch cannot be split across ranks (torchrun): its cumulative average depends "
                          "on the order of the forward calls; use --bn-mode precise, or recalibrate in one process")
    named = [(name, m) for name, m in model.named_modules() if is_bn_like(m)]
    if not named:
        return BNReport(mode, [], 0, 0, 0.0, skipped=True), {}

    start = time.perf_counter()
    if device is not None:
        dev: torch.device | None = device_or_error(device)
        model.to(dev)
    else:
        dev = _single_device(model)

    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for _, m in named}
    saved = {m: _snapshot(m) for _, m in named}
    hooks = []
    moments: dict[nn.Module, _Moments] = {}
    counters: dict[nn.Module, _CallCounter] = {}
    batches_seen = samples = 0
    bar = None
    try:
        if mode == "torch":
            model.train()
            for _, m in named:
                if _initialised(m.running_mean):  # a lazy layer resets itself when it materialises
                    m.reset_running_stats()
                m.momentum = None
                counter = _CallCounter(cumulative=isinstance(m, nn.modules.instancenorm._InstanceNorm))
                counters[m] = counter
                hooks.append(m.register_forward_pre_hook(counter))
        else:
            model.eval()
            for _, m in named:
                m.train()  # normalise with batch statistics, as in training
                if _uses_batch_stats(m):
                    if _initialised(m.running_mean):
                        m.reset_running_stats()  # no NaN/Inf from the checkpoint survives momentum 1
                    m.momentum = 1.0
                    stat = _BatchStatMoments(m)
                    moments[m] = stat
                    hooks.append(m.register_forward_pre_hook(stat.pre))
                    hooks.append(m.register_forward_hook(stat))
                else:
                    moments[m] = _Moments(m)
                    hooks.append(m.register_forward_pre_hook(moments[m]))

        from tqdm import tqdm

        bar = tqdm(
            total=total,
            desc=f"BN recalibration ({mode})",
            unit="batch",
            file=sys.stderr,
            disable=not progress,
        )
        try:
            with torch.no_grad():
                iterator: Iterator[Any] = iter(batches)
                index = 0  # of the batch in the whole loader; batch k is rank k % world's
                while max_batches is None or index < max_batches:
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    if index % world == rank:
                        n = feed(model, batch, dev)
                        batches_seen += 1
                        samples += n or 0
                        bar.update(1)
                    elif index == 0 and mode == "precise":
                        # every rank runs the first batch once, as the single process does, so that each
                        # layer picks the same shift reference (see _Moments); its moments are dropped
                        feed(model, batch, dev)
                        for acc in moments.values():
                            acc.count = acc.calls = 0
                            acc.mean = acc.m2 = None
                    index += 1
        except Exception as exc:
            if ranks is not None:
                ranks.agree(exc)  # tells the other ranks, which raise too; raises here
            raise
        if ranks is not None:
            ranks.agree(None)
            batches_seen, samples = _combine_ranks([moments[m] for _, m in named], batches_seen, samples)
        if batches_seen == 0:
            raise OptionError("the loader yielded no batches: BatchNorm statistics left unchanged")

        calls = {m: (moments[m].calls if mode == "precise" else counters[m].calls) for _, m in named}
        precise_stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for _, m in named:
                if calls[m] == 0:
                    _restore(m, saved[m])
                    continue
                if mode == "precise":
                    acc = moments[m]
                    if acc.mean is None:  # only empty inputs: nothing to estimate from
                        _restore(m, saved[m])
                        continue
                    mean, var = acc.population()
                    precise_stats[m] = (mean, var)
                    m.running_mean.copy_(mean.to(m.running_mean.device, m.running_mean.dtype))
                    m.running_var.copy_(var.to(m.running_var.device, m.running_var.dtype))
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(calls[m])
        updated = [name for name, m in named if calls[m] > 0 and (mode == "torch" or m in precise_stats)]
        unused = [name for name, m in named if name not in set(updated)]
    except BaseException:
        for _, m in named:
            _restore(m, saved[m])
        raise
    finally:
        if bar is not None:
            bar.close()
        for h in hooks:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in flags.items():
            m.training = flag

    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        warnings.warn(
            f"{len(unused)} BatchNorm-like layer(s) never ran during recalibration and kept their statistics: {shown}",
            CkptavgWarning,
            stacklevel=3,
        )
    report = BNReport(
        mode=mode,
        layers=updated,
        batches=batches_seen,
        samples=samples,
        seconds=time.perf_counter() - start,
        skipped=False,
        unused=unused,
    )
    return report, precise_stats


def _combine_ranks(layers: list[_Moments], batches: int, samples: int) -> tuple[int, int]:
    """Turn each rank's moments into those of every rank's inputs together (on every rank), with
    ``all_reduce`` in float64: ``N = sum n_r``, the mean ``G = sum n_r m_r / N`` and
    ``M2 = sum (M2_r + n_r (m_r - G)^2)`` (the law of total variance, as Chan's update, so no
    sum of squares cancels), each rank's mean ``m_r`` taken with its shift added back. Forward
    calls, batches and samples are summed. Returns the total (batches, samples)."""
    import torch.distributed as dist

    nccl = "nccl" in str(dist.get_backend())
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    f64 = torch.float64

    def channels(acc: _Moments) -> int:
        if acc.mean is not None:
            return acc.mean.numel()
        rm = getattr(acc.module, "running_mean", None)
        return rm.numel() if _initialised(rm) else 0

    sizes = torch.tensor([channels(acc) for acc in layers], dtype=f64, device=dev)
    if layers:
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)  # a layer that never ran here still takes part
    width = [int(c) for c in sizes.tolist()]

    def mean_here(acc: _Moments, c: int) -> torch.Tensor:
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
        shape_dev = acc.mean.device if acc.mean is not None else acc.module.running_mean.device
        acc.calls, acc.count = int(calls), int(n)
        if n > 0:
            acc.mean = g.to(shape_dev)
            acc.m2 = m2[pos:pos + c].to(shape_dev)
            acc.shift = torch.zeros(c, dtype=f64, device=shape_dev)
        else:
            acc.mean = acc.m2 = None
        pos += c
    return int(flat[0].item()), int(flat[1].item())


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    mode: str = "precise",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    input: int | str | None = None,
    progress: bool = False,
) -> BNReport:
    """Recompute the BatchNorm statistics of ``model`` in place from the batches of ``loader``.

    Args:
        model: any module; its BatchNorm-like layers (BatchNorm*, LazyBatchNorm*, SyncBatchNorm,
            InstanceNorm* with ``track_running_stats=True``) get new ``running_mean``,
            ``running_var`` and ``num_batches_tracked``. Nothing else changes; every module's
            training flag and every layer's momentum are restored afterwards.
        loader: any iterable of batches (a DataLoader, a list, a generator).
        mode: ``"precise"`` (exact population statistics, model in eval mode but BN layers
            normalising with batch statistics) or ``"torch"`` (what
            ``torch.optim.swa_utils.update_bn`` does). See the module documentation.
        device: run there: the model is moved (in place, like ``Module.to``) and batches are
            moved recursively through tuples, lists and dicts. ``None``: the model stays where
            it is and batches go to its device when all its tensors are on one device.
        max_batches: stop after this many batches (the next one is never fetched).
        call: ``call(model, batch)`` runs the forward pass itself, for batches the default
            rules do not cover.
        input: which part of each batch is the model input: an index into a tuple/list batch
            or a key of a dict batch, passed as the single positional argument.
            Default rules: a tensor batch is the input; a tuple/list batch feeds its first
            element; a dict batch is passed as keyword arguments.
        progress: show a tqdm progress bar over batches on stderr.

    Returns:
        A :class:`BNReport` (layers updated, batches and samples seen, time). A model without
        BatchNorm-like layers is left alone, the loader is not read and ``skipped`` is True.

    Raises:
        OptionError: bad ``mode``/``max_batches``/``input``, both ``call`` and ``input``, a
            ``device`` this machine lacks (the same one-line message as the CLI's ``--device``),
            or a loader that yields no batch. On any error the statistics are left as they were.

    No gradients are computed. Layers that never run keep their statistics (with a
    :class:`~ckptavg.errors.CkptavgWarning`).

    Example::

        >>> import torch, torchvision
        >>> from ckptavg import recalibrate_bn
        >>> model = torchvision.models.resnet18(weights=None, num_classes=10)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32), torch.zeros(64))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=16)
        >>> report = recalibrate_bn(model, loader, mode="precise")   # (images, labels) -> images
        >>> print(report.summary())                                  # doctest: +ELLIPSIS
        BN recalibrated (precise): 20 layers over 4 batches / 64 samples in ... s
    """
    if call is not None and input is not None:
        raise OptionError("give either call or input, not both")
    if input is not None and (isinstance(input, bool) or not isinstance(input, int | str)):
        raise OptionError(f"input={input!r}: expected an index (int) or a dict key (str)")
    report, _ = _recalibrate(
        model,
        loader,
        feed=_make_feed(call, input),
        mode=mode,
        device=device,
        max_batches=max_batches,
        progress=progress,
        total=_total(loader, max_batches),
    )
    return report


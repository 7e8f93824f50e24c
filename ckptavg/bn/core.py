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

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..devices import device_or_error
from ..errors import CkptavgWarning, OptionError
from ..options import BN_MODES
from .feed import Feed, make_feed
from .moments import (
    BN_STAT_NAMES,
    BatchStatMoments,
    CallCounter,
    Moments,
    combine_ranks,
    initialised,
    restore,
    single_device,
    snapshot,
    uses_batch_stats,
)

__all__ = ["BNReport", "BN_STAT_NAMES", "is_bn_like", "recalibrate_bn", "recalibrate_pass", "check_args",
           "total_batches"]



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


def check_args(mode: str, max_batches: int | None) -> None:
    if mode not in BN_MODES:
        raise OptionError(f"mode {mode!r}: expected one of {', '.join(BN_MODES)}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise OptionError(f"max_batches {max_batches!r}: expected a positive integer or None")


def total_batches(loader: Any, max_batches: int | None) -> int | None:
    try:
        n: int | None = len(loader)
    except Exception:
        n = None
    if max_batches is not None:
        n = max_batches if n is None else min(n, max_batches)
    return n


@dataclass(eq=False)
class _Pass:
    """The state of one recalibration pass: the layers, what they saw, and what to restore."""

    named: list[tuple[str, Any]]  # the normalisation layers (duck-typed: running stats, momentum)
    mode: str
    saved: dict[nn.Module, dict[str, torch.Tensor]]
    moments: dict[nn.Module, Moments] = field(default_factory=dict)
    counters: dict[nn.Module, CallCounter] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    batches: int = 0
    samples: int = 0

    def install_torch_mode(self, model: nn.Module) -> None:
        """``torch`` mode: the whole model in train mode, each layer a cumulative average (momentum None)."""
        model.train()
        for _, m in self.named:
            if initialised(m.running_mean):  # a lazy layer resets itself when it materialises
                m.reset_running_stats()
            m.momentum = None
            counter = CallCounter(cumulative=isinstance(m, nn.modules.instancenorm._InstanceNorm))
            self.counters[m] = counter
            self.hooks.append(m.register_forward_pre_hook(counter))

    def install_precise_mode(self, model: nn.Module) -> None:
        """``precise`` mode: the model in eval mode, its normalisation layers normalising with batch
        statistics, each layer's input summarised in float64 (:mod:`.moments`)."""
        model.eval()
        for _, m in self.named:
            m.train()  # normalise with batch statistics, as in training
            if uses_batch_stats(m):
                if initialised(m.running_mean):
                    m.reset_running_stats()  # no NaN/Inf from the checkpoint survives momentum 1
                m.momentum = 1.0
                stat = BatchStatMoments(m)
                self.moments[m] = stat
                self.hooks.append(m.register_forward_pre_hook(stat.pre))
                self.hooks.append(m.register_forward_hook(stat))
            else:
                self.moments[m] = Moments(m)
                self.hooks.append(m.register_forward_pre_hook(self.moments[m]))

    def run_batches(self, model: nn.Module, batches: Iterable[Any], feed: Feed, dev: torch.device | None,
                    max_batches: int | None, bar: Any, rank: int, world: int) -> None:
        """Feed the batches (batch ``k`` on rank ``k % world``; every rank runs the first one)."""
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
                    self.batches += 1
                    self.samples += n or 0
                    bar.update(1)
                elif index == 0 and self.mode == "precise":
                    # every rank runs the first batch once, as the single process does, so that each
                    # layer picks the same shift reference (see Moments); its moments are dropped
                    feed(model, batch, dev)
                    for acc in self.moments.values():
                        acc.count = acc.calls = 0
                        acc.mean = acc.m2 = None
                index += 1

    def apply(self) -> tuple[list[str], dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
        """Write the new statistics into the layers (a layer that never ran keeps its own); returns
        the names of the layers updated and, in precise mode, the float64 (mean, var) per layer."""
        precise = self.mode == "precise"
        calls = {m: (self.moments[m].calls if precise else self.counters[m].calls) for _, m in self.named}
        stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for _, m in self.named:
                if calls[m] == 0:
                    restore(m, self.saved[m])
                    continue
                if precise:
                    acc = self.moments[m]
                    if acc.mean is None:  # only empty inputs: nothing to estimate from
                        restore(m, self.saved[m])
                        continue
                    mean, var = acc.population()
                    stats[m] = (mean, var)
                    m.running_mean.copy_(mean.to(m.running_mean.device, m.running_mean.dtype))
                    m.running_var.copy_(var.to(m.running_var.device, m.running_var.dtype))
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(calls[m])
        return [name for name, m in self.named if calls[m] > 0 and (not precise or m in stats)], stats


def recalibrate_pass(
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
    """The pass itself (:func:`recalibrate_bn` and the spec-driven
    :func:`~ckptavg.bn.load.recalibrate_state_dict` call it); returns the report and, in precise
    mode, the float64 (mean, var) per layer.

    ``ranks``: an object with ``rank``, ``world`` and ``agree(error_or_None)`` (raises on every
    rank if any rank failed) for a pass split across the ranks of an initialised process group:
    see :func:`~ckptavg.bn.moments.combine_ranks`.

    Example::

        report, stats = recalibrate_pass(model, loader, feed=make_feed(None, None), mode="precise",
                                         device=None, max_batches=None, progress=False, total=None)
    """
    check_args(mode, max_batches)
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
        dev = single_device(model)
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for _, m in named}
    state = _Pass(named, mode, {m: snapshot(m) for _, m in named})
    bar = None
    try:
        if mode == "torch":
            state.install_torch_mode(model)
        else:
            state.install_precise_mode(model)
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"BN recalibration ({mode})", unit="batch", file=sys.stderr, disable=not progress)
        try:
            state.run_batches(model, batches, feed, dev, max_batches, bar, rank, world)
        except Exception as exc:
            if ranks is not None:
                ranks.agree(exc)  # tells the other ranks, which raise too; raises here
            raise
        if ranks is not None:
            ranks.agree(None)
            state.batches, state.samples = combine_ranks([state.moments[m] for _, m in named], state.batches,
                                                         state.samples)
        if state.batches == 0:
            raise OptionError("the loader yielded no batches: BatchNorm statistics left unchanged")
        updated, precise_stats = state.apply()
        unused = [name for name, m in named if name not in set(updated)]
    except BaseException:
        for _, m in named:
            restore(m, state.saved[m])
        raise
    finally:
        if bar is not None:
            bar.close()
        for h in state.hooks:
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
    report = BNReport(mode=mode, layers=updated, batches=state.batches, samples=state.samples,
                      seconds=time.perf_counter() - start, skipped=False, unused=unused)
    return report, precise_stats


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
    report, _ = recalibrate_pass(
        model,
        loader,
        feed=make_feed(call, input),
        mode=mode,
        device=device,
        max_batches=max_batches,
        progress=progress,
        total=total_batches(loader, max_batches),
    )
    return report



"""Scoring a state dict with the model and held-out data a spec names (its ``[eval]`` section).

:class:`Evaluator` builds the spec's model once, loads each state dict into it strictly,
recalibrates BatchNorm statistics with ``[data]`` first when asked and the model has BatchNorm
layers, and calls ``[eval].metric(model, loader)`` with the model in eval mode, on the spec's
device, under ``torch.no_grad()``. Failures of the metric are one-line
:class:`~ckptavg.errors.SpecError` naming ``[eval].metric``.

Example::

    >>> from ckptavg.evaluate import Evaluator
    >>> ev = Evaluator("bn.toml")                                        # doctest: +SKIP
    >>> score, sd = ev.score(ckptavg.average("runs/", last=5), recalibrate=True)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .bn.core import is_bn_like
from .bn.load import load_strictly, recalibrate_state_dict
from .bn.spec import BNSpec, load_spec
from .errors import SpecError, exc_text

__all__ = ["Evaluator", "is_better"]


def is_better(a: float, b: float | None, higher_is_better: bool) -> bool:
    """True when score ``a`` is strictly better than ``b`` (NaN is worse than any number; None: no score yet).

    Example::

        >>> is_better(0.9, 0.8, True), is_better(0.9, 0.8, False), is_better(0.1, float("nan"), True)
        (True, False, True)
    """
    if b is None:
        return True
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if higher_is_better else a < b


class Evaluator:
    """Scores state dicts with a spec's ``[model]``, ``[eval]`` (and ``[data]`` for BatchNorm).

    Args:
        spec: a spec file or a loaded :class:`~ckptavg.bn.BNSpec`; it must have an ``[eval]`` section.
        device: overrides the spec's ``[run].device``.
        bn_mode: ``"precise"`` or ``"torch"``, for the BatchNorm recalibration of averages.

    Example::

        >>> ev = Evaluator("bn.toml", device="cpu")                     # doctest: +SKIP
        >>> ev.has_bn, ev.higher_is_better                              # doctest: +SKIP
        (True, True)
        >>> score, _ = ev.score(torch.load("swa.pt"), recalibrate=True)  # doctest: +SKIP
    """

    def __init__(self, spec: BNSpec | str | os.PathLike[str], *, device: str | torch.device | None = None,
                 bn_mode: str = "precise") -> None:
        self.spec = spec if isinstance(spec, BNSpec) else load_spec(spec)
        if self.spec.eval is None:
            raise self.spec.error("[eval]", "missing section: sweep and soup need [eval] with a held-out loader and "
                                            "a metric (model, loader) -> float")
        self.device = self.spec.resolve_device(device)
        self.bn_mode = bn_mode
        self.model = self.spec.build_model()
        self.has_bn = any(is_bn_like(m) for m in self.model.modules())
        self._loader: Iterable[Any] | None = None
        self.evaluations = 0

    @property
    def higher_is_better(self) -> bool:
        """``[eval].higher_is_better``."""
        return bool(self.spec.eval.higher_is_better)  # type: ignore[union-attr]

    @property
    def metric_name(self) -> str:
        """The metric reference as written in the spec."""
        return self.spec.eval.metric  # type: ignore[union-attr]

    def _eval_loader(self) -> Iterable[Any]:
        if self._loader is not None:
            return self._loader
        loader = self.spec.build_eval_loader()
        try:
            reusable = iter(loader) is not loader  # a one-shot iterator is rebuilt for every score
        except Exception:
            reusable = False
        if reusable:
            self._loader = loader
        return loader

    def score(self, state_dict: Mapping[str, torch.Tensor], *, recalibrate: bool) -> tuple[float, dict]:
        """Score one state dict; returns ``(score, state_dict_scored)``.

        With ``recalibrate`` and a model with BatchNorm layers, the statistics are recomputed from
        ``[data]`` first and the returned state dict is the recalibrated one; otherwise it is the input.
        """
        sd = dict(state_dict)
        if recalibrate and self.has_bn:
            sd, _ = recalibrate_state_dict(sd, self.spec, mode=self.bn_mode, device=self.device)
        model = self.model
        load_strictly(model, sd, self.spec)
        model.to(self.device)
        model.eval()
        loader = self._eval_loader()
        ref = self.metric_name
        try:
            with torch.no_grad():
                value = self.spec.eval.metric_function(model, loader)  # type: ignore[union-attr]
        except SpecError:
            raise
        except Exception as exc:  # user code: one line naming the entry
            raise self.spec.error("[eval].metric", f"{ref!r} raised {exc_text(exc)}") from exc
        self.evaluations += 1
        return _as_float(value, self.spec, ref), sd


def _as_float(value: Any, spec: BNSpec, ref: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().cpu().item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    text = repr(value)
    text = text[:57] + "..." if len(text) > 60 else text
    raise spec.error("[eval].metric", f"{ref!r} returned {type(value).__name__} {text}, not a number")

"""Order and select: put checkpoints in training order, then keep the ones asked for.

Ordering (``order="auto"``): by the step every checkpoint records, else by the epoch
every checkpoint records, else by the numbers in the file names (natural sort), else
as given. ``order="given"`` keeps the command-line order; ``"step"``, ``"epoch"`` and
``"name"`` force one rule.

Selection options combine, applied in this order:

1. ``epochs=(A, B)`` and ``steps=(A, B)``: inclusive ranges, either end open;
2. ``last=N``: the N newest;
3. ``every=K``: every K-th, counted back from the newest (so the newest stays);
4. ``best=N`` with ``metric``: the N with the highest value of the metric (lowest with
   ``lower_is_better``), kept in training order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .discover import natural_key
from .errors import OptionError, SelectionError
from .io import Checkpoint
from .options import ORDERS

__all__ = ["Selection", "order_checkpoints", "select", "select_with_notes", "same_time", "parse_range", "ORDER_RULES"]

#: the order rules, declared once in :mod:`ckptavg.options`
ORDER_RULES = ORDERS
Range = tuple[int | float | None, int | float | None]


def parse_range(value: str | Sequence[float | None] | range | None, option: str = "range") -> Range | None:
    """Parse ``"12:20"``, ``"150:"``, ``":20"``, ``"7"``, a ``(lo, hi)`` pair or a ``range``.

    ``--epochs`` takes fractional bounds (Hugging Face Trainer records epochs such as 2.5);
    ``--steps`` takes integers.

    Example::

        parse_range("2.5:", "--epochs")  # (2.5, None)
        parse_range("100:200", "--steps")  # (100, 200)
    """
    if value is None:
        return None
    allow_float = "epoch" in option
    kinds = "numbers" if allow_float else "integers"
    if isinstance(value, range):
        if value.step != 1 or len(value) == 0:
            raise OptionError(f"{option}: a range must be non-empty with step 1")
        return (value.start, value.stop - 1)
    if isinstance(value, str):
        s = value.strip()
        try:
            if ":" in s:
                lo_s, hi_s = s.split(":", 1)
                lo = _number(lo_s, allow_float) if lo_s.strip() else None
                hi = _number(hi_s, allow_float) if hi_s.strip() else None
            else:
                lo = hi = _number(s, allow_float)
        except ValueError:
            raise OptionError(f"{option}: expected A:B, A:, :B or N with {kinds}, got {value!r}") from None
    else:
        try:
            lo, hi = value
        except (TypeError, ValueError):
            raise OptionError(f"{option}: expected a (low, high) pair, got {value!r}") from None
        for v in (lo, hi):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or (not allow_float and not float(v).is_integer())):
                raise OptionError(f"{option}: expected {kinds}, got {value!r}")
    if lo is not None and hi is not None and lo > hi:
        raise OptionError(f"{option}: empty range {lo}:{hi} (the first number must not exceed the second)")
    return (lo, hi)


def _number(s: str, allow_float: bool) -> int | float:
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        if not allow_float:
            raise
    x = float(s)
    if not math.isfinite(x):
        raise ValueError(s)
    return int(x) if x.is_integer() else x


@dataclass
class Selection:
    """Which checkpoints to keep; see the module docstring for the order of application."""

    epochs: Range | None = None
    steps: Range | None = None
    last: int | None = None
    every: int | None = None
    best: int | None = None
    metric: str | None = None
    lower_is_better: bool = False

    def validate(self) -> None:
        for name in ("last", "every", "best"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise OptionError(f"--{name} must be a positive integer, got {v!r}")
        if self.best is not None and not self.metric:
            raise OptionError("--best needs --metric NAME (a scalar stored in the checkpoints)")
        if self.metric and self.best is None:
            raise OptionError("--metric is only used with --best N")

    def describe(self) -> str:
        parts = []
        if self.epochs:
            parts.append(f"epochs {_fmt_range(self.epochs)}")
        if self.steps:
            parts.append(f"steps {_fmt_range(self.steps)}")
        if self.last:
            parts.append(f"last {self.last}")
        if self.every:
            parts.append(f"every {self.every}")
        if self.best:
            better = "lower" if self.lower_is_better else "higher"
            parts.append(f"best {self.best} by {self.metric} ({better} is better)")
        return ", ".join(parts) or "all"


def _fmt_range(r: Range) -> str:
    lo, hi = r
    return f"{'' if lo is None else lo}:{'' if hi is None else hi}"


def order_checkpoints(ckpts: Sequence[Checkpoint], order: str = "auto") -> tuple[list[Checkpoint], str]:
    """Sort checkpoints into training order; returns them and the rule used (for the plan)."""
    if order not in ORDER_RULES:
        raise OptionError(f"--order must be one of {', '.join(ORDER_RULES)}, got {order!r}")
    items = list(ckpts)
    if order == "given" or len(items) <= 1:
        return items, "as given"

    def name_key(c: Checkpoint) -> tuple:
        return natural_key(str(c.path))

    steps_known = all(c.meta.step is not None for c in items)
    epochs_known = all(c.meta.epoch is not None for c in items)
    names_numbered = all(c.meta.name_numbers for c in items)

    def src(attr: str) -> str:
        froms = {getattr(c.meta, attr + "_from") for c in items}
        if froms == {"recorded"}:
            return "recorded"
        return "from file names" if froms == {"name"} else "recorded/file names"

    if order == "step" or (order == "auto" and steps_known):
        if not steps_known:
            missing = next(c for c in items if c.meta.step is None)
            raise SelectionError(f"{missing.path}: records no step (and its name has none); --order step needs one")
        items.sort(key=lambda c: (c.meta.step, c.meta.epoch if c.meta.epoch is not None else -1, name_key(c)))
        return items, f"by step ({src('step')})"
    if order == "epoch" or (order == "auto" and epochs_known):
        if not epochs_known:
            missing = next(c for c in items if c.meta.epoch is None)
            raise SelectionError(f"{missing.path}: records no epoch (and its name has none); --order epoch needs one")
        items.sort(key=lambda c: (c.meta.epoch, c.meta.step if c.meta.step is not None else -1, name_key(c)))
        return items, f"by epoch ({src('epoch')})"
    if order == "name" or (order == "auto" and names_numbered):
        items.sort(key=name_key)
        return items, "by the numbers in file names (natural sort)"
    return items, "as given (no step, epoch or number in every checkpoint)"


def _available(items: Sequence[Checkpoint], attr: str) -> str:
    vals = [getattr(c.meta, attr) for c in items]
    known = sorted(v for v in vals if v is not None)
    if not known:
        return f"no checkpoint records a {attr}"
    shown = ", ".join(map(str, known[:12])) + (", ..." if len(known) > 12 else "")
    return f"available {attr}s: {shown}"


def _in_range(v: float, r: Range) -> bool:
    lo, hi = r
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def metric_value(c: Checkpoint, metric: str) -> float:
    """The value of ``metric`` stored in checkpoint ``c`` (top level or in ``metrics``)."""
    v = c.meta.metrics.get(metric)
    if v is None:
        have = ", ".join(sorted(c.meta.metrics)) or "none"
        raise SelectionError(f"{c.path}: has no scalar {metric!r} (metrics found: {have})")
    return float(v)


def select(items: Sequence[Checkpoint], sel: Selection) -> list[Checkpoint]:
    """Apply the selection to checkpoints already in training order.

    Example::

        ordered, rule = order_checkpoints(opened)
        chosen = select(ordered, Selection(epochs=(10, None), last=5))
    """
    return select_with_notes(items, sel)[0]


def select_with_notes(items: Sequence[Checkpoint], sel: Selection) -> tuple[list[Checkpoint], list[str]]:
    """:func:`select`, plus notes for the plan about choices the user may not expect: ``--last N``
    with fewer than N checkpoints, and a ``--best`` cut decided by a tie (the earliest wins).

    Example::

        chosen, notes = select_with_notes(ordered, Selection(last=10))
    """
    sel.validate()
    notes: list[str] = []
    out = list(items)
    for attr, rng in (("epoch", sel.epochs), ("step", sel.steps)):
        if rng is None:
            continue
        for c in out:
            if getattr(c.meta, attr) is None:
                raise SelectionError(
                    f"{c.path}: records no {attr} and its file name has none; --{attr}s needs one for every checkpoint"
                )
        kept = [c for c in out if _in_range(getattr(c.meta, attr), rng)]
        if not kept:
            raise SelectionError(
                f"--{attr}s {_fmt_range(rng)} matches no checkpoint ({_available(out, attr)})"
            )
        out = kept
    if sel.last is not None:
        if sel.last > len(out):
            notes.append(f"--last {sel.last}: only {len(out)} checkpoint{'s' if len(out) != 1 else ''} "
                         f"{'are' if len(out) != 1 else 'is'} available, so all {len(out)} are used")
        out = out[-sel.last :]
    if sel.every is not None:
        n = len(out)
        out = [c for i, c in enumerate(out) if (n - 1 - i) % sel.every == 0]
    if sel.best is not None:
        assert sel.metric is not None
        worst = math.inf if sel.lower_is_better else -math.inf
        vals = {id(c): (v if not math.isnan(v := metric_value(c, sel.metric)) else worst) for c in out}
        # a stable sort of checkpoints in training order: among equal values the earliest ranks first
        ranked = sorted(out, key=lambda c: vals[id(c)], reverse=not sel.lower_is_better)
        if len(ranked) > sel.best and vals[id(ranked[sel.best - 1])] == vals[id(ranked[sel.best])]:
            tie = vals[id(ranked[sel.best])]
            tied = [c for c in ranked if vals[id(c)] == tie]
            kept = [c for c in tied if c in ranked[: sel.best]]
            dropped = [c for c in tied if c not in kept]
            notes.append(
                f"--best {sel.best}: {len(tied)} checkpoints tie at {sel.metric}={tie:g}; the earliest win: kept "
                f"{', '.join(str(c.path) for c in kept)}; left out {', '.join(str(c.path) for c in dropped)}"
            )
        keep = {id(c) for c in ranked[: sel.best]}
        out = [c for c in out if id(c) in keep]
    if not out:
        raise SelectionError(f"the selection ({sel.describe()}) keeps no checkpoint of the {len(items)} given")
    return out, notes


def same_time(items: Sequence[Checkpoint], attr: str) -> tuple[Checkpoint, Checkpoint] | None:
    """The first two checkpoints that record the same ``attr`` (``"step"`` or ``"epoch"``), or None.

    Two files at one step are usually one checkpoint saved twice (fairseq writes both
    ``checkpoint10.pt`` and ``checkpoint_10_5000.pt``): averaging both counts it twice.
    Power-EMA snapshots of different profiles (EDM2: different ``sigma_rel``/``gamma``)
    legitimately share a step and are not reported.

    Example::

        pair = same_time(chosen, "step")
        if pair: print(pair[0].path, pair[1].path)
    """
    seen: dict[Any, Checkpoint] = {}
    for c in items:
        v = getattr(c.meta, attr)
        if v is None:
            continue
        k = (v, c.meta.sigma_rel, c.meta.gamma)
        if k in seen:
            return seen[k], c
        seen[k] = c
    return None

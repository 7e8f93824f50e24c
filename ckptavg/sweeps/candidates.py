"""The candidates of a sweep: windows (last N, epoch and step ranges) times methods (uniform, EMA
decays, power-EMA widths)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..options import METHODS
from .common import as_list, pos_int

__all__ = ["Candidate", "sweep_candidates"]


@dataclass
class Candidate:
    name: str
    options: dict[str, Any]
    method: str
    param: str | None
    value: float | None
    window: str


def windows(last: list[int], epochs: list[str], steps: list[str], n: int) -> list[tuple[str, dict[str, Any]]]:
    if not (last or epochs or steps):  # default: the 2, 4, 8, ... newest, and all of them
        sizes = [2 ** k for k in range(1, n.bit_length() + 1) if 2 ** k < n]
        return [(f"last {k}", {"last": k}) for k in sizes] + [("all", {})]
    out = []
    lasts: list[int | None] = [*last] or [None]
    windows_e: list[str | None] = [*epochs] or [None]
    windows_s: list[str | None] = [*steps] or [None]
    for lv, ev, sv in itertools.product(lasts, windows_e, windows_s):
        opts = {k: v for k, v in (("last", lv), ("epochs", ev), ("steps", sv)) if v is not None}
        out.append((", ".join(f"{k} {v}" for k, v in opts.items()), opts))
    return out


def methods(method: Any, decays: list[float], sigmas: list[float]) -> list[tuple[str, str | None, float | None]]:

    if method is None:
        names = ["uniform"] + (["ema"] if decays else []) + (["power-ema"] if sigmas else [])
    else:
        names = as_list(method, "--method", lambda s: str(s).lower().replace("_", "-"))
    for m in names:
        if m not in METHODS:
            raise OptionError(f"--method: {m!r} is not one of {', '.join(METHODS)}")
    if "ema" in names and not decays:
        raise OptionError("--method ema in a sweep needs --decay values, e.g. --decay 0.9,0.99")
    if decays and "ema" not in names:
        raise OptionError("--decay applies to --method ema: add ema to --method (e.g. --method uniform,ema)")
    if "power-ema" in names and not sigmas:
        raise OptionError("--method power-ema in a sweep needs --sigma-rel values, e.g. --sigma-rel 0.05,0.1")
    if sigmas and "power-ema" not in names:
        raise OptionError("--sigma-rel applies to --method power-ema: add power-ema to --method")
    out: list[tuple[str, str | None, float | None]] = []
    for m in dict.fromkeys(names):
        if m == "uniform":
            out.append((m, None, None))
        elif m == "ema":
            out.extend((m, "decay", d) for d in decays)
        else:
            out.extend((m, "sigma_rel", s) for s in sigmas)
    return out


def sweep_candidates(n: int, *, last: Any = None, epochs: Any = None, steps: Any = None, method: Any = None,
                     decay: Any = None, sigma_rel: Any = None) -> list[Any]:
    """The candidate averages of a sweep over ``n`` checkpoints, before de-duplication.

    The cartesian product of the windows (``last`` x ``epochs`` x ``steps``; default: the 2, 4,
    8, ... newest and all) and the methods (``uniform`` once; ``ema`` once per ``decay``;
    ``power-ema`` once per ``sigma_rel``): a decay never pairs with uniform or power-ema.

    Example::

        >>> [c.name for c in sweep_candidates(10, last="2,4", method="uniform,ema", decay="0.9")]
        ['uniform, last 2', 'ema decay=0.9, last 2', 'uniform, last 4', 'ema decay=0.9, last 4']
    """
    lasts = as_list(last, "--last", pos_int)
    epoch_ranges = as_list(epochs, "--epochs", str)
    step_ranges = as_list(steps, "--steps", str)
    decays = as_list(decay, "--decay", float)
    sigmas = as_list(sigma_rel, "--sigma-rel", float)
    out = []
    for wname, wopts in windows(lasts, epoch_ranges, step_ranges, n):
        for m, param, value in methods(method, decays, sigmas):
            opts = dict(wopts, method=m)
            head = m
            if param is not None:
                opts[param] = value
                head += f" {param}={value:g}"
            out.append(Candidate(f"{head}, {wname}", opts, m, param, value, wname))
    return out



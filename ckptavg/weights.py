"""Weights: every averaging method is a weight vector over the selected checkpoints.

The engine only ever computes ``sum_i w_i * theta_i``. A method is a function from the
selected checkpoints (in training order) to weights that sum to 1.

* ``uniform``: ``w_i = 1/n`` (stochastic weight averaging).
* ``ema`` with a per-checkpoint decay ``D``: the exponential moving average
  ``theta <- D*theta + (1-D)*theta_i`` started at the first checkpoint, i.e.
  ``w_1 = D^(n-1)`` and ``w_i = (1-D) * D^(n-i)`` for ``i >= 2``.
* ``ema`` with a per-step decay ``d`` and recorded steps ``t_i``: each checkpoint's
  decay is ``D_i = d^(t_i - t_{i-1})``; ``w_i = (1-D_i) * prod_{j>i} D_j`` and the first
  checkpoint takes ``prod_{j>1} D_j``.
* ``power-ema`` (post-hoc power-function EMA, Karras et al. 2024): the profile with
  density proportional to ``t^gamma`` on ``[0, T]``, integrated over each checkpoint's
  share of the time line: ``w_i = (b_i/T)^(gamma+1) - (b_{i-1}/T)^(gamma+1)`` with
  ``b_0 = 0``, ``b_n = T`` and ``b_i`` the midpoints between checkpoint steps. ``gamma``
  can be given directly or through the relative width ``sigma_rel``.
* explicit weights, normalised to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import OptionError, SelectionError

__all__ = ["Weights", "uniform", "ema", "ema_per_step", "power_ema", "explicit", "sigma_rel_to_gamma", "METHODS"]

METHODS = ("uniform", "ema", "power-ema")


@dataclass
class Weights:
    """Normalised weights, plus the exact form the engine uses.

    The engine accumulates ``sum_i coeffs[i] * theta_i`` and divides by ``divisor`` once
    at the end. For a uniform average the coefficients are all 1 and the divisor is n,
    which keeps sums of 16-bit inputs exact in float32 and the result correctly rounded.
    """

    values: list[float]
    description: str
    coeffs: list[float]
    divisor: float = 1.0


def uniform(n: int) -> Weights:
    """Equal weights (SWA)."""
    if n < 1:
        raise SelectionError("no checkpoint to average")
    return Weights([1.0 / n] * n, "uniform", [1.0] * n, float(n))


def ema(n: int, decay: float) -> Weights:
    """EMA over checkpoints in order, from the first, with decay ``decay`` per checkpoint."""
    if not (0.0 < decay < 1.0):
        raise OptionError(f"--decay must be strictly between 0 and 1, got {decay}")
    w = [decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - i) for i in range(2, n + 1)]
    return _normalised(w, f"ema (decay {decay:g} per checkpoint)")


def ema_per_step(steps: Sequence[int], decay_per_step: float) -> Weights:
    """EMA with a per-step decay, using the gaps between the checkpoints' steps."""
    if not (0.0 < decay_per_step < 1.0):
        raise OptionError(f"--decay-per-step must be strictly between 0 and 1, got {decay_per_step}")
    n = len(steps)
    for a, b in zip(steps, steps[1:]):
        if b <= a:
            raise SelectionError(
                f"--decay-per-step needs strictly increasing steps; got {a} then {b} (checkpoints in order)"
            )
    logd = math.log(decay_per_step)
    # log of D_i = d^(t_i - t_{i-1}) for i >= 2 (index 0 unused)
    log_D = [0.0] + [(steps[i] - steps[i - 1]) * logd for i in range(1, n)]
    suffix = [0.0] * (n + 1)  # suffix[i] = sum_{j>i} log D_j  (0-based: j in i+1..n-1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + (log_D[i + 1] if i + 1 < n else 0.0)
    w = [math.exp(suffix[0])]
    for i in range(1, n):
        w.append(-math.expm1(log_D[i]) * math.exp(suffix[i]))
    return _normalised(w, f"ema (decay {decay_per_step:g} per step)")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-EMA exponent gamma whose profile has relative width ``sigma_rel``.

    Solves ``sigma_rel^2 = (g+1) / ((g+2)^2 (g+3))`` for g > -1 by bisection.
    """
    if not (0.0 < sigma_rel < 0.2886):  # g -> -1 gives sigma_rel -> 1/sqrt(12)
        raise OptionError(f"--sigma-rel must be in (0, 0.288), got {sigma_rel}")

    def f(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel

    lo, hi = -1.0 + 1e-12, 1e7
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_ema(steps: Sequence[int], gamma: float | None = None, sigma_rel: float | None = None) -> Weights:
    """Post-hoc power-function EMA (EDM2) from checkpoints at ``steps``."""
    if (gamma is None) == (sigma_rel is None):
        raise OptionError("power-ema needs exactly one of --gamma or --sigma-rel")
    if gamma is None:
        assert sigma_rel is not None
        gamma = sigma_rel_to_gamma(sigma_rel)
    if gamma <= -1:
        raise OptionError(f"--gamma must be greater than -1, got {gamma}")
    n = len(steps)
    for a, b in zip(steps, steps[1:]):
        if b <= a:
            raise SelectionError(f"power-ema needs strictly increasing steps; got {a} then {b}")
    T = float(steps[-1])
    if T <= 0:
        raise SelectionError("power-ema needs positive steps")
    b = [0.0] + [0.5 * (steps[i] + steps[i + 1]) for i in range(n - 1)] + [T]
    e = gamma + 1.0
    w = [(b[i + 1] / T) ** e - (b[i] / T) ** e for i in range(n)]
    label = f"power-ema (gamma {gamma:.4g}" + (f", sigma_rel {sigma_rel:g})" if sigma_rel is not None else ")")
    return _normalised(w, label)


def explicit(weights: Sequence[float], n: int) -> Weights:
    """User-given weights, normalised to sum 1."""
    ws = [float(x) for x in weights]
    if len(ws) != n:
        raise OptionError(f"--weights has {len(ws)} values but {n} checkpoints are selected")
    if any(not math.isfinite(x) for x in ws):
        raise OptionError("--weights must be finite numbers")
    return _normalised(ws, "explicit weights")


def _normalised(w: list[float], description: str) -> Weights:
    try:
        s = math.fsum(w)
    except OverflowError:  # finite weights whose sum is beyond float range (1e308, 1e308)
        s = math.inf
    if s == 0 or not math.isfinite(s):
        raise OptionError(f"{description}: the weights sum to {s:g}; they must have a non-zero finite sum")
    vals = [x / s for x in w]
    return Weights(vals, description, list(vals), 1.0)

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
* explicit weights, applied exactly as given (unnormalised or negative: task arithmetic), or
  divided by their sum with ``normalize``; a warning when they do not sum to 1.
* ``schedule`` (warmup-stable-merge, the coefficients of Megatron-LM's ``weighted_merge.py``
  range mode): a decay ``f`` on ``[0, 1)`` (``linear``: ``1 - x``; ``minus-sqrt``: ``1 - sqrt(x)``)
  sampled at ``d_i = f(i/n)`` for the ``n`` checkpoints ``i = 0..n-1``, then ``w_{n-1} = d_{n-1}``,
  ``w_i = d_i - d_{i+1}`` for ``0 < i < n-1`` and ``w_0 = 1 - sum_{i>0} w_i``; ``__reverse``
  reverses them. ``linear`` is the uniform average; ``minus-sqrt`` weighs the early checkpoints
  of the window most (``w_0 = sqrt(1/n)``).
* ``posthoc_ema`` (exact post-hoc EMA, EDM2): weights over *power-EMA snapshots* (not plain
  checkpoints) saved during training, reconstructing the power-EMA of another width by a
  least-squares fit of the averaging profiles; see :func:`posthoc_ema`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .errors import CkptavgWarning, OptionError, SelectionError

__all__ = [
    "Weights",
    "uniform",
    "ema",
    "ema_per_step",
    "power_ema",
    "posthoc_ema",
    "power_profile_inner",
    "explicit",
    "schedule",
    "SCHEDULES",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "POSTHOC_WARN_ERROR",
    "POSTHOC_MAX_ERROR",
    "POSTHOC_WARN_AMPLIFICATION",
    "POSTHOC_MAX_AMPLIFICATION",
    "MAX_GAMMA",
]

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
    #: post-hoc EMA only: ``||p_target - sum_i w_i p_i|| / ||p_target||``, the relative L2 error of the
    #: reconstructed averaging profile (None for the other methods).
    fit_error: float | None = None

    @property
    def amplification(self) -> float:
        """``sum_i |w_i|``: how much the rounding errors of the inputs (bf16: up to 0.2 % of each value) can be
        multiplied in the result. 1 for weights that are all >= 0; larger when some are negative (post-hoc
        EMA from similar profiles, explicit weights).

        Example::

            >>> Weights([1.5, -0.5], "explicit", [1.5, -0.5]).amplification
            2.0
        """
        return math.fsum(abs(v) for v in self.values)


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


#: Largest power-EMA exponent a snapshot may record (sigma_rel about 1e-3 of the run); beyond it the profile's
#: powers leave the float range.
MAX_GAMMA = 1e6


def sigma_rel_to_gamma(sigma_rel: float, what: str = "--sigma-rel") -> float:
    """The power-EMA exponent gamma whose profile has relative width ``sigma_rel``.

    Solves ``sigma_rel^2 = (g+1) / ((g+2)^2 (g+3))`` for g > -1 by bisection. ``what`` names the
    value in the error message when it is out of range (the option, or a snapshot's file).

    Example::

        >>> round(sigma_rel_to_gamma(0.10), 2)
        6.94
    """
    if not (0.0 < sigma_rel < 0.2886):  # g -> -1 gives sigma_rel -> 1/sqrt(12); NaN fails too
        raise OptionError(f"{what} must be in (0, 0.288), got {sigma_rel}")

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
    bounds = [0.0] + [0.5 * (steps[i] + steps[i + 1]) for i in range(n - 1)] + [T]
    e = gamma + 1.0
    w = [(bounds[i + 1] / T) ** e - (bounds[i] / T) ** e for i in range(n)]
    label = f"power-ema (gamma {gamma:.4g}" + (f", sigma_rel {sigma_rel:g})" if sigma_rel is not None else ")")
    return _normalised(w, label)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-EMA profile with exponent ``gamma``.

    The profile ``(g+1) tau^g / t^(g+1)`` on ``[0, t]`` has standard deviation
    ``t * sqrt((g+1) / ((g+2)^2 (g+3)))``; sigma_rel is that over ``t``.

    Example::

        >>> round(gamma_to_sigma_rel(6.94), 3)
        0.1
    """
    if not (math.isfinite(gamma) and -1 < gamma <= MAX_GAMMA):
        raise OptionError(f"--gamma must be a finite number greater than -1 (at most {MAX_GAMMA:g}), got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_profile_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """The L2 inner product of two power-EMA averaging profiles.

    The power EMA with exponent ``g`` at step ``t`` averages the training trajectory with the
    density ``p_{t,g}(tau) = (g+1) tau^g / t^(g+1)`` on ``[0, t]`` (it integrates to 1). For two
    profiles, with ``m = min(t_a, t_b)``::

        <p_a, p_b> = (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))

    evaluated in log space (the powers overflow a float for long runs). Needs ``t > 0`` and
    ``g_a + g_b > -1`` (otherwise the integral diverges).

    Example::

        >>> power_profile_inner(100, 0.0, 100, 0.0)  # uniform density 1/100 on [0, 100]
        0.01
    """
    if not (t_a > 0 and t_b > 0):
        raise OptionError(f"power-EMA profiles need positive steps, got {t_a} and {t_b}")
    if not (g_a > -1 and g_b > -1 and g_a + g_b > -1):
        raise OptionError(f"the power-EMA profiles with gamma {g_a} and {g_b} have no finite inner product")
    m = min(t_a, t_b)
    e = g_a + g_b + 1.0
    log_v = (
        math.log(g_a + 1.0)
        + math.log(g_b + 1.0)
        - math.log(e)
        + e * math.log(m)
        - (g_a + 1.0) * math.log(t_a)
        - (g_b + 1.0) * math.log(t_b)
    )
    return math.exp(log_v)


#: :func:`posthoc_ema` warns (``CkptavgWarning``) when the reconstructed profile's relative L2 error exceeds this.
POSTHOC_WARN_ERROR = 0.05
#: :func:`posthoc_ema` refuses (``OptionError``) when the best fit's relative error exceeds this: the
#: snapshots cannot represent the target (no weights at all would give 1.0).
POSTHOC_MAX_ERROR = 0.5
#: :func:`posthoc_ema` warns when the amplification ``sum_i |w_i|`` exceeds this: rounding errors of the
#: snapshots (bf16: up to 2**-9 of each value) reach the result multiplied by up to this factor.
POSTHOC_WARN_AMPLIFICATION = 10.0
#: :func:`posthoc_ema` refuses beyond this amplification unless ``allow_ill_conditioned=True``
#: (``--allow-ill-conditioned``), which proceeds with the same weights and a warning.
POSTHOC_MAX_AMPLIFICATION = 100.0


# Over 100 lines only through its docstring (the method, its formulas and an example); the body is ~70.
def posthoc_ema(
    snapshots: Sequence[tuple[int, float]],
    *,
    gamma: float | None = None,
    sigma_rel: float | None = None,
    at: int | None = None,
    allow_ill_conditioned: bool = False,
) -> Weights:
    """Exact post-hoc EMA (Karras et al. 2024, EDM2): weights over power-EMA snapshots.

    Each snapshot ``(t_i, gamma_i)`` is a power EMA with exponent ``gamma_i`` saved after step
    ``t_i`` (e.g. by :class:`ckptavg.power_ema.PowerEMA`); its averaging profile is
    ``p_i(tau) = (gamma_i+1) tau^gamma_i / t_i^(gamma_i+1)`` on ``[0, t_i]``. The target is the
    power EMA with exponent ``gamma`` (or relative width ``sigma_rel``) at step ``t_out = at``
    (default: the last snapshot's step). Only snapshots with ``t_i <= t_out`` take part; the others
    get weight 0. With ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>`` (closed form, see
    :func:`power_profile_inner`), the weights are the float64 least-squares solution of
    ``A x = b`` (on the unit-normalised profiles, SVD with a relative cutoff of 1e-13), normalised
    to sum 1. The result is ``sum_i x_i theta_i``.

    ``fit_error`` on the result is the relative L2 error of the reconstructed profile,
    ``||p_target - sum x_i p_i|| / ||p_target||``, computed in closed form from ``A``, ``b`` and
    ``<p_target, p_target>``. It bounds how far the reconstruction can be from the true EMA for a
    trajectory that varies slowly relative to the profiles. A ``CkptavgWarning`` is issued when it
    exceeds :data:`POSTHOC_WARN_ERROR` (5 %) and when the snapshots hold one profile (one gamma)
    different from the target's; an ``OptionError`` when it exceeds :data:`POSTHOC_MAX_ERROR` (50 %),
    with fewer than 2 snapshots, or when ``at`` is not a snapshot's step.

    Nearly identical snapshot profiles make ``A`` ill-conditioned: the least-squares weights then
    alternate in sign with large magnitudes, and the rounding errors of the snapshots (bf16, fp16)
    reach the result multiplied by the amplification ``sum_i |x_i|`` (:attr:`Weights.amplification`),
    which the profile fit error does not show. The weights are never changed (well-conditioned fits are
    the exact least-squares solution); above :data:`POSTHOC_WARN_AMPLIFICATION` (10) a
    ``CkptavgWarning`` is issued, above :data:`POSTHOC_MAX_AMPLIFICATION` (100) an ``OptionError``
    unless ``allow_ill_conditioned`` (then a warning).

    Example::

        snaps = [(s, g) for s in range(1000, 33000, 1000) for g in (16.97, 6.94)]
        w = posthoc_ema(snaps, sigma_rel=0.07)          # at the last step, 32000
        w.values, w.fit_error                           # 64 weights summing to 1, ~0.1 %
        w.amplification                                 # sum of |weights|: 1.51
    """
    if (gamma is None) == (sigma_rel is None):
        raise OptionError("post-hoc EMA needs exactly one of --gamma or --sigma-rel")
    if gamma is None:
        assert sigma_rel is not None
        gamma = sigma_rel_to_gamma(sigma_rel)
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma > -0.5):
        raise OptionError(f"post-hoc EMA needs --gamma greater than -0.5 (a square-integrable profile), got {gamma}")
    if sigma_rel is None:
        sigma_rel = gamma_to_sigma_rel(gamma)
    snaps: list[tuple[int, float]] = []
    for k, item in enumerate(snapshots):
        try:
            t, g = int(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            raise OptionError(f"post-hoc EMA snapshot {k} must be (step, gamma), got {item!r}") from None
        if t < 1:
            raise OptionError(f"post-hoc EMA snapshot {k} has step {t}; steps start at 1")
        if not (math.isfinite(g) and g > -0.5):
            raise OptionError(f"post-hoc EMA snapshot {k} (step {t}) has gamma {g}; it must be finite and > -0.5")
        snaps.append((t, g))
    n = len(snaps)
    if n < 2:
        raise OptionError(f"post-hoc EMA needs at least 2 power-EMA snapshots, got {n}")
    steps = sorted({t for t, _ in snaps})
    if at is None:
        t_out = steps[-1]
    else:
        t_out = int(at)
        if t_out not in steps:
            shown = ", ".join(str(t) for t in steps[:20]) + (", ..." if len(steps) > 20 else "")
            raise OptionError(f"--at {at} is not a snapshot step; available steps: {shown}")
    use = [i for i, (t, _) in enumerate(snaps) if t <= t_out]
    if len(use) < 2:
        raise OptionError(f"post-hoc EMA at step {t_out} needs at least 2 snapshots at or before it, got {len(use)}")
    x, err = _posthoc_solve([snaps[i] for i in use], t_out, gamma)
    profiles = sorted({g for _, g in (snaps[i] for i in use)})
    label = (
        f"post-hoc EMA (EDM2) sigma_rel {sigma_rel:.4g} (gamma {gamma:.4g}) at step {t_out}, "
        f"from {len(use)} snapshots of {len(profiles)} profile{'s' if len(profiles) != 1 else ''}"
    )
    if err > POSTHOC_MAX_ERROR:
        raise OptionError(
            f"{label}: the snapshots cannot represent the target (relative profile error of the fit {err:.0%}); "
            "save snapshots of widths on both sides of the target, and at least a few per profile"
        )
    if len(profiles) == 1 and not math.isclose(profiles[0], gamma, rel_tol=1e-9, abs_tol=1e-12):
        warnings.warn(
            f"{label}: only one profile (gamma {profiles[0]:.4g}) among the snapshots; other widths are "
            f"extrapolated (estimated relative error {err:.1%}). Save snapshots of two widths.",
            CkptavgWarning,
            stacklevel=2,
        )
    elif err > POSTHOC_WARN_ERROR:
        warnings.warn(
            f"{label}: poor fit, estimated relative reconstruction error {err:.1%} (above "
            f"{POSTHOC_WARN_ERROR:.0%}); the target width is outside the saved widths or the snapshots are too sparse",
            CkptavgWarning,
            stacklevel=2,
        )
    _check_amplification(label, x, allow_ill_conditioned)
    values = [0.0] * n
    for i, xi in zip(use, x):
        values[i] = xi
    return Weights(values, f"{label}, fit error {err:.2%}", list(values), 1.0, fit_error=err)


def _check_amplification(label: str, x: list[float], allow: bool) -> None:
    """Warn or refuse when the weights amplify the snapshots' rounding errors (see :func:`posthoc_ema`)."""
    amp = math.fsum(abs(v) for v in x)
    if amp <= POSTHOC_WARN_AMPLIFICATION:
        return
    what = (f"{label}: the weights amplify the snapshots' rounding errors {amp:.3g} times (sum of |weights|, "
            f"weights from {min(x):.4g} to {max(x):.4g}): the snapshot profiles are nearly identical or the "
            "target is far outside them")
    if amp > POSTHOC_MAX_AMPLIFICATION and not allow:
        raise OptionError(f"{what}; refused above {POSTHOC_MAX_AMPLIFICATION:g} (bf16 snapshots could be off by "
                          f"{amp * 2.0 ** -9:.0%} of each value): save snapshots of clearly different widths "
                          "(e.g. sigma_rel 0.05 and 0.10), or pass --allow-ill-conditioned")
    warnings.warn(f"{what}; bf16 snapshots could be off by up to {amp * 2.0 ** -9:.1%} of each value",
                  CkptavgWarning, stacklevel=3)


def _inner_matrix(t_a, g_a, t_b, g_b):  # noqa: ANN001  (float64 tensors, broadcast)
    """:func:`power_profile_inner` on broadcast float64 tensors (same formula, log space)."""
    import torch

    e = g_a + g_b + 1.0
    m = torch.minimum(t_a, t_b)
    return torch.exp(
        torch.log1p(g_a)
        + torch.log1p(g_b)
        - torch.log(e)
        + e * torch.log(m)
        - (g_a + 1.0) * torch.log(t_a)
        - (g_b + 1.0) * torch.log(t_b)
    )


def _posthoc_solve(snaps: list[tuple[int, float]], t_out: int, gamma: float) -> tuple[list[float], float]:
    """Least-squares profile fit; returns weights normalised to sum 1 and the relative profile error."""
    import torch

    t = torch.tensor([float(ti) for ti, _ in snaps], dtype=torch.float64)
    g = torch.tensor([gi for _, gi in snaps], dtype=torch.float64)
    A = _inner_matrix(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _inner_matrix(
        t[:, None],
        g[:, None],
        torch.tensor([[float(t_out)]], dtype=torch.float64),
        torch.tensor([[gamma]], dtype=torch.float64),
    )
    c = power_profile_inner(t_out, gamma, t_out, gamma)
    # Work with unit-norm profiles: q_i = p_i / ||p_i||, target q = p_target / ||p_target||.
    d = A.diagonal().sqrt()
    As = A / d[:, None] / d[None, :]
    bs = b / d[:, None] / math.sqrt(c)
    if not (bool(torch.isfinite(As).all()) and bool(torch.isfinite(bs).all())):
        raise OptionError("post-hoc EMA: the profile inner products overflow; the steps or gammas are out of range")
    y = torch.linalg.lstsq(As, bs, rcond=1e-13, driver="gelsd").solution
    x = y[:, 0] / d * math.sqrt(c)  # weights on the original (unit-mass) profiles
    total = float(x.sum())
    if not math.isfinite(total) or abs(total) < 1e-6:
        raise OptionError(
            "post-hoc EMA: the least-squares weights sum to about 0; the snapshots cannot represent the target"
        )
    x = x / total
    ys = (x * d / math.sqrt(c))[:, None]  # normalised weights on the unit-norm profiles
    r2 = 1.0 - 2.0 * float((ys * bs).sum()) + float((ys.T @ As @ ys).item())
    err = math.sqrt(max(r2, 0.0))
    return [float(v) for v in x], err


def explicit(weights: Sequence[float], n: int, normalize: bool = False) -> Weights:
    """User-given weights, applied exactly as given (``normalize``: divided by their sum).

    Weights that do not sum to 1 scale the result (``1,1`` is the sum of two models, ``1,-1``
    their difference: task arithmetic); that is allowed, with a :class:`CkptavgWarning`.

    Example::

        >>> explicit([2, 1, 1], 3, normalize=True).values
        [0.5, 0.25, 0.25]
    """
    ws = [float(x) for x in weights]
    if len(ws) != n:
        raise OptionError(f"--weights has {len(ws)} values but {n} checkpoints are selected")
    if any(not math.isfinite(x) for x in ws):
        raise OptionError("--weights must be finite numbers")
    if normalize:
        return _normalised(ws, "explicit weights (normalised)")
    try:
        total = math.fsum(ws)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise OptionError(f"--weights: the weights sum to {total:g}; they must have a finite sum")
    if not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        warnings.warn(f"--weights sum to {total:.12g}, not 1: the result is scaled by that sum, as given "
                      "(--normalize divides the weights by their sum)", CkptavgWarning, stacklevel=2)
    return Weights(ws, "explicit weights", list(ws), 1.0)


def _minus_sqrt_decay(x: float) -> float:
    return 1.0 - math.sqrt(x)


#: the decay of each schedule; ``linear`` (``1 - x``) gives ``1/n`` each: the uniform average, computed as one
#: (a sum, then one division), exactly
_DECAYS: dict[str, Callable[[float], float] | None] = {"linear": None, "minus-sqrt": _minus_sqrt_decay}
#: the ``--schedule`` names: Megatron-LM ``weighted_merge.py``'s ``--merge-style`` values (without its random
#: ``__scramble``)
SCHEDULES = (*_DECAYS, *(f"{k}__reverse" for k in _DECAYS))


def schedule(name: str, n: int) -> Weights:
    """Warmup-stable-merge weights over ``n`` checkpoints in training order (see the module text).

    Example::

        >>> [round(w, 4) for w in schedule("minus-sqrt", 4).values]
        [0.5, 0.2071, 0.1589, 0.134]
    """
    base, _, modifier = name.partition("__")
    if base not in _DECAYS or modifier not in ("", "reverse"):
        raise OptionError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if n < 1:
        raise SelectionError("--schedule: no checkpoint selected")
    f = _DECAYS[base]
    if f is None:
        return replace(uniform(n), description=f"schedule {name}")
    d = [f(i / n) for i in range(n)]
    w = [1.0] * n
    if n > 1:
        w[-1] = d[-1]
        for i in range(1, n - 1):
            w[i] = d[i] - d[i + 1]
        w[0] = 1.0 - math.fsum(w[1:])
    if modifier == "reverse":
        w.reverse()
    return Weights(w, f"schedule {name}", list(w), 1.0)


def _normalised(w: list[float], description: str) -> Weights:
    try:
        s = math.fsum(w)
    except OverflowError:  # finite weights whose sum is beyond float range (1e308, 1e308)
        s = math.inf
    if s == 0 or not math.isfinite(s):
        raise OptionError(f"{description}: the weights sum to {s:g}; they must have a non-zero finite sum")
    vals = [x / s for x in w]
    return Weights(vals, description, list(vals), 1.0)

"""Method dispatch: the merge options and the selected checkpoints -> one weight vector
(:mod:`ckptavg.weights` holds the methods themselves)."""

from __future__ import annotations

from .errors import OptionError
from .io import Checkpoint
from .options import METHODS, MergeOptions
from .weights import (
    Weights,
    ema,
    ema_per_step,
    explicit,
    posthoc_ema,
    power_ema,
    schedule,
    sigma_rel_to_gamma,
    uniform,
)

__all__ = ["weights_for", "spread", "snapshot_sigma", "profile_gamma"]


def profile_gamma(c: Checkpoint) -> float:
    """The power-EMA exponent a snapshot records (its ``gamma``, or from its ``sigma_rel``).

    Example::

        profile_gamma(open_checkpoint("ema-0.050-00004000.safetensors"))  # 16.97...
    """
    if c.meta.gamma is not None:
        return c.meta.gamma
    if c.meta.sigma_rel is None:
        raise OptionError(f"{c.path}: records no power-EMA profile (sigma_rel or gamma)")
    return sigma_rel_to_gamma(c.meta.sigma_rel, f"{c.path}: the snapshot's sigma_rel")


def snapshot_sigma(c: Checkpoint) -> float | None:
    if c.meta.sigma_rel is not None:
        return c.meta.sigma_rel
    if c.meta.gamma is not None:
        from .weights import gamma_to_sigma_rel

        return gamma_to_sigma_rel(c.meta.gamma)
    return None


def weights_for(opts: MergeOptions, chosen: list[Checkpoint], time_notes: list[str] | None = None) -> Weights:
    """The weight vector of ``opts``'s method over the selected checkpoints (in order); notes about
    the time axis used (steps, or epochs when no step is recorded) are appended to ``time_notes``."""
    n = len(chosen)
    if time_notes is None:
        time_notes = []
    method = opts.method.lower().replace("_", "-")
    if method not in METHODS:
        raise OptionError(f"--method must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if opts.normalize and opts.weights is None:
        raise OptionError("--normalize applies to --weights (every method's weights already sum to 1)")
    if opts.schedule is not None:
        if method != "uniform" or opts.weights is not None or opts.decay is not None or opts.decay_per_step is not None:
            raise OptionError("--schedule is a weighting of its own: it cannot be combined with --weights, "
                              "--method ema/power-ema or a decay")
        return schedule(opts.schedule, n)
    if opts.weights is not None:
        if method != "uniform" or opts.decay is not None or opts.decay_per_step is not None:
            raise OptionError("--weights cannot be combined with --method ema/power-ema or a decay")
        ws = opts.weights
        if isinstance(ws, str):
            try:
                ws = [float(x) for x in ws.replace(" ", "").split(",") if x != ""]
            except ValueError:
                raise OptionError(f"--weights must be comma-separated numbers, got {opts.weights!r}") from None
        return explicit(list(ws), n, opts.normalize)

    def steps() -> list[int]:
        missing = [c for c in chosen if c.meta.step is None]
        if missing and method == "power-ema" and all(c.meta.epoch is not None for c in chosen):
            # no step recorded: the epochs are the time axis (the profile is in relative time t/T)
            time_notes.append("power-ema: no step recorded, so the epochs are the time axis")
            return [c.meta.epoch for c in chosen]  # type: ignore[misc]
        if missing:
            raise OptionError(
                f"{missing[0].path}: records no step (and its file name has none); "
                f"{'--decay-per-step needs' if method == 'ema' else 'power-ema needs the epoch or'} "
                "the step of every checkpoint"
            )
        return [int(c.meta.step) for c in chosen]  # type: ignore[arg-type]

    if opts.at is not None and method != "power-ema":
        raise OptionError("--at applies to --method power-ema (post-hoc EMA from snapshots)")
    if method == "uniform":
        if opts.decay is not None or opts.decay_per_step is not None:
            raise OptionError("--decay/--decay-per-step need --method ema")
        return uniform(n)
    if method == "ema":
        if (opts.decay is None) == (opts.decay_per_step is None):
            raise OptionError("--method ema needs exactly one of --decay D (per checkpoint) or --decay-per-step d")
        if opts.decay is not None:
            return ema(n, float(opts.decay))
        return ema_per_step(steps(), float(opts.decay_per_step))  # type: ignore[arg-type]
    if opts.decay is not None or opts.decay_per_step is not None:
        raise OptionError("--decay/--decay-per-step belong to --method ema")
    snaps = [c for c in chosen if c.meta.sigma_rel is not None or c.meta.gamma is not None]
    if snaps:
        if len(snaps) != len(chosen):
            plain = next(c for c in chosen if c not in snaps)
            raise OptionError(
                f"{plain.path}: a plain checkpoint among power-EMA snapshots ({snaps[0].path} records its profile); "
                "select only snapshots (e.g. their folder) or only plain checkpoints"
            )
        # exact post-hoc EMA (EDM2) from snapshots of power-function EMAs
        profiles = [(s, profile_gamma(c)) for s, c in zip(steps(), chosen)]
        return posthoc_ema(profiles, gamma=opts.gamma, sigma_rel=opts.sigma_rel, at=opts.at,
                           allow_ill_conditioned=opts.allow_ill_conditioned)
    if opts.at is not None:
        raise OptionError("--at picks the step of a post-hoc EMA from power-EMA snapshots; these checkpoints record "
                          "no power-EMA profile (sigma_rel or gamma)")
    return power_ema(steps(), gamma=opts.gamma, sigma_rel=opts.sigma_rel)


def spread(w: Weights, picked: list[Checkpoint], chosen: list[Checkpoint]) -> Weights:
    """``w`` over ``picked``, as a weight vector over ``chosen`` (zero where not picked)."""
    at = {id(c): k for k, c in enumerate(picked)}
    values = [w.values[at[id(c)]] if id(c) in at else 0.0 for c in chosen]
    coeffs = [w.coeffs[at[id(c)]] if id(c) in at else 0.0 for c in chosen]
    return Weights(values, w.description, coeffs, w.divisor, w.fit_error)



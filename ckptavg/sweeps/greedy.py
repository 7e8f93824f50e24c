"""``ckptavg soup``: the greedy soup (Wortsman et al. 2022), with the uniform soup beside it."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ..evaluate import Evaluator, is_better
from .common import (
    DEFAULT_MAX_MEMORY,
    NUMERICS,
    READ,
    SOUP_OPTIONS,
    PathLike,
    Source,
    check_memory,
    check_output,
    fixed_options,
    fmt_score,
    plan_sources,
    progress_bar,
    write_output,
)
from .plots import plot_soup
from .reports import SoupReport, SoupStep

__all__ = ["soup"]


def soup(
    inputs: PathLike | Sequence[PathLike],
    spec: PathLike,
    output: PathLike | None = None,
    *,
    device: str | None = None,
    bn_mode: str = "precise",
    max_memory: int | str | None = DEFAULT_MAX_MEMORY,
    plot: PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> SoupReport:
    """Greedy soup (Wortsman et al. 2022) over the selected checkpoints, scored with ``spec``'s ``[eval]``.

    The ingredients (``inputs`` after the merge selection options, e.g. ``last``, ``epochs``)
    are scored as saved and tried in order of their own score, best first (ties: the earlier
    checkpoint in training order first). The soup starts as the best ingredient; each next one is
    added if the uniform average of the soup with it (BatchNorm-recalibrated when the model has
    BatchNorm) scores at least as well as the soup without it. The uniform soup of all
    ingredients is scored too, for comparison. When ``output`` is given the greedy soup is written
    there with its provenance and the steps (safetensors metadata ``ckptavg_soup``; for torch
    files a JSON sidecar ``OUTPUT.ckptavg.json``). ``plot`` writes a PNG of the soup's score as
    ingredients are tried.

    ``options``: ``order``, ``epochs``, ``steps``, ``last``, ``every``, ``best``, ``metric``,
    ``lower_is_better``, ``key``, ``strip_prefix``, ``trust_pickle``, ``allow_nonfinite``,
    ``accumulate``, ``buffers``, ``dtype`` (as in :func:`ckptavg.merge`).

    Example::

        report = ckptavg.soup(["ft1/", "ft2/", "ft3/"], "eval.toml", "soup/")
        report = ckptavg.soup("runs/", "bn.toml", "soup.pt", epochs="10:")
        print(report.format()); print(report.members, report.score, report.uniform_score)
    """
    t0 = time.perf_counter()
    fixed = fixed_options(options, SOUP_OPTIONS, "soup")
    base, one_copy, _ = plan_sources(inputs, fixed)
    check_memory(one_copy, max_memory)
    out, kind = check_output(output, [s.path for s in base])
    ev = Evaluator(spec, device=device, bn_mode=bn_mode)
    single_opts = {k: v for k, v in fixed.items() if k in READ}
    avg_opts = {k: v for k, v in fixed.items() if k in READ or k in NUMERICS}
    n = len(base)
    bar = progress_bar(n + max(n - 1, 0) + (1 if n > 2 else 0), progress, "soup")
    try:
        own, seconds = _score_ingredients(base, ev, single_opts, bar)
        members, score, soup_sd, steps = _greedy(base, ev, own, seconds, single_opts, avg_opts, bar)
        if len(members) == n:
            uniform_score = score
        else:
            uniform_score = _score_average([s.path for s in base], ev, avg_opts)[0]
            bar.update(1)
    finally:
        bar.close()
    report = SoupReport(steps=steps, members=[base[j].path for j in members], score=score,
                        uniform_score=uniform_score, ingredients=n, metric=ev.metric_name,
                        higher_is_better=ev.higher_is_better, output=out)
    if out is not None:
        assert kind is not None
        write_output(out, kind, soup_sd, report.members, {"order": "given", **avg_opts},
                     (bn_mode, ev.spec.path) if len(members) > 1 and ev.has_bn else None, "ckptavg_soup",
                     report.to_dict())
    if plot is not None:
        report.plot = plot_soup(report, plot)
    report.seconds = time.perf_counter() - t0
    return report


def _score_ingredients(base: list[Source], ev: Evaluator, single_opts: dict[str, Any],
                       bar: Any) -> tuple[list[float], list[float]]:
    """Every ingredient's own score, as saved, and the seconds each took."""
    from ..api import average

    own: list[float] = []
    seconds: list[float] = []
    for s in base:
        t = time.perf_counter()
        own.append(ev.score(average([s.path], order="given", **single_opts), recalibrate=False)[0])
        seconds.append(time.perf_counter() - t)
        bar.update(1)
    return own, seconds


def _score_average(paths: list[str], ev: Evaluator, avg_opts: dict[str, Any]) -> tuple[float, Any]:
    """The uniform average of ``paths`` (in training order), recalibrated and scored."""
    from ..api import average

    return ev.score(average(paths, order="given", **avg_opts), recalibrate=True)


def _greedy(base: list[Source], ev: Evaluator, own: list[float], seconds: list[float], single_opts: dict[str, Any],
            avg_opts: dict[str, Any], bar: Any) -> tuple[list[int], float, Any, list[SoupStep]]:
    """The greedy soup: ingredients tried best first (NaN last; ties: the earlier checkpoint
    first), each kept when the soup with it scores at least as well."""
    from ..api import average

    higher = ev.higher_is_better
    ranked = sorted(range(len(base)), key=lambda k: (math.isnan(own[k]), -own[k] if higher else own[k], k))
    first = ranked[0]
    members = [first]
    score = own[first]
    soup_sd = average([base[first].path], order="given", **single_opts)
    steps = [SoupStep(1, base[first].path, base[first].epoch, own[first], own[first], True, 1, seconds[first])]
    for k in ranked[1:]:
        t = time.perf_counter()
        trial = sorted(members + [k])
        trial_score, sd = _score_average([base[j].path for j in trial], ev, avg_opts)
        added = not math.isnan(trial_score) and not is_better(score, trial_score, higher)
        if added:
            members, score, soup_sd = trial, trial_score, sd
        steps.append(SoupStep(len(steps) + 1, base[k].path, base[k].epoch, own[k], trial_score, added,
                              len(members), time.perf_counter() - t))
        bar.update(1)
        bar.set_postfix_str(f"soup {len(members)} {fmt_score(score)}")
    return members, score, soup_sd, steps

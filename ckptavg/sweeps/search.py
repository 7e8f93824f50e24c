"""``ckptavg sweep``: which average is best? Candidate averages (windows x methods) scored against the baselines."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from ..errors import SelectionError
from ..evaluate import Evaluator, is_better
from .candidates import Candidate, sweep_candidates
from .common import (
    DEFAULT_MAX_MEMORY,
    READ,
    SWEEP_OPTIONS,
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
from .plots import plot_sweep
from .reports import SweepReport, SweepRow

__all__ = ["sweep"]


def sweep(
    inputs: PathLike | Sequence[PathLike],
    spec: PathLike,
    output: PathLike | None = None,
    *,
    last: str | Sequence[int] | None = None,
    epochs: str | Sequence[str] | None = None,
    steps: str | Sequence[str] | None = None,
    method: str | Sequence[str] | None = None,
    decay: str | Sequence[float] | None = None,
    sigma_rel: str | Sequence[float] | None = None,
    device: str | None = None,
    bn_mode: str = "precise",
    max_memory: int | str | None = DEFAULT_MAX_MEMORY,
    plot: PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> SweepReport:
    """Evaluate candidate averages of ``inputs`` with ``spec``'s ``[eval]`` metric and write the best.

    Candidates are the cartesian product of comma lists (see :func:`sweep_candidates`): windows
    ``last``/``epochs``/``steps`` and methods ``method`` with ``decay`` (ema) and ``sigma_rel``
    (power-ema), plus two baselines, always first: the last checkpoint and the best single
    checkpoint, scored as saved. Averages that select the same checkpoints with the same weights
    are evaluated once; a window that selects nothing is skipped with a note. Each average is
    computed in memory (:func:`ckptavg.average`), BatchNorm-recalibrated with ``[data]`` when the
    model has BatchNorm layers, and scored. The winner is the best score; ties go to the earlier
    row, so an average must beat the baselines strictly; NaN scores never win. When ``output`` is
    given the winner is written there (any output kind of ``merge``) with the plan's provenance
    and the table (safetensors metadata ``ckptavg_sweep``; for torch files a JSON sidecar
    ``OUTPUT.ckptavg.json``). ``plot`` writes a PNG (needs matplotlib).

    ``options`` are the fixed merge options ``order``, ``every``, ``key``, ``strip_prefix``,
    ``trust_pickle``, ``allow_nonfinite``, ``accumulate``, ``buffers``, ``dtype``. ``device``
    overrides the spec's ``[run].device`` (evaluation and recalibration); ``max_memory`` bounds one
    copy of the model (default 8GB).

    Example::

        report = ckptavg.sweep("runs/", "bn.toml", "best.pt", last="2,4,8,16")
        report = ckptavg.sweep("runs/", "bn.toml", method="ema", decay=[0.8, 0.9, 0.95], epochs="10:")
        print(report.format()); print(report.winner.name, report.winner.score)
    """
    t0 = time.perf_counter()
    fixed = fixed_options(options, SWEEP_OPTIONS, "sweep")
    base, one_copy, _ = plan_sources(inputs, fixed)
    check_memory(one_copy, max_memory)
    out, kind = check_output(output, [s.path for s in base])
    candidates = sweep_candidates(len(base), last=last, epochs=epochs, steps=steps, method=method, decay=decay,
                                  sigma_rel=sigma_rel)
    ev = Evaluator(spec, device=device, bn_mode=bn_mode)
    notes: list[str] = []
    planned = _plan_candidates(inputs, fixed, candidates, notes)
    single_opts = {k: v for k, v in fixed.items() if k in READ}
    bar = progress_bar(len(base) + len(planned), progress, "sweep")
    try:
        rows, state, winner = _score_baselines(base, ev, single_opts, bar)
        winner = _score_averages(inputs, fixed, planned, ev, rows, state, winner, bar)
    finally:
        bar.close()
    rows[winner].winner = True
    report = SweepReport(rows=rows, metric=ev.metric_name, higher_is_better=ev.higher_is_better, output=out,
                         notes=notes)
    if out is not None:
        assert kind is not None
        w = rows[winner]
        write_output(out, kind, state[winner], w.checkpoints if w.kind != "average" else inputs, w.options,
                     (bn_mode, ev.spec.path) if w.bn_recalibrated else None, "ckptavg_sweep", report.to_dict())
    if plot is not None:
        report.plot = plot_sweep(report, plot)
    report.seconds = time.perf_counter() - t0
    return report


def _plan_candidates(inputs: Any, fixed: dict[str, Any], candidates: list[Candidate],
                     notes: list[str]) -> list[tuple[Candidate, list[Source]]]:
    """Plan every candidate (headers only): skip empty selections, evaluate duplicates once."""
    from ..api import plan

    planned: list[tuple[Candidate, list[Source]]] = []
    seen: dict[tuple, str] = {}
    for c in candidates:
        try:
            p = plan(inputs, **fixed, **c.options)
        except SelectionError as exc:
            notes.append(f"skipped {c.name}: {exc}")
            continue
        try:
            identity = (tuple(os.fspath(i.path) for i in p.inputs), tuple(round(i.weight, 12) for i in p.inputs))
            sources = [Source(os.fspath(i.path), i.epoch, i.step) for i in p.inputs]
        finally:
            for i in p.inputs:
                i.checkpoint.close()
        if identity in seen:
            notes.append(f"skipped {c.name}: the same average as {seen[identity]}")
            continue
        seen[identity] = c.name
        planned.append((c, sources))
    return planned


def _score_baselines(base: list[Source], ev: Evaluator, single_opts: dict[str, Any],
                     bar: Any) -> tuple[list[SweepRow], dict[int, dict], int]:
    """Score every checkpoint as saved (the best single one needs them all): the two baseline
    rows (last, best), their models, and which of them leads."""
    from ..api import average

    best_k: int | None = None
    best_single: tuple[float, dict] | None = None
    scores: list[float] = []
    seconds: list[float] = []
    last_sd: dict = {}
    for k, s in enumerate(base):
        t = time.perf_counter()
        score, sd = ev.score(average([s.path], order="given", **single_opts), recalibrate=False)
        scores.append(score)
        seconds.append(time.perf_counter() - t)
        if best_single is None or is_better(score, best_single[0], ev.higher_is_better):
            best_k, best_single = k, (score, sd)
        if k == len(base) - 1:
            last_sd = sd
        bar.update(1)
    assert best_k is not None and best_single is not None
    b = base[best_k]
    rows = [
        SweepRow("last checkpoint", "last", [base[-1].path], [base[-1].epoch], [base[-1].step], scores[-1],
                 seconds[-1], options={"order": "given", **single_opts}),
        SweepRow("best checkpoint", "best", [b.path], [b.epoch], [b.step], scores[best_k], seconds[best_k],
                 options={"order": "given", **single_opts}),
    ]
    winner = 0 if not is_better(scores[best_k], scores[-1], ev.higher_is_better) else 1
    return rows, {0: last_sd, 1: best_single[1]}, winner


def _score_averages(inputs: Any, fixed: dict[str, Any], planned: list[tuple[Candidate, list[Source]]],
                    ev: Evaluator, rows: list[SweepRow], state: dict[int, dict], winner: int, bar: Any) -> int:
    """Average, recalibrate and score every planned candidate (a row each); only the best
    average stays in memory. Returns the winning row."""
    from ..api import average

    for c, sources in planned:
        t = time.perf_counter()
        sd = average(inputs, **fixed, **c.options)
        score, sd = ev.score(sd, recalibrate=True)
        rows.append(SweepRow(c.name, "average", [s.path for s in sources], [s.epoch for s in sources],
                             [s.step for s in sources], score, time.perf_counter() - t, method=c.method,
                             param=c.param, value=c.value, window=c.window, bn_recalibrated=ev.has_bn,
                             options={**fixed, **c.options}))
        if is_better(score, rows[winner].score, ev.higher_is_better):
            if winner > 1:
                del state[winner]  # keep only the best average in memory
            winner = len(rows) - 1
            state[winner] = sd
        bar.update(1)
        bar.set_postfix_str(f"best {fmt_score(rows[winner].score)}")
    return winner

"""Evaluation-driven averaging: :func:`sweep` (which average is best?) and :func:`soup` (greedy soup).

Both score models with the ``[eval]`` section of a spec (see :mod:`ckptavg.evaluate`): individual
checkpoints as saved, every average after BatchNorm recalibration with ``[data]`` when the model
has BatchNorm layers. Averages are computed in memory with :func:`ckptavg.average`, so the model
must fit in memory: a sweep holds up to four copies at a time (the candidate, its recalibrated
copy, the best so far, the last checkpoint), and both functions refuse up front when one copy
would exceed ``max_memory`` (default 8GB).

Example::

    import ckptavg
    report = ckptavg.sweep("runs/", "bn.toml", "best.safetensors", last="2,4,8,16", method="uniform,ema",
                           decay="0.8,0.9")
    print(report.format())
    soup = ckptavg.soup("finetunes/", "bn.toml", "soup.safetensors")
    print(soup.format())
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import OptionError, SelectionError
from .evaluate import Evaluator, is_better

if TYPE_CHECKING:
    from .io.kinds import OutputKind

__all__ = ["sweep", "soup", "SweepReport", "SweepRow", "SoupReport", "SoupStep", "PlotData", "plot_sweep",
           "plot_soup", "DEFAULT_MAX_MEMORY", "SWEEP_OPTIONS", "SOUP_OPTIONS"]

PathLike = str | os.PathLike[str]

#: One copy of the model larger than this is refused (``max_memory`` / ``--max-memory``).
DEFAULT_MAX_MEMORY = "8GB"

_READ = ("key", "strip_prefix", "trust_pickle", "allow_nonfinite")
_NUMERICS = ("accumulate", "buffers", "dtype")
#: merge options a sweep takes as fixed values (the same for every candidate)
SWEEP_OPTIONS = ("order", "every", *_READ, *_NUMERICS)
#: merge options a soup takes: the selection of the ingredients, reading, numerics
SOUP_OPTIONS = ("order", "epochs", "steps", "last", "every", "best", "metric", "lower_is_better", *_READ, *_NUMERICS)


# -- helpers ------------------------------------------------------------------------------------


def _fixed(options: dict[str, Any], allowed: Sequence[str], where: str) -> dict[str, Any]:
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TypeError(f"{where}() got an unexpected keyword argument {bad[0]!r}")
    return {k: v for k, v in options.items() if v is not None}


def _as_list(value: Any, option: str, convert: Callable[[str], Any]) -> list[Any]:
    """``"2,4,8"`` or ``[2, 4, 8]`` or ``4`` -> a list of converted values (None -> [])."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if text == "":
            continue
        try:
            out.append(convert(text))
        except (TypeError, ValueError):
            raise OptionError(f"{option}: bad value {text!r} in {value!r}") from None
    if not out:
        raise OptionError(f"{option}: no values in {value!r}")
    return out


def _pos_int(text: Any) -> int:
    n = int(text)
    if n < 1 or isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(text)
    return n


def _fmt_num(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _describe_inputs(epochs: Sequence[Any], steps: Sequence[Any], paths: Sequence[str]) -> str:
    """``epoch 30``, ``epochs 23-30 (8)``, ``steps 100-800 (8)`` or ``3 checkpoints``."""
    n = len(paths)
    for name, values in (("epoch", epochs), ("step", steps)):
        if values and all(v is not None for v in values):
            if n == 1:
                return f"{name} {_fmt_num(values[0])}"
            return f"{name}s {_fmt_num(values[0])}-{_fmt_num(values[-1])} ({n})"
    return Path(paths[0]).name if n == 1 else f"{n} checkpoints"


@dataclass
class _Source:
    """One checkpoint of the selection (training order)."""

    path: str
    epoch: Any
    step: Any


def _plan_sources(inputs: Any, opts: dict[str, Any]) -> tuple[list[_Source], int, Any]:
    """The selected checkpoints (headers only), the bytes of one output copy and the plan's provenance."""
    from .api import plan

    p = plan(inputs, **opts)
    try:
        sources = [_Source(os.fspath(i.path), i.epoch, i.step) for i in p.inputs]
        return sources, p.output_bytes, p
    finally:
        for i in p.inputs:
            i.checkpoint.close()


def _check_memory(nbytes: int, max_memory: int | str | None) -> None:
    from .io.hf_folder_out import parse_size
    from .planner import human_bytes

    limit = parse_size(max_memory if max_memory is not None else DEFAULT_MAX_MEMORY, "--max-memory")
    if nbytes > limit:
        raise OptionError(
            f"one copy of the model is {human_bytes(nbytes)}, over --max-memory {human_bytes(limit)}: sweeps and soups "
            "average in memory and hold up to four copies; raise --max-memory if this machine has the memory, or "
            "use ckptavg merge (streaming) for single averages"
        )


def _check_output(output: PathLike | None, paths: Sequence[str]) -> tuple[Path | None, OutputKind | None]:
    if output is None:
        return None, None
    from .io import kind_of
    from .io.files import check_not_input

    out = Path(output)
    kind = kind_of(output)
    check_not_input(out, [Path(p) for p in paths])
    kind.check_destination(out)
    return out, kind


def _write(out: Path, kind: OutputKind, state_dict: dict[str, torch.Tensor], sources: Any, opts: dict[str, Any],
           bn: tuple[str, Path] | None, name: str, table: dict[str, Any]) -> int:
    """Write the chosen model with the provenance of its plan (``sources`` averaged with ``opts``;
    ``bn``: the recalibration mode and spec, when it was recalibrated) and the table (metadata
    string, or a JSON sidecar ``OUTPUT.ckptavg.json`` for kinds without metadata: torch files,
    whose plain state dict has no place for it)."""
    from .pipeline import write_state

    _, _, p = _plan_sources(sources, opts)
    provenance = p.provenance()
    if bn is not None:
        provenance["ckptavg_bn"] = json.dumps({"mode": bn[0], "spec": os.fspath(bn[1])})
    text = json.dumps(table, separators=(",", ":"), default=str)
    _writer, written = write_state(state_dict, out, {**provenance, name: text})
    if not kind.stores_metadata:  # atomically too: a crash never leaves half a sidecar beside the model
        from .io.files import AtomicFile

        sidecar = AtomicFile(out.with_name(out.name + ".ckptavg.json"))
        try:
            sidecar.write((json.dumps({**provenance, name: table}, indent=2, default=str) + "\n").encode())
        except BaseException:
            sidecar.abort()
            raise
        sidecar.commit()
    return written


def _bar(total: int, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="model", file=sys.stderr, disable=not progress, leave=False)


# -- sweep --------------------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One scored candidate of a sweep (a baseline or an average)."""

    name: str
    kind: str  # "last", "best" (single checkpoints as saved) or "average"
    checkpoints: list[str]
    epochs: list[Any]
    steps: list[Any]
    score: float
    seconds: float
    method: str = "-"
    param: str | None = None  # "decay" or "sigma_rel"
    value: float | None = None
    window: str = ""  # "last 4", "epochs 10:", "all"
    bn_recalibrated: bool = False
    winner: bool = False
    options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        """How many checkpoints the row averages."""
        return len(self.checkpoints)

    @property
    def described(self) -> str:
        return _describe_inputs(self.epochs, self.steps, self.checkpoints)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("options")
        d["score"] = None if math.isnan(self.score) else self.score
        return d


@dataclass
class SweepReport:
    """What :func:`sweep` found: one row per candidate (baselines first), the winner marked.

    Example::

        >>> report = ckptavg.sweep("runs/", "bn.toml", last="2,4,8")    # doctest: +SKIP
        >>> print(report.format()); report.winner.name                   # doctest: +SKIP
    """

    rows: list[SweepRow]
    metric: str
    higher_is_better: bool
    output: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    plot: PlotData | None = None

    @property
    def winner(self) -> SweepRow:
        """The best row (ties: the earlier row; baselines come first)."""
        return next(r for r in self.rows if r.winner)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the rows, the winner's name, the metric and direction, the output."""
        return {"metric": self.metric, "higher_is_better": self.higher_is_better,
                "winner": self.winner.name, "rows": [r.to_dict() for r in self.rows],
                "output": os.fspath(self.output) if self.output else None, "seconds": round(self.seconds, 3),
                "notes": self.notes}

    def format(self) -> str:
        """The table printed by ``ckptavg sweep`` (``*`` marks the winner)."""
        direction = "higher" if self.higher_is_better else "lower"
        name_w = max(9, *(len(r.name) for r in self.rows))
        ck_w = max(11, *(len(r.described) for r in self.rows))
        lines = [f"metric: {self.metric} ({direction} is better); averages BatchNorm-recalibrated: "
                 f"{'yes' if any(r.bn_recalibrated for r in self.rows) else 'no'}",
                 f"     #  {'candidate':<{name_w}}  {'checkpoints':<{ck_w}}  {'metric':>8}  {'time':>7}"]
        for k, r in enumerate(self.rows, 1):
            mark = "*" if r.winner else " "
            lines.append(f"  {mark} {k:>2}  {r.name:<{name_w}}  {r.described:<{ck_w}}  {_fmt_score(r.score):>8}  "
                         f"{r.seconds:>5.2f} s")
        w = self.winner
        lines.append(f"winner: {w.name} ({_fmt_score(w.score)})" + (f" -> {self.output}" if self.output else ""))
        return "\n".join(lines)


@dataclass
class _Candidate:
    name: str
    options: dict[str, Any]
    method: str
    param: str | None
    value: float | None
    window: str


def _windows(last: list[int], epochs: list[str], steps: list[str], n: int) -> list[tuple[str, dict[str, Any]]]:
    if not (last or epochs or steps):  # default: the 2, 4, 8, ... newest, and all of them
        sizes = [2 ** k for k in range(1, n.bit_length() + 1) if 2 ** k < n]
        return [(f"last {k}", {"last": k}) for k in sizes] + [("all", {})]
    out = []
    for lv, ev, sv in itertools.product(last or [None], epochs or [None], steps or [None]):
        opts = {k: v for k, v in (("last", lv), ("epochs", ev), ("steps", sv)) if v is not None}
        out.append((", ".join(f"{k} {v}" for k, v in opts.items()), opts))
    return out


def _methods(method: Any, decays: list[float], sigmas: list[float]) -> list[tuple[str, str | None, float | None]]:
    from .weights import METHODS

    if method is None:
        names = ["uniform"] + (["ema"] if decays else []) + (["power-ema"] if sigmas else [])
    else:
        names = _as_list(method, "--method", lambda s: str(s).lower().replace("_", "-"))
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
    lasts = _as_list(last, "--last", _pos_int)
    epoch_ranges = _as_list(epochs, "--epochs", str)
    step_ranges = _as_list(steps, "--steps", str)
    decays = _as_list(decay, "--decay", float)
    sigmas = _as_list(sigma_rel, "--sigma-rel", float)
    out = []
    for wname, wopts in _windows(lasts, epoch_ranges, step_ranges, n):
        for m, param, value in _methods(method, decays, sigmas):
            opts = dict(wopts, method=m)
            head = m
            if param is not None:
                opts[param] = value
                head += f" {param}={value:g}"
            out.append(_Candidate(f"{head}, {wname}", opts, m, param, value, wname))
    return out


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
    from .api import average

    t0 = time.perf_counter()
    fixed = _fixed(options, SWEEP_OPTIONS, "sweep")
    base, one_copy, _ = _plan_sources(inputs, fixed)
    _check_memory(one_copy, max_memory)
    out, kind = _check_output(output, [s.path for s in base])
    candidates = sweep_candidates(len(base), last=last, epochs=epochs, steps=steps, method=method, decay=decay,
                                  sigma_rel=sigma_rel)
    ev = Evaluator(spec, device=device, bn_mode=bn_mode)
    notes: list[str] = []

    # plan every candidate (headers only): skip empty selections, evaluate duplicates once
    planned: list[tuple[_Candidate, list[_Source]]] = []
    seen: dict[tuple, str] = {}
    for c in candidates:
        try:
            from .api import plan

            p = plan(inputs, **fixed, **c.options)
        except SelectionError as exc:
            notes.append(f"skipped {c.name}: {exc}")
            continue
        try:
            identity = (tuple(os.fspath(i.path) for i in p.inputs), tuple(round(i.weight, 12) for i in p.inputs))
            sources = [_Source(os.fspath(i.path), i.epoch, i.step) for i in p.inputs]
        finally:
            for i in p.inputs:
                i.checkpoint.close()
        if identity in seen:
            notes.append(f"skipped {c.name}: the same average as {seen[identity]}")
            continue
        seen[identity] = c.name
        planned.append((c, sources))

    single_opts = {k: v for k, v in fixed.items() if k in _READ}
    bar = _bar(len(base) + len(planned), progress, "sweep")
    try:
        # baselines: every checkpoint as saved (the best single one needs them all)
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
        state: dict[int, dict] = {0: last_sd, 1: best_single[1]}
        winner = 0 if not is_better(scores[best_k], scores[-1], ev.higher_is_better) else 1
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
            bar.set_postfix_str(f"best {_fmt_score(rows[winner].score)}")
    finally:
        bar.close()
    rows[winner].winner = True
    report = SweepReport(rows=rows, metric=ev.metric_name, higher_is_better=ev.higher_is_better, output=out,
                         notes=notes)
    if out is not None:
        w = rows[winner]
        _write(out, kind, state[winner], w.checkpoints if w.kind != "average" else inputs,  # type: ignore[arg-type]
               w.options, (bn_mode, ev.spec.path) if w.bn_recalibrated else None, "ckptavg_sweep", report.to_dict())
    if plot is not None:
        report.plot = plot_sweep(report, plot)
    report.seconds = time.perf_counter() - t0
    return report


# -- soup ---------------------------------------------------------------------------------------


@dataclass
class SoupStep:
    """One step of a greedy soup: an ingredient tried, the soup's score with it, and the decision."""

    step: int
    checkpoint: str
    epoch: Any
    own_score: float
    score: float  # the soup's score with this ingredient (for step 1: the ingredient alone)
    added: bool
    size: int  # soup size after the step
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("own_score", "score"):
            d[k] = None if math.isnan(d[k]) else d[k]
        return d


@dataclass
class SoupReport:
    """What :func:`soup` did: each step (added or rejected), the soup, and the uniform soup beside it.

    Example::

        >>> report = ckptavg.soup("finetunes/", "bn.toml", "soup.safetensors")   # doctest: +SKIP
        >>> print(report.format()); report.members                              # doctest: +SKIP
    """

    steps: list[SoupStep]
    members: list[str]  # the soup's checkpoints, in training order
    score: float
    uniform_score: float
    ingredients: int
    metric: str
    higher_is_better: bool
    output: Path | None = None
    seconds: float = 0.0
    plot: PlotData | None = None

    @property
    def best_ingredient_score(self) -> float:
        return self.steps[0].own_score

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: steps, members, scores, the metric and direction, the output."""
        nan = lambda v: None if math.isnan(v) else v  # noqa: E731
        return {"metric": self.metric, "higher_is_better": self.higher_is_better,
                "steps": [s.to_dict() for s in self.steps], "members": self.members, "score": nan(self.score),
                "uniform_soup_score": nan(self.uniform_score), "ingredients": self.ingredients,
                "best_ingredient_score": nan(self.best_ingredient_score),
                "output": os.fspath(self.output) if self.output else None, "seconds": round(self.seconds, 3)}

    def format(self) -> str:
        """The step table printed by ``ckptavg soup``."""
        direction = "higher" if self.higher_is_better else "lower"
        names = [_describe_inputs([s.epoch], [None], [s.checkpoint]) for s in self.steps]
        w = max(10, *(len(n) for n in names))
        lines = [f"metric: {self.metric} ({direction} is better); ingredients tried best first",
                 f"  step  {'ingredient':<{w}}  {'own':>8}  {'soup':>8}  {'result':<8}  size  {'time':>7}"]
        for s, name in zip(self.steps, names):
            result = "start" if s.step == 1 else "added" if s.added else "rejected"
            lines.append(f"  {s.step:>4}  {name:<{w}}  {_fmt_score(s.own_score):>8}  {_fmt_score(s.score):>8}  "
                         f"{result:<8}  {s.size:>4}  {s.seconds:>5.2f} s")
        lines.append(f"greedy soup: {len(self.members)} of {self.ingredients} ingredients, {_fmt_score(self.score)}"
                     + (f" -> {self.output}" if self.output else ""))
        lines.append(f"uniform soup of all {self.ingredients}: {_fmt_score(self.uniform_score)}")
        lines.append(f"best ingredient: {_fmt_score(self.best_ingredient_score)}")
        return "\n".join(lines)


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
    from .api import average

    t0 = time.perf_counter()
    fixed = _fixed(options, SOUP_OPTIONS, "soup")
    base, one_copy, _ = _plan_sources(inputs, fixed)
    _check_memory(one_copy, max_memory)
    out, kind = _check_output(output, [s.path for s in base])
    ev = Evaluator(spec, device=device, bn_mode=bn_mode)
    higher = ev.higher_is_better
    single_opts = {k: v for k, v in fixed.items() if k in _READ}
    avg_opts = {k: v for k, v in fixed.items() if k in _READ or k in _NUMERICS}
    n = len(base)
    bar = _bar(n + max(n - 1, 0) + (1 if n > 2 else 0), progress, "soup")
    try:
        own: list[float] = []
        seconds: list[float] = []
        for s in base:
            t = time.perf_counter()
            own.append(ev.score(average([s.path], order="given", **single_opts), recalibrate=False)[0])
            seconds.append(time.perf_counter() - t)
            bar.update(1)
        # best first; NaN last; ties: the earlier checkpoint first
        ranked = sorted(range(n), key=lambda k: (math.isnan(own[k]), -own[k] if higher else own[k], k))
        first = ranked[0]
        members = [first]
        score = own[first]
        soup_sd = average([base[first].path], order="given", **single_opts)
        steps = [SoupStep(1, base[first].path, base[first].epoch, own[first], own[first], True, 1, seconds[first])]
        for k in ranked[1:]:
            t = time.perf_counter()
            trial = sorted(members + [k])
            sd = average([base[j].path for j in trial], order="given", **avg_opts)
            trial_score, sd = ev.score(sd, recalibrate=True)
            added = not math.isnan(trial_score) and not is_better(score, trial_score, higher)
            if added:
                members, score, soup_sd = trial, trial_score, sd
            steps.append(SoupStep(len(steps) + 1, base[k].path, base[k].epoch, own[k], trial_score, added,
                                  len(members), time.perf_counter() - t))
            bar.update(1)
            bar.set_postfix_str(f"soup {len(members)} {_fmt_score(score)}")
        if len(members) == n:
            uniform_score = score
        else:
            sd = average([s.path for s in base], order="given", **avg_opts)
            uniform_score = ev.score(sd, recalibrate=True)[0]
            bar.update(1)
    finally:
        bar.close()
    report = SoupReport(steps=steps, members=[base[j].path for j in members], score=score,
                        uniform_score=uniform_score, ingredients=n, metric=ev.metric_name, higher_is_better=higher,
                        output=out)
    if out is not None:
        _write(out, kind, soup_sd, report.members, {"order": "given", **avg_opts},  # type: ignore[arg-type]
               (bn_mode, ev.spec.path) if len(members) > 1 and ev.has_bn else None, "ckptavg_soup", report.to_dict())
    if plot is not None:
        report.plot = plot_soup(report, plot)
    report.seconds = time.perf_counter() - t0
    return report


# -- plots --------------------------------------------------------------------------------------


@dataclass
class PlotData:
    """What a plot drew, read back from its Axes: line series and bars (label -> (xs, ys)) and the
    horizontal baselines (label -> y)."""

    kind: str  # "line" or "bar"
    xlabel: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    bars: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, float] = field(default_factory=dict)


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'ckptavg[plot]'") from None
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, ax: Any, path: PathLike, kind: str, xlabel: str) -> PlotData:
    """Save the figure, then read the drawn values back from the Axes."""
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    dest = Path(path)
    if dest.parent != Path(""):
        dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(dest, format="png")
    except OSError as exc:
        from .errors import OutputError

        raise OutputError(f"{dest}: cannot write the plot: {exc.strerror or exc}") from None
    data = PlotData(kind=kind, xlabel=xlabel)
    for line in ax.get_lines():
        label = line.get_label()
        xs, ys = (list(map(float, v)) for v in line.get_data())
        if label.startswith("baseline: "):
            data.baselines[label.removeprefix("baseline: ")] = ys[0]
        elif not label.startswith("_"):
            data.series[label] = (xs, ys)
    for container in ax.containers:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        for rect, label in zip(container.patches, labels):
            data.bars[label] = float(rect.get_height())
    return data


def plot_sweep(report: SweepReport, path: PathLike) -> PlotData:
    """Plot a sweep's metric per candidate into a PNG; returns the values drawn (read from the Axes).

    Windows of different sizes: metric against window size (checkpoints averaged), one line per
    method; a single window and one EMA method: metric against ``decay`` or ``sigma_rel``;
    otherwise a bar per candidate. The baselines are horizontal lines.

    Example::

        >>> data = plot_sweep(ckptavg.sweep("runs/", "bn.toml", last="2,4,8"), "sweep.png")   # doctest: +SKIP
        >>> data.series["uniform"]                                                           # doctest: +SKIP
        ([2.0, 4.0, 8.0], [0.97, 0.98, 0.99])
    """
    fig, ax = _figure()
    avg = [r for r in report.rows if r.kind == "average"]
    combos = list(dict.fromkeys((r.method, r.param, r.value) for r in avg))
    sizes = {r.size for r in avg}
    one_param = len({(m, p) for m, p, _ in combos}) == 1 and combos[0][1] is not None if combos else False
    if len(sizes) > 1:
        kind, xlabel = "line", "checkpoints averaged (window size)"
        for m, p, v in combos:
            pts = sorted((r.size, r.score) for r in avg if (r.method, r.param, r.value) == (m, p, v))
            label = m if p is None else f"{m} {p}={v:g}"
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    elif len(avg) > 1 and one_param and len({r.window for r in avg}) == 1:
        kind, xlabel = "line", str(combos[0][1])
        pts = sorted((r.value, r.score) for r in avg)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{combos[0][0]}, {avg[0].window}")
        if combos[0][1] == "sigma_rel":
            ax.set_xscale("log")
    else:
        kind, xlabel = "bar", "candidate"
        ax.bar(range(len(avg)), [r.score for r in avg], color="tab:blue", label="averages")
        ax.set_xticks(range(len(avg)), [r.name for r in avg], rotation=30, ha="right", fontsize=7)
        scores = [r.score for r in report.rows if not math.isnan(r.score)]
        if scores:
            lo, hi = min(scores), max(scores)
            pad = (hi - lo) * 0.2 or abs(hi) * 0.01 or 0.01
            ax.set_ylim(lo - pad, hi + pad)
    styles = {"last": ("tab:red", "--"), "best": ("tab:green", ":")}
    for r in report.rows:
        if r.kind in styles:
            color, style = styles[r.kind]
            ax.axhline(r.score, color=color, linestyle=style, label=f"baseline: {r.name} ({r.described})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(report.metric)
    _log_if_wide(ax, [r.score for r in report.rows])
    w = report.winner
    ax.set_title(f"sweep winner: {w.name} ({_fmt_score(w.score)})", fontsize=10)
    if kind == "line" and xlabel.startswith("checkpoints"):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data = _save(fig, ax, path, kind, xlabel)
    data.baselines = {k.split(" (")[0]: v for k, v in data.baselines.items()}
    return data


def _log_if_wide(ax: Any, scores: Sequence[float]) -> None:
    """A log scale when the scores are positive and span more than a factor of 20 (losses): on a
    linear scale the baselines would flatten the candidates into one line."""
    vals = [v for v in scores if v is not None and math.isfinite(v)]
    if len(vals) > 1 and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")


def plot_soup(report: SoupReport, path: PathLike) -> PlotData:
    """Plot a greedy soup's score as ingredients are tried into a PNG; returns the values drawn.

    Series ``soup``: the soup's score after each step; ``tried``: the score with each ingredient
    tried (rejected ones fall below the soup line); baselines: the best ingredient and the
    uniform soup of all ingredients.

    Example::

        >>> data = plot_soup(ckptavg.soup("runs/", "bn.toml"), "soup.png")   # doctest: +SKIP
        >>> data.series["soup"][1][-1]                                       # doctest: +SKIP
        0.9944
    """
    fig, ax = _figure()
    xs = [s.step for s in report.steps]
    soup_scores, current = [], None
    for s in report.steps:
        if s.added:
            current = s.score
        soup_scores.append(current)
    ax.plot(xs, soup_scores, marker="o", drawstyle="steps-post", label="soup", color="tab:blue")
    ax.plot(xs, [s.score for s in report.steps], linestyle="none", marker="x", color="tab:gray", label="tried")
    ax.axhline(report.best_ingredient_score, color="tab:green", linestyle=":", label="baseline: best ingredient")
    ax.axhline(report.uniform_score, color="tab:red", linestyle="--", label="baseline: uniform soup")
    ax.set_xlabel("ingredients tried (best first)")
    ax.set_ylabel(report.metric)
    _log_if_wide(ax, [*soup_scores, report.best_ingredient_score, report.uniform_score])
    ax.set_title(f"greedy soup: {len(report.members)} of {report.ingredients} ingredients "
                 f"({_fmt_score(report.score)})", fontsize=10)
    return _save(fig, ax, path, "line", "ingredients tried (best first)")

"""The reports of sweeps and soups: rows and steps, their tables (``format``) and JSON
(``to_dict``), and what a plot drew (:class:`PlotData`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import describe_inputs, fmt_score

__all__ = ["SweepRow", "SweepReport", "SoupStep", "SoupReport", "PlotData"]


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
        return describe_inputs(self.epochs, self.steps, self.checkpoints)

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
            lines.append(f"  {mark} {k:>2}  {r.name:<{name_w}}  {r.described:<{ck_w}}  {fmt_score(r.score):>8}  "
                         f"{r.seconds:>5.2f} s")
        w = self.winner
        lines.append(f"winner: {w.name} ({fmt_score(w.score)})" + (f" -> {self.output}" if self.output else ""))
        return "\n".join(lines)




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
        names = [describe_inputs([s.epoch], [None], [s.checkpoint]) for s in self.steps]
        w = max(10, *(len(n) for n in names))
        lines = [f"metric: {self.metric} ({direction} is better); ingredients tried best first",
                 f"  step  {'ingredient':<{w}}  {'own':>8}  {'soup':>8}  {'result':<8}  size  {'time':>7}"]
        for s, name in zip(self.steps, names):
            result = "start" if s.step == 1 else "added" if s.added else "rejected"
            lines.append(f"  {s.step:>4}  {name:<{w}}  {fmt_score(s.own_score):>8}  {fmt_score(s.score):>8}  "
                         f"{result:<8}  {s.size:>4}  {s.seconds:>5.2f} s")
        lines.append(f"greedy soup: {len(self.members)} of {self.ingredients} ingredients, {fmt_score(self.score)}"
                     + (f" -> {self.output}" if self.output else ""))
        lines.append(f"uniform soup of all {self.ingredients}: {fmt_score(self.uniform_score)}")
        lines.append(f"best ingredient: {fmt_score(self.best_ingredient_score)}")
        return "\n".join(lines)




@dataclass
class PlotData:
    """What a plot drew, read back from its Axes: line series and bars (label -> (xs, ys)) and the
    horizontal baselines (label -> y)."""

    kind: str  # "line" or "bar"
    xlabel: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    bars: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, float] = field(default_factory=dict)



"""Plots of sweeps and soups (matplotlib, imported on use): the scores of every candidate, the
soup's score as ingredients are tried; each returns what it drew (:class:`PlotData`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OptionError
from .common import PathLike, fmt_score
from .reports import PlotData, SoupReport, SweepReport

__all__ = ["plot_sweep", "plot_soup"]


def figure() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'ckptavg[plot]'") from None
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_plot(fig: Any, ax: Any, path: PathLike, kind: str, xlabel: str) -> PlotData:
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
        from ..errors import OutputError

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
    fig, ax = figure()
    avg = [r for r in report.rows if r.kind == "average"]
    combos = list(dict.fromkeys((r.method, r.param, r.value) for r in avg))
    sizes = {r.size for r in avg}
    one_param = len({(m, p) for m, p, _ in combos}) == 1 and combos[0][1] is not None if combos else False
    if len(sizes) > 1:
        kind, xlabel = "line", "checkpoints averaged (window size)"
        for m, p, v in combos:
            pts: list[tuple[Any, float]] = sorted((r.size, r.score) for r in avg
                                                  if (r.method, r.param, r.value) == (m, p, v))
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
    log_if_wide(ax, [r.score for r in report.rows])
    w = report.winner
    ax.set_title(f"sweep winner: {w.name} ({fmt_score(w.score)})", fontsize=10)
    if kind == "line" and xlabel.startswith("checkpoints"):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data = save_plot(fig, ax, path, kind, xlabel)
    data.baselines = {k.split(" (")[0]: v for k, v in data.baselines.items()}
    return data


def log_if_wide(ax: Any, scores: Sequence[float | None]) -> None:
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
    fig, ax = figure()
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
    log_if_wide(ax, [*soup_scores, report.best_ingredient_score, report.uniform_score])
    ax.set_title(f"greedy soup: {len(report.members)} of {report.ingredients} ingredients "
                 f"({fmt_score(report.score)})", fontsize=10)
    return save_plot(fig, ax, path, "line", "ingredients tried (best first)")


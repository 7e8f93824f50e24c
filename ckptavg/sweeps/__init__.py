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


from .candidates import sweep_candidates
from .common import DEFAULT_MAX_MEMORY, SOUP_OPTIONS, SWEEP_OPTIONS
from .greedy import soup
from .plots import plot_soup, plot_sweep
from .reports import PlotData, SoupReport, SoupStep, SweepReport, SweepRow
from .search import sweep

__all__ = ["sweep", "soup", "SweepReport", "SweepRow", "SoupReport", "SoupStep", "PlotData", "plot_sweep",
           "plot_soup", "sweep_candidates", "DEFAULT_MAX_MEMORY", "SWEEP_OPTIONS", "SOUP_OPTIONS"]

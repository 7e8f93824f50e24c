"""The sweep and soup steps of the digits example: which average is best on the validation split?

Run by ``run_example.py`` after its merges; writes ``sweep_best.pt``, ``soup.pt``, ``sweep.png`` and
``soup.png`` in the work folder and returns test-accuracy rows for the final table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SWEEP_WINDOWS = "2,4,8,16"
SWEEP_METHODS = ("uniform,ema", "0.6,0.8")  # --method, --decay
OUTPUTS = ("sweep_best.pt", "sweep_best.pt.ckptavg.json", "soup.pt", "soup.pt.ckptavg.json", "sweep.png", "soup.png")


def run(ckptavg: Callable[..., None], work: Path, spec: str, first: int, **kw) -> list[tuple[str, Path]]:
    """``ckptavg sweep`` over windows and EMA decays, ``ckptavg soup`` over the second half of training."""
    for stale in OUTPUTS:
        (work / stale).unlink(missing_ok=True)
    method, decay = SWEEP_METHODS
    ckptavg("sweep", "checkpoints/", "--spec", spec, "--last", SWEEP_WINDOWS, "--method", method, "--decay", decay,
            "-o", "sweep_best.pt", "--plot", "sweep.png", **kw)
    ckptavg("soup", "checkpoints/", "--epochs", f"{first}:", "--spec", spec, "-o", "soup.pt", "--plot", "soup.png",
            **kw)
    return [("sweep winner (by val loss)", work / "sweep_best.pt"),
            (f"greedy soup of epochs {first}- (by val loss)", work / "soup.pt")]

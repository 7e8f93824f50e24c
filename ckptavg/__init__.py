"""ckptavg: streaming, exact checkpoint averaging for PyTorch.

Average saved checkpoints (uniform SWA, EMA, power EMA, explicit weights, any selection
of epochs or steps) tensor by tensor with bounded memory, recalibrate BatchNorm
statistics, and write one model file.

Example::

    import ckptavg

    report = ckptavg.merge("runs/", "swa.safetensors", epochs="10:")
    print(report.summary())
    state_dict = ckptavg.average(["a.pt", "b.pt"], method="ema", decay=0.9)
    ckptavg.merge(["ft1/", "ft2/", "ft3/"], "soup/")  # Hugging Face folders in, sharded folder out
    ckptavg.merge("lightning_logs/", "swa.ckpt", keep_structure=True)  # load_from_checkpoint accepts it
    print(ckptavg.inspect("runs/").format())  # what each checkpoint holds, headers only
    print(ckptavg.sweep("runs/", "bn.toml", "best.pt", last="2,4,8,16").format())  # which average is best?
    print(ckptavg.soup(["ft1/", "ft2/", "ft3/"], "eval.toml", "soup/").format())   # greedy soup
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CkptavgError, CkptavgWarning

# The public names live in their modules; they are imported on first use (PEP 562), so that
# `ckptavg --help` and `import ckptavg.errors` do not pay for importing torch.
_LAZY = {
    "merge": "api", "average": "api", "plan": "api", "recalibrate_file": "api",
    "MergeReport": "api", "BNFileReport": "api",
    "recalibrate_bn": "bn", "BNReport": "bn",
    "inspect": "inspection", "InspectReport": "inspection", "CheckpointInfo": "inspection",
    "MergePlan": "plans", "MergeOptions": "options",
    "PowerEMA": "power_ema", "PowerEMACallback": "lightning_callback",
    "sweep": "sweeps", "soup": "sweeps", "SweepReport": "sweeps", "SoupReport": "sweeps",
    "watch": "watcher",
}

if TYPE_CHECKING:
    from .api import BNFileReport, MergeReport, average, merge, plan, recalibrate_file
    from .bn import BNReport, recalibrate_bn
    from .inspection import CheckpointInfo, InspectReport, inspect
    from .lightning_callback import PowerEMACallback
    from .options import MergeOptions
    from .plans import MergePlan
    from .power_ema import PowerEMA
    from .sweeps import SoupReport, SweepReport, soup, sweep
    from .watcher import watch


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "__version__",
    "merge",
    "average",
    "plan",
    "inspect",
    "recalibrate_bn",
    "recalibrate_file",
    "sweep",
    "soup",
    "watch",
    "SweepReport",
    "SoupReport",
    "MergeReport",
    "MergeOptions",
    "BNReport",
    "BNFileReport",
    "MergePlan",
    "InspectReport",
    "CheckpointInfo",
    "PowerEMA",
    "PowerEMACallback",
    "CkptavgError",
    "CkptavgWarning",
]

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
"""

from ._version import __version__
from .api import BNFileReport, MergeReport, average, merge, plan, recalibrate_file
from .bn import BNReport, recalibrate_bn
from .errors import CkptavgError, CkptavgWarning
from .inspect import CheckpointInfo, InspectReport, inspect
from .plan import MergePlan

__all__ = [
    "__version__",
    "merge",
    "average",
    "plan",
    "inspect",
    "recalibrate_bn",
    "recalibrate_file",
    "MergeReport",
    "BNReport",
    "BNFileReport",
    "MergePlan",
    "InspectReport",
    "CheckpointInfo",
    "CkptavgError",
    "CkptavgWarning",
]

"""BatchNorm recalibration: the pass itself (:mod:`.core`), the TOML spec naming a model and data
(:mod:`.spec`), and loading a state dict into the spec's model to recalibrate it (:mod:`.load`).

Example::

    >>> from ckptavg.bn import recalibrate_bn
    >>> report = recalibrate_bn(model, loader, mode="precise")        # doctest: +SKIP
"""

from ..devices import check_device
from .core import BNReport, is_bn_like, recalibrate_bn
from .load import recalibrate_state_dict
from .spec import BNSpec, load_spec

__all__ = ["BNReport", "BNSpec", "check_device", "is_bn_like", "load_spec", "recalibrate_bn", "recalibrate_state_dict"]

"""What a DCP folder records about itself, read from its few small entries and sidecars.

Step and epoch from the checkpoint's own ``step``/``epoch`` or torchtitan's ``train_state``
entries, a power-EMA snapshot's ``sigma_rel``/``gamma``, Megatron's iteration (``common.pt``,
:mod:`ckptavg.io.megatron`) and Lightning's epoch and global step (``meta.pt`` beside the DCP files
of a sharded ``epoch=E-step=S.ckpt/`` folder). Only tiny items are read, weights-only; one that is
big, damaged or needs code to load is left unread (the folder name or the order option decide).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError
from . import megatron
from .checkpoint import Checkpoint
from .dcp_checks import load_small_blob, shown
from .metadata import check_profile

__all__ = ["recorded_meta"]

_MAX_SMALL_ITEM = 1 << 20  # non-tensor entries read for step/epoch at most this big
_STEP_KEYS = ("step", "global_step", "train_state.step", "train_state")
_EPOCH_KEYS = ("epoch", "train_state.epoch", "train_state")
LIGHTNING_META = "meta.pt"


def recorded_meta(ckpt: Checkpoint, folder: Path, sdm: dict[str, Any], make_ref: Any, locate: Any) -> None:
    """Step and epoch from the checkpoint's own small entries, when they hold integers; a power-EMA
    snapshot's ``sigma_rel``/``gamma``, which must be positive numbers when present; Megatron's
    iteration (``common.pt``) and Lightning's epoch and step (``meta.pt`` of a sharded ``.ckpt/``
    folder), each loaded weights-only. ``make_ref(fqn, metadata)`` references a tensor entry,
    ``locate(fqn, None)`` finds a byte entry."""
    meta = ckpt.meta
    _megatron_iteration(ckpt, folder)
    _lightning_meta(ckpt, folder)
    for keys, attr in ((_STEP_KEYS, "step"), (_EPOCH_KEYS, "epoch")):
        for k in keys:
            if getattr(meta, attr) is not None or k not in sdm:
                continue
            v = _small_value(folder, k, sdm[k], make_ref, locate)
            if isinstance(v, dict):
                v = v.get(attr)
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
                v = int(v.reshape(()).item())
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(meta, attr, v)
                setattr(meta, f"{attr}_from", "recorded")
    for attr in ("sigma_rel", "gamma"):  # a power-EMA snapshot (PowerEMA.save_snapshots(format="dcp"))
        if attr in sdm:
            raw = _small_value(folder, attr, sdm[attr], make_ref, locate)
            x = float(raw.reshape(()).item()) if isinstance(raw, torch.Tensor) and raw.numel() == 1 else raw
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue  # not a profile (e.g. an RL discount kept as an object): ignored as in other formats
            check_profile(folder, attr, raw, x)
            setattr(meta, attr, float(x))


def _megatron_iteration(ckpt: Checkpoint, folder: Path) -> None:
    """A Megatron/NeMo ``torch_dist`` checkpoint: format ``"megatron"``, and the iteration recorded in
    ``common.pt`` (loaded weights-only, see :mod:`ckptavg.io.megatron`) is the step."""
    if not megatron.is_megatron_folder(folder):
        return
    ckpt.format = "megatron"
    if not (folder / megatron.COMMON_NAME).is_file():
        raise CheckpointReadError(f"{folder}: {megatron.COMMON_NAME} is missing (Megatron writes it with every "
                                  "torch_dist checkpoint; it cannot load one without it)")
    it = megatron.iteration_of(megatron.load_common(folder))
    if it is not None:
        ckpt.meta.step, ckpt.meta.step_from = it, "recorded"


def _small_value(folder: Path, fqn: str, smd: Any, make_ref: Any, locate: Any) -> Any:
    """A non-tensor entry (a ``torch.save`` blob, loaded weights-only) or a one-element tensor;
    None when it is big, unreadable or needs code to load."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        if isinstance(smd, TensorStorageMetadata):
            if math.prod(smd.size) != 1:
                return None
            return make_ref(fqn, smd).materialize()
        f, off, length = locate(fqn, None)
        if length > _MAX_SMALL_ITEM:
            return None
        return load_small_blob(f, off, length, f"{folder}: item {shown(fqn)}", _MAX_SMALL_ITEM)
    except CheckpointReadError as e:
        if "zip bomb" in str(e):
            raise  # a hostile item is an error, a damaged one only loses its step or epoch
        return None
    except Exception:
        return None  # step/epoch are optional: the folder name or the order option decide then


def _lightning_meta(ckpt: Checkpoint, folder: Path) -> None:
    """Lightning's sharded checkpoint folder keeps everything but the model and optimizer states in
    ``meta.pt`` (``epoch``, ``global_step``, loops, callbacks...): the epoch and step, when it loads
    weights-only (hyper-parameters holding other objects leave it unread: the folder name decides)."""
    obj = megatron.small_torch_dict(folder / LIGHTNING_META, _MAX_SMALL_ITEM * 16)
    if obj is None:
        return
    for key, attr in (("global_step", "step"), ("epoch", "epoch")):
        v = obj.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and getattr(ckpt.meta, attr) is None:
            setattr(ckpt.meta, attr, v)
            setattr(ckpt.meta, f"{attr}_from", "recorded")

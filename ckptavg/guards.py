"""Tensors whose element-wise average is not the average of what they stand for: refused with a
one-line error naming the tensor and the format, never averaged silently.

* **LoRA factors** (PEFT ``lora_A``/``lora_B``, kohya ``lora_down``/``lora_up``) outside PEFT
  adapter folders and pure kohya LoRA files (both averaged exactly): an adapter's
  update is ``B @ A`` (times its scaling), and ``mean_i(B_i) @ mean_i(A_i)`` differs from
  ``mean_i(B_i @ A_i)``. Averaging the factors of one training run's checkpoints (an EMA of the
  adapter's parameters, as during training) is a choice the user makes with ``--lora-factors``.
* **Block- or channel-scaled FP8 weights** (``weight`` in float8 beside ``weight_scale_inv``,
  DeepSeek-V3 style, or ``weight_scale``, ModelOpt / compressed-tensors style): the weight is the
  float8 value times its scale; averaging values and scales separately is not the average of the
  weights. The known layouts are dequantized when opened (:mod:`ckptavg.io.fp8`): what reaches
  this guard is a float8 weight with scales of another shape.
* **Integer-quantized weights** (GPTQ/AWQ ``qweight``/``qzeros``, int8 weights with scales,
  bitsandbytes ``SCB``): packed integers and their scales are not numbers to average, and copying
  them from the last checkpoint (the rule for integer counters) would not be an average at all.

Dequantize such checkpoints, or average adapter folders (exact, :mod:`ckptavg.adapters`), instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .errors import OptionError
from .io.checkpoint import Checkpoint

__all__ = ["check_averageable", "is_lora_factor", "lora_averaged_exactly"]

_LORA_RE = re.compile(r"(?:^|\.)(lora_A|lora_B|lora_down|lora_up|lora_embedding_A|lora_embedding_B)(?:\.|$)")
_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, n)}
_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_INT_QUANT_RE = re.compile(r"(?:^|\.)(qweight|qzeros|g_idx)$")
_INT_SCALES = (".scales", ".weight_scale", ".SCB", ".weight_format")


def lora_averaged_exactly(formats: Sequence[str]) -> bool:
    """Whether checkpoints of these formats are LoRA adapters averaged exactly in the space of their
    updates: all PEFT adapter folders (:mod:`ckptavg.adapters`) or all kohya LoRA files (:mod:`ckptavg.kohya`)."""
    return bool(formats) and set(formats) in ({"peft"}, {"kohya"})


def is_lora_factor(name: str) -> bool:
    """Whether a tensor name is a LoRA factor (PEFT ``lora_A``/``lora_B``, kohya ``lora_down``/``lora_up``)."""
    return bool(_LORA_RE.search(name))


def check_averageable(chosen: Sequence[Checkpoint], lora_factors: bool = False) -> None:
    """Refuse, before anything is read, the tensors of the last selected checkpoint whose average
    would not mean what it looks like (see the module docstring); one checkpoint alone is a copy.

    Example::

        check_averageable(opened)  # OptionError: ...: tensor 'q.lora_A.weight' is a LoRA factor ...
    """
    if len(chosen) < 2:
        return
    last = chosen[-1]
    names = set(last.tensors)
    exact = lora_averaged_exactly([c.format for c in chosen])
    for name, ref in last.tensors.items():
        if not lora_factors and not exact and _LORA_RE.search(name) and ref.dtype.is_floating_point:
            raise OptionError(
                f"{last.path}: tensor {name!r} is a LoRA factor: averaging lora_A and lora_B (or lora_down and "
                "lora_up) separately is not the average of the adapters' updates (mean of B_i A_i differs from "
                "mean(B) mean(A)); merge each adapter into its base model and average those, or pass "
                "--lora-factors to average the factors anyway (an EMA of one training run's adapter)")
        if ref.dtype in _FP8:
            scale = next((name + s for s in _SCALE_SUFFIXES if name + s in names), None)
            if scale is not None:
                raise OptionError(
                    f"{last.path}: tensor {name!r} is a scaled float8 weight (with {scale!r}): its value is the "
                    "float8 number times its scale, so averaging the numbers and the scales separately is not the "
                    "average of the weights; dequantize the checkpoints first")
        if not ref.dtype.is_floating_point and ref.dtype != torch.bool:
            fmt = _int_quant_format(name, names)
            if fmt is not None:
                raise OptionError(
                    f"{last.path}: tensor {name!r} is an integer-quantized weight ({fmt}): packed integers and "
                    "their scales cannot be averaged (nor copied from the last checkpoint as a counter would be); "
                    "dequantize the checkpoints first")


def _int_quant_format(name: str, names: set[str]) -> str | None:
    m = _INT_QUANT_RE.search(name)
    if m is not None:
        return f"GPTQ/AWQ {m.group(1)}"
    if name.endswith(".weight") or name == "weight":
        stem = name[: -len(".weight")]
        scale = next((stem + s for s in _INT_SCALES if stem + s in names), None)
        # a layer's weight stored as integers is quantized (its scales elsewhere or folded in): no
        # counter is named weight
        return f"integer weight with scales {scale!r}" if scale is not None else "an integer layer weight"
    return None

"""Scaled float8 weights, dequantized as they are read.

A float8 weight is its float8 numbers times a scale kept beside it: DeepSeek-V3 style
``X.weight`` (``float8_e4m3fn``, ``M x N``) with ``X.weight_scale_inv`` (float32,
``ceil(M/128) x ceil(N/128)``: one factor per 128 x 128 block), or ModelOpt / compressed-tensors
style ``X.weight_scale`` (one factor for the tensor, or one per output row). Averaging the numbers
and the scales separately is not the average of the weights, so each such pair is replaced, when
the checkpoint is opened, by one float32 tensor ``X.weight`` whose elements are computed chunk by
chunk as the engine reads them (``float8 value x its block's factor``, exactly in float32) and the
scale entry is dropped. The average is then written in a floating dtype (float32, or ``--dtype``);
a folder output's ``config.json`` loses its ``quantization_config`` (the weights are no longer
quantized). Any other layout of scales beside a float8 weight is left to the guard, which refuses
it (:mod:`ckptavg.guards`).

Example::

    dequantize_scaled_fp8(ckpt)  # ckpt.tensors["layers.0.mlp.weight"].dtype == torch.float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import Checkpoint, TensorRef

__all__ = ["dequantize_scaled_fp8", "Fp8Ref", "BLOCK"]

BLOCK = 128
_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, n)}


@dataclass(eq=False)
class Fp8Ref(TensorRef):
    """A float32 view of ``weight`` (float8) times ``scale`` (see the module docstring)."""

    weight: Any = None
    scale: Any = None
    block: bool = True
    _factors: torch.Tensor | None = field(default=None, repr=False)

    @property
    def direct(self) -> bool:
        return False

    def _scales(self) -> torch.Tensor:
        if self._factors is None:
            self._factors = self.scale.materialize().to(torch.float32)
        return self._factors

    def _elements(self, e0: int, e1: int) -> torch.Tensor:
        raw = bytearray(e1 - e0)
        self.weight.read_into(e0 * self.weight.itemsize, memoryview(raw))
        values = torch.frombuffer(raw, dtype=torch.uint8).view(self.weight.dtype).to(torch.float32) if raw else \
            torch.empty(0)
        s = self._scales()
        if s.numel() == 1:
            return values * s.reshape(())
        cols = self.shape[-1] if self.shape else 1
        idx = torch.arange(e0, e1)
        rows = idx // cols
        if not self.block:  # one factor per output row
            return values * s.reshape(-1)[rows]
        return values * s[rows // BLOCK, (idx % cols) // BLOCK]

    def read_into(self, start: int, mv: memoryview) -> None:
        if not len(mv):
            return
        e0, e1 = start // 4, (start + len(mv)) // 4
        torch.frombuffer(mv, dtype=torch.uint8).view(torch.float32).copy_(self._elements(e0, e1))

    def materialize(self) -> torch.Tensor:
        if self._cache is None:
            self._cache = self._elements(0, self.numel).reshape(self.shape)
        return self._cache

    def release(self) -> None:
        self._cache = None
        self._factors = None
        self.weight.release()
        self.scale.release()


def _fits(weight: TensorRef, scale: TensorRef, block: bool) -> bool:
    if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16) or len(weight.shape) != 2:
        return False
    m, n = weight.shape
    if scale.numel == 1:
        return True
    if block:
        return tuple(scale.shape) == (math.ceil(m / BLOCK), math.ceil(n / BLOCK))
    return tuple(scale.shape) in ((m,), (m, 1))


def dequantize_scaled_fp8(ckpt: Checkpoint) -> None:
    """Replace each scaled float8 weight of ``ckpt`` (and drop its scale) by its float32 value, read
    lazily (see the module docstring); a note says how many."""
    done = 0
    for name in list(ckpt.tensors):
        ref = ckpt.tensors.get(name)
        if ref is None or ref.dtype not in _FP8:
            continue
        for suffix, block in (("_scale_inv", True), ("_scale", False)):
            scale = ckpt.tensors.get(name + suffix)
            if scale is not None and _fits(ref, scale, block):
                ckpt.tensors[name] = Fp8Ref(name=name, dtype=torch.float32, shape=tuple(ref.shape), weight=ref,
                                            scale=scale, block=block)
                del ckpt.tensors[name + suffix]
                done += 1
                break
    if done:
        ckpt.dequantized = True
        ckpt.notes.append("scaled float8 weights (with weight_scale_inv or weight_scale) are dequantized to float32 "
                          "as they are read and averaged as such; the output is not quantized")

"""The checks of a chunk: NaN or Inf in an input (naming the file, tensor and index), and overflow
of a narrower output dtype."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..plans import MergePlan, PlannedTensor
from .schedule import Unit

__all__ = ["segment_at", "check_cast", "explain_nonfinite", "unravel"]

#: elements scanned at a time when naming an overflowed element
SCAN = 1 << 16


def segment_at(plan: MergePlan, unit: Unit, idx: int) -> tuple[PlannedTensor, int, int, int]:
    """The averaged segment holding element ``idx`` of the unit: (tensor, elem0, count, offset)."""
    for j, e0, n, off in unit.avg:
        if off <= idx < off + n:
            return plan.tensors[j], e0, n, off
    raise AssertionError("index outside the unit")


def check_cast(plan: MergePlan, unit: Unit, out: torch.Tensor) -> None:
    """The average must also fit the (narrower) output dtype: overflow to inf is an error
    naming the first element that overflowed (scanned in cache-sized blocks: a chunk-sized
    mask would cost a chunk of memory per worker)."""
    for s0 in range(0, out.numel(), SCAN):
        blk = out[s0 : s0 + SCAN]
        if bool(torch.isfinite(blk).all()):
            continue
        k = s0 + int((~torch.isfinite(blk)).nonzero()[0, 0])
        pt, e0, _, off = segment_at(plan, unit, k)
        pos = unravel(k - off + e0, pt.shape)
        raise NonFiniteError(
            f"tensor {pt.name!r}: the average at index {list(pos)} overflows "
            f"{str(out.dtype).removeprefix('torch.')} (the output dtype); choose a wider --dtype, or pass "
            "--allow-nonfinite (allow_nonfinite=True) to write inf"
        )


def explain_nonfinite(plan: MergePlan, unit: Unit, a: torch.Tensor) -> None:
    """Find which input holds NaN/Inf in this chunk and raise, or accept an overflow."""
    finite = torch.isfinite(a) if not a.is_complex() else torch.isfinite(a.real) & torch.isfinite(a.imag)
    if bool(finite.all()):
        return  # only the check's own sum overflowed
    k = int((~finite).nonzero()[0, 0])
    pt, e0, count, _ = segment_at(plan, unit, k)
    for ref in pt.refs:
        buf = bytearray(count * ref.itemsize)
        ref.read_into(e0 * ref.itemsize, memoryview(buf))
        x = torch.frombuffer(buf, dtype=ref.dtype) if buf else torch.empty(0, dtype=ref.dtype)
        xf = x.to(torch.complex128 if x.is_complex() else torch.float64)
        bad = ~(torch.isfinite(xf.real) & torch.isfinite(xf.imag)) if xf.is_complex() else ~torch.isfinite(xf)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0]) + e0
            pos = unravel(idx, pt.shape)
            val = xf[idx - e0].item()
            raise NonFiniteError(
                f"{ref.path or 'input'}: tensor {pt.name!r} holds {val} at index {list(pos)}; "
                "pass --allow-nonfinite (allow_nonfinite=True) to average anyway"
            )
    raise NonFiniteError(
        f"tensor {pt.name!r}: the weighted sum overflowed {a.dtype} (inputs are finite); use --accumulate float64"
    )


def unravel(idx: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(idx % s if s else 0)
        idx //= s if s else 1
    return tuple(reversed(out))

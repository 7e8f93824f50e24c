"""The arithmetic of a run: reading a unit's bytes, adding each input's block into the
accumulators, finishing a chunk (divisor, one cast, checks) and handing its bytes to the writer."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..io import TensorRef
from ..io.files import tensor_memoryview
from ..plans import MergePlan
from .checks import check_cast, explain_nonfinite
from .schedule import Unit
from .threads import Job, Output, Pool

__all__ = ["SUB", "read_runs", "accumulate", "finish", "emit"]

#: elements per block for dtype conversions (fits in a core's cache)
SUB = 1 << 16


def read_runs(runs: list[tuple[Any, int, list[tuple[int, int]]]], mv: memoryview, gap: memoryview) -> None:
    for src, off, iov in runs:
        if isinstance(src, TensorRef):
            dst, n = iov[0]
            src.read_into(off, mv[dst : dst + n])
            continue
        src.preadv_into([mv[d : d + n] if d >= 0 else gap[:n] for d, n in iov], off)


def accumulate(x: torch.Tensor, acc_dt: torch.dtype, todo: list[tuple[torch.Tensor, float, bool]],
                scratch_of: Any) -> None:
    """Add one input's block ``x`` into each output's accumulator block: (block, weight, whether
    this input is the output's first, which starts the sum instead of adding to it)."""
    if x.dtype == acc_dt:
        for a, c, first in todo:
            if first:
                if c == 1.0:
                    a.copy_(x)
                else:
                    torch.mul(x, c, out=a)
            else:
                a.add_(x, alpha=c)
        return
    # convert in cache-sized pieces (once for all outputs): no block-sized temporary
    n = x.numel()
    tmp = scratch_of(acc_dt)
    for s0 in range(0, n, SUB):
        m = min(SUB, n - s0)
        t = tmp[:m]
        t.copy_(x[s0 : s0 + m])
        for a, c, first in todo:
            blk = a[s0 : s0 + m]
            if first:
                if c == 1.0:
                    blk.copy_(t)
                else:
                    torch.mul(t, c, out=blk)
            else:
                blk.add_(t, alpha=c)


def finish(plan: MergePlan, unit: Unit, full: torch.Tensor, obuf: torch.Tensor | None, divisor: float, cuda: bool,
            allow_nonfinite: bool, scratch_of: Any) -> None:
    """Check and divide one output's chunk in its accumulator ``full``, and cast it into
    ``obuf`` when there is one (else the accumulator itself is written)."""
    assert unit.key is not None
    _, acc_dt, od = unit.key
    n = unit.n
    a = full[:n]
    if not allow_nonfinite:
        s = a.sum() if not a.dtype.is_complex else a.abs().sum()
        if not math.isfinite(float(s.real if s.is_complex() else s)):
            explain_nonfinite(plan, unit, a)
    exact16 = divisor != 1.0 and a.dtype == torch.float32 and od.itemsize < 4 and not od.is_complex
    if divisor != 1.0 and not exact16:
        a.div_(divisor)
    if obuf is None:
        return
    out = obuf[: n * od.itemsize].view(od)
    if exact16:
        # The float32 sum of 16/8-bit values is exact; divide in float64 so that the cast
        # to the output dtype is the only rounding (the correctly rounded mean).
        f = scratch_of(torch.float64)
        for s0 in range(0, n, SUB):
            m = min(SUB, n - s0)
            f[:m].copy_(a[s0 : s0 + m])
            f[:m].div_(divisor)
            out[s0 : s0 + m].copy_(f[:m])
    elif cuda:
        out.copy_(a.to(od) if a.dtype != od else a)  # cast on the device, synchronous copy to host
    else:
        for s0 in range(0, n, SUB):  # in cache-sized blocks: a cast may go through a temporary
            out[s0 : s0 + SUB].copy_(a[s0 : s0 + SUB])
    if not allow_nonfinite and od.is_floating_point and od.itemsize < a.dtype.itemsize:
        # Rounding to a narrower dtype is monotone, so the cast overflows somewhere exactly when
        # it overflows at the chunk's smallest or largest value: two elements to cast, instead
        # of a scan of the output (isfinite over bf16 ran at 0.14 G elements/s here).
        ext = torch.stack(torch.aminmax(a)).double()
        if exact16:
            ext = ext / divisor
        if not bool(torch.isfinite(ext.to(od)).all()):
            check_cast(plan, unit, out)


def emit(job: Job, outs: list[Output], copies: Pool, acc_pool: Any) -> None:
    """The unit's bytes for every output, in plan order, as views for the writer thread, and
    the buffers to give back once they are written (an accumulator that was cast is free now)."""
    unit = job.unit
    cmv = tensor_memoryview(job.cbuf) if job.cbuf is not None else None
    for m, o in enumerate(outs):
        amv = None
        if unit.avg:
            assert unit.key is not None
            _, acc_dt, od = unit.key
            obuf = job.obufs[m]
            if obuf is None:  # the accumulator itself is written
                done = job.accs[m]
                job.release.append((acc_pool(o, acc_dt), done))
            else:
                acc_pool(o, acc_dt).put(job.accs[m])
                done = obuf
                assert o.outs is not None
                job.release.append((o.outs, done))
            amv = tensor_memoryview(done)[: unit.n * od.itemsize]
        mvs = []
        for is_copy, lo, hi in unit.pieces:
            src = cmv if is_copy else amv
            assert src is not None
            mvs.append(src[lo:hi])
        job.pieces.append((o.writer, mvs))
    if job.cbuf is not None:
        job.release.append((copies, job.cbuf))



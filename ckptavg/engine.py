"""Stream-average: compute ``sum_i w_i * theta_i`` tensor by tensor, chunk by chunk.

For every output tensor, in plan order, the engine walks the tensor in chunks of at most
``chunk_elems`` elements. For each chunk it reads that byte range from every input (with
``pread``, into one of two reused buffers) and accumulates it into a float32 (or float64)
accumulator; after the last input the chunk is scaled, cast once to the output dtype
(round to nearest) and handed to the writer. A reader thread fills the next buffer while
the main thread accumulates the current one, so reading and arithmetic overlap.

Memory is therefore bounded by a handful of chunk-sized buffers, whatever the number of
inputs, the model size or the size of the largest tensor; nothing is memory-mapped, so
the page cache does not count against the process.

Integer and bool tensors are copied from the last selected checkpoint, not averaged.

CUDA (``device="cuda"``) uses the same code: the read buffers are pinned, each chunk is
copied to the device with ``non_blocking=True`` and accumulated there; a CUDA event per
buffer makes the reader wait until the copy out of that buffer has finished.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NonFiniteError, OptionError
from .plan import MergePlan, PlannedTensor
from .readers import TensorRef
from .writers import tensor_memoryview

__all__ = ["run", "EngineStats", "DEFAULT_CHUNK_ELEMS", "resolve_device"]

#: elements per chunk (float32: 8 MB per buffer); override with CKPTAVG_CHUNK_ELEMS
DEFAULT_CHUNK_ELEMS = 1 << 21


@dataclass
class EngineStats:
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    tensors_averaged: int = 0
    tensors_copied: int = 0


@dataclass
class _Step:
    kind: str  # "avg" | "copy"
    tensor: int
    pt: PlannedTensor
    ref: TensorRef
    input: int
    elem0: int  # first element of the chunk (avg) / first byte (copy)
    count: int  # elements (avg) / bytes (copy)
    first: bool  # first input of this chunk
    last: bool  # last input of this chunk
    tensor_done: bool  # last step of this tensor

    @property
    def nbytes(self) -> int:
        return self.count * self.ref.itemsize if self.kind == "avg" else self.count

    @property
    def byte0(self) -> int:
        return self.elem0 * self.ref.itemsize if self.kind == "avg" else self.elem0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate a device option (``cpu``, ``cuda``, ``cuda:N``)."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise OptionError(f"--device must be cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise OptionError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    return dev


def _schedule(plan: MergePlan, chunk: int, copy_chunk: int) -> Iterator[_Step]:
    coeffs = plan.weights.coeffs
    active = [i for i, c in enumerate(coeffs) if c != 0]
    for j, pt in enumerate(plan.tensors):
        if pt.alias_of is not None or pt.numel == 0:
            continue
        if pt.kind == "copy":
            ref = pt.refs[-1]
            total = ref.nbytes
            for b0 in range(0, total, copy_chunk):
                n = min(copy_chunk, total - b0)
                yield _Step("copy", j, pt, ref, len(pt.refs) - 1, b0, n, True, True, b0 + n >= total)
            continue
        numel = pt.numel
        for e0 in range(0, numel, chunk):
            n = min(chunk, numel - e0)
            for k, i in enumerate(active):
                yield _Step("avg", j, pt, pt.refs[i], i, e0, n, k == 0, k == len(active) - 1,
                            e0 + n >= numel and k == len(active) - 1)


class _Buffers:
    """Reused buffers: two host read buffers, accumulators, scratch and an output buffer."""

    def __init__(self, plan: MergePlan, device: torch.device, chunk: int) -> None:
        self.device = device
        cuda = device.type == "cuda"
        avg = [t for t in plan.tensors if t.kind == "average" and t.alias_of is None and t.numel]
        max_in = max((r.itemsize for t in avg for r in t.refs), default=1)
        max_elems = min(chunk, max((t.numel for t in avg), default=0))
        copies = [t.refs[-1].nbytes for t in plan.tensors if t.kind == "copy" and t.alias_of is None]
        self.copy_chunk = max(1, chunk * 4)
        read_bytes = max(max_elems * max_in, min(self.copy_chunk, max(copies, default=0)), 1)
        self.host = [torch.empty(read_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.host_mv = [tensor_memoryview(h) for h in self.host]
        self.dev_in = torch.empty(read_bytes, dtype=torch.uint8, device=device) if cuda else None
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.max_elems = max(max_elems, 1)
        self._acc: dict[torch.dtype, torch.Tensor] = {}
        self._conv: dict[torch.dtype, torch.Tensor] = {}
        self._f64: torch.Tensor | None = None
        max_out = max((t.out_dtype.itemsize for t in avg), default=1)
        self.out_host = torch.empty(self.max_elems * max_out, dtype=torch.uint8, pin_memory=cuda)

    def acc(self, dt: torch.dtype) -> torch.Tensor:
        if dt not in self._acc:
            self._acc[dt] = torch.empty(self.max_elems, dtype=dt, device=self.device)
        return self._acc[dt]

    def conv(self, dt: torch.dtype) -> torch.Tensor:
        if dt not in self._conv:
            self._conv[dt] = torch.empty(self.max_elems, dtype=dt, device=self.device)
        return self._conv[dt]

    def f64(self) -> torch.Tensor:
        if self._f64 is None:
            self._f64 = torch.empty(self.max_elems, dtype=torch.float64, device=self.device)
        return self._f64


def run(plan: MergePlan, writer: Any, *, device: str | torch.device = "cpu", progress: bool = False,
        allow_nonfinite: bool = False, chunk_elems: int | None = None) -> EngineStats:
    """Average the plan's tensors into ``writer`` (which must already be open)."""
    dev = resolve_device(device)
    chunk = int(chunk_elems or os.environ.get("CKPTAVG_CHUNK_ELEMS", DEFAULT_CHUNK_ELEMS))
    if chunk < 1:
        raise OptionError("chunk size must be positive")
    t0 = time.perf_counter()
    bufs = _Buffers(plan, dev, chunk)
    stats = EngineStats()
    coeffs = plan.weights.coeffs
    divisor = plan.weights.divisor
    cuda = dev.type == "cuda"

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="averaging",
                   file=sys.stderr, leave=False, dynamic_ncols=True)

    def read(step: _Step, b: int) -> _Step:
        step.ref.read_into(step.byte0, bufs.host_mv[b][: step.nbytes])
        return step

    steps = _schedule(plan, chunk, bufs.copy_chunk)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptavg-read")
    try:
        nxt = next(steps, None)
        fut = pool.submit(read, nxt, 0) if nxt is not None else None
        k = 0
        while fut is not None:
            step = fut.result()
            b = k % 2
            nxt = next(steps, None)
            if nxt is not None:
                ev = bufs.events[1 - b]
                if ev is not None:
                    ev.synchronize()  # the copy out of that buffer must be done before refilling it
                fut = pool.submit(read, nxt, 1 - b)
            else:
                fut = None
            _process(step, b, bufs, writer, coeffs, divisor, cuda, allow_nonfinite, stats)
            stats.bytes_read += step.nbytes
            if bar is not None:
                bar.update(step.nbytes)
            k += 1
    except BaseException:
        if fut is not None:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        for pt in plan.tensors:
            for r in pt.refs:
                r.release()
    stats.bytes_written = getattr(writer, "bytes_written", 0)
    stats.seconds = time.perf_counter() - t0
    return stats


def _typed(buf: torch.Tensor, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    return buf[:nbytes].view(dtype)


def _process(step: _Step, b: int, bufs: _Buffers, writer: Any, coeffs: list[float], divisor: float,
             cuda: bool, allow_nonfinite: bool, stats: EngineStats) -> None:
    pt = step.pt
    if step.kind == "copy":
        writer.write(bufs.host_mv[b][: step.nbytes])
        if step.tensor_done:
            stats.tensors_copied += 1
        return
    ref = step.ref
    n = step.count
    x = _typed(bufs.host[b], step.nbytes, ref.dtype)  # readers hand over native byte order
    if cuda:
        assert bufs.dev_in is not None
        dx = bufs.dev_in[: step.nbytes]
        dx.copy_(bufs.host[b][: step.nbytes], non_blocking=True)
        ev = bufs.events[b]
        assert ev is not None
        ev.record()
        x = dx.view(ref.dtype)
    acc_dt = pt.acc_dtype
    assert acc_dt is not None
    a = bufs.acc(acc_dt)[:n]
    c = coeffs[step.input]
    if step.first:
        if c != 1.0 and x.dtype == acc_dt:
            torch.mul(x, c, out=a)
        else:
            a.copy_(x)
            if c != 1.0:
                a.mul_(c)
    elif x.dtype == acc_dt:
        a.add_(x, alpha=c)
    else:
        tmp = bufs.conv(acc_dt)[:n]
        tmp.copy_(x)
        a.add_(tmp, alpha=c)
    if step.last:
        _finish_chunk(step, a, bufs, writer, divisor, allow_nonfinite)
        if step.tensor_done:
            stats.tensors_averaged += 1
            for r in pt.refs:
                r.release()


def _finish_chunk(step: _Step, a: torch.Tensor, bufs: _Buffers, writer: Any, divisor: float,
                  allow_nonfinite: bool) -> None:
    pt = step.pt
    n = step.count
    if not allow_nonfinite:
        s = a.sum() if not a.dtype.is_complex else a.abs().sum()
        if not math.isfinite(float(s.real if s.is_complex() else s)):
            _explain_nonfinite(step, a)
    od = pt.out_dtype
    src = a
    if divisor != 1.0:
        if a.dtype == torch.float32 and od.itemsize < 4 and not od.is_complex:
            # exact sum of 16/8-bit values in float32; divide in float64 so the final
            # cast is the only rounding (correctly rounded mean)
            f = bufs.f64()[:n]
            f.copy_(a)
            f.div_(divisor)
            src = f
        else:
            a.div_(divisor)
    nbytes = n * od.itemsize
    if src.dtype == od and src.device.type == "cpu":
        writer.write(tensor_memoryview(src))
        return
    out = bufs.out_host[:nbytes].view(od)
    if src.device.type == "cpu":
        out.copy_(src)
    else:
        out.copy_(src.to(od))  # cast on the device, then a synchronous copy to host
    writer.write(tensor_memoryview(out))


def _explain_nonfinite(step: _Step, a: torch.Tensor) -> None:
    """Find which input holds NaN/Inf in this chunk and raise, or accept an overflow."""
    finite = torch.isfinite(a) if not a.is_complex() else torch.isfinite(a.real) & torch.isfinite(a.imag)
    if bool(finite.all()):
        return  # only the check's own sum overflowed
    pt = step.pt
    for ref in pt.refs:
        buf = bytearray(step.count * ref.itemsize)
        ref.read_into(step.elem0 * ref.itemsize, memoryview(buf))
        x = torch.frombuffer(buf, dtype=ref.dtype) if buf else torch.empty(0, dtype=ref.dtype)
        xf = x.to(torch.complex128 if x.is_complex() else torch.float64)
        bad = ~(torch.isfinite(xf.real) & torch.isfinite(xf.imag)) if xf.is_complex() else ~torch.isfinite(xf)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0]) + step.elem0
            pos = _unravel(idx, pt.shape)
            val = xf[idx - step.elem0].item()
            raise NonFiniteError(
                f"{ref.path or 'input'}: tensor {pt.name!r} holds {val} at index {list(pos)}; "
                "pass --allow-nonfinite (allow_nonfinite=True) to average anyway"
            )
    raise NonFiniteError(
        f"tensor {pt.name!r}: the weighted sum overflowed {a.dtype} (inputs are finite); use --accumulate float64"
    )


def _unravel(idx: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(idx % s if s else 0)
        idx //= s if s else 1
    return tuple(reversed(out))

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

import torch

from .errors import NonFiniteError, OptionError
from .io import TensorRef, Writer
from .io.files import tensor_memoryview
from .planner import MergePlan, PlannedTensor

__all__ = ["run", "EngineStats", "DEFAULT_CHUNK_ELEMS", "resolve_device"]

#: elements per chunk at most (float32: 8 MB per buffer); override with CKPTAVG_CHUNK_ELEMS
DEFAULT_CHUNK_ELEMS = 1 << 21
#: elements per block for dtype conversions (fits in a core's cache)
SUB = 1 << 16


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


def _auto_chunk(plan: MergePlan) -> int:
    """Half the largest averaged tensor (so buffers stay ~2x the largest tensor), at least
    256K elements (so per-chunk overhead stays negligible) and at most 2M elements."""
    largest = max((t.numel for t in plan.tensors if t.kind == "average"), default=1)
    return min(DEFAULT_CHUNK_ELEMS, max(1 << 18, -(-largest // 2)))


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
    """Reused buffers: two host read buffers and one accumulator per dtype, all of one
    chunk, plus small scratch blocks for dtype conversion (allocated on first use)."""

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
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self._out: torch.Tensor | None = None
        self.cuda = cuda

    def acc(self, dt: torch.dtype) -> torch.Tensor:
        if dt not in self._acc:
            self._acc[dt] = torch.empty(self.max_elems, dtype=dt, device=self.device)
        return self._acc[dt]

    def scratch(self, dt: torch.dtype) -> torch.Tensor:
        """A block of ``SUB`` elements for conversions (stays in cache)."""
        if dt not in self._scratch:
            self._scratch[dt] = torch.empty(min(SUB, self.max_elems), dtype=dt, device=self.device)
        return self._scratch[dt]

    def out(self, b: int, nbytes: int) -> torch.Tensor:
        """Host bytes for a finished chunk: the just-consumed read buffer when it is large
        enough (it always is unless the output dtype is wider than every input)."""
        if nbytes <= self.host[b].numel():
            return self.host[b][:nbytes]
        if self._out is None or self._out.numel() < nbytes:
            self._out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        return self._out[:nbytes]


def run(plan: MergePlan, writer: Writer, *, device: str | torch.device = "cpu", progress: bool = False,
        allow_nonfinite: bool = False, chunk_elems: int | None = None) -> EngineStats:
    """Average the plan's tensors into ``writer`` (which must already be open)."""
    dev = resolve_device(device)
    chunk = int(chunk_elems or os.environ.get("CKPTAVG_CHUNK_ELEMS", 0)) or _auto_chunk(plan)
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
    # The reader thread keeps one core busy copying file data; torch's own worker
    # threads would then compete for the same cores and (spin-waiting in OpenMP) slow
    # every operation down several-fold. Chunk arithmetic is memory-bound: one thread.
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
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
        torch.set_num_threads(threads)
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


def _process(step: _Step, b: int, bufs: _Buffers, writer: Writer, coeffs: list[float], divisor: float,
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
    if x.dtype == acc_dt:
        if step.first:
            if c == 1.0:
                a.copy_(x)
            else:
                torch.mul(x, c, out=a)
        else:
            a.add_(x, alpha=c)
    else:
        # convert in cache-sized blocks: no chunk-sized temporary
        tmp = bufs.scratch(acc_dt)
        for s0 in range(0, n, SUB):
            m = min(SUB, n - s0)
            if step.first:
                blk = a[s0 : s0 + m]
                blk.copy_(x[s0 : s0 + m])
                if c != 1.0:
                    blk.mul_(c)
            else:
                tmp[:m].copy_(x[s0 : s0 + m])
                a[s0 : s0 + m].add_(tmp[:m], alpha=c)
    if step.last:
        _finish_chunk(step, b, a, bufs, writer, divisor, allow_nonfinite)
        if step.tensor_done:
            stats.tensors_averaged += 1
            for r in pt.refs:
                r.release()


def _finish_chunk(step: _Step, b: int, a: torch.Tensor, bufs: _Buffers, writer: Writer, divisor: float,
                  allow_nonfinite: bool) -> None:
    pt = step.pt
    n = step.count
    if not allow_nonfinite:
        s = a.sum() if not a.dtype.is_complex else a.abs().sum()
        if not math.isfinite(float(s.real if s.is_complex() else s)):
            _explain_nonfinite(step, a)
    od = pt.out_dtype
    exact16 = divisor != 1.0 and a.dtype == torch.float32 and od.itemsize < 4 and not od.is_complex
    if divisor != 1.0 and not exact16:
        a.div_(divisor)
    if a.dtype == od and not bufs.cuda:
        writer.write(tensor_memoryview(a))
        return
    out = bufs.out(b, n * od.itemsize).view(od)
    if exact16:
        # The float32 sum of 16/8-bit values is exact; divide in float64 so that the cast
        # to the output dtype is the only rounding (the correctly rounded mean).
        f = bufs.scratch(torch.float64)
        for s0 in range(0, n, SUB):
            m = min(SUB, n - s0)
            f[:m].copy_(a[s0 : s0 + m])
            f[:m].div_(divisor)
            out[s0 : s0 + m].copy_(f[:m])
    elif bufs.cuda:
        out.copy_(a.to(od) if a.dtype != od else a)  # cast on the device, synchronous copy to host
    else:
        out.copy_(a)
    if not allow_nonfinite and od.is_floating_point and od.itemsize < a.dtype.itemsize:
        _check_cast(step, out)
    writer.write(tensor_memoryview(out))


def _check_cast(step: _Step, out: torch.Tensor) -> None:
    """The average must also fit the (narrower) output dtype: overflow to inf is an error."""
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0]) + step.elem0
        pos = _unravel(idx, step.pt.shape)
        raise NonFiniteError(
            f"tensor {step.pt.name!r}: the average at index {list(pos)} overflows "
            f"{str(out.dtype).removeprefix('torch.')} (the output dtype); choose a wider --dtype, or pass "
            "--allow-nonfinite (allow_nonfinite=True) to write inf"
        )


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

"""Stream-average: compute ``sum_i w_i * theta_i`` chunk by chunk, for one or several weight vectors.

The output is cut into *units* of at most ``chunk_elems`` averaged elements: a slice of one
large tensor, or many consecutive small tensors packed together (so that a model of 100,000
tiny tensors costs a few hundred Python operations, not a few per tensor). Integer and bool
tensors ride along in the same units: their bytes are copied from the last selected
checkpoint, not averaged.

Three threads work on consecutive units at the same time:

* the **reader** reads each active input's bytes of a unit with ``preadv`` (neighbouring
  tensors of a file in one call) into one of three reused buffers, after asking the kernel
  to read ahead the unit that comes next (``posix_fadvise`` ``WILLNEED``);
* the **main thread** adds each input's chunk into one accumulator per output (float32, or
  float64 for float64 inputs and for 16-bit inputs, whose sums are then exact), and when the
  last input is in, finishes each output's chunk (divisor, one cast to the output dtype,
  checks for non-finite values and for overflow of a narrower output dtype);
* the **writer** hands the finished chunks to the writers, in plan order; the files flush
  what was written as they go (:class:`~ckptavg.io.files.AtomicFile`), so the final fsync
  has little left to do.

Each input chunk is read once, however many outputs there are (``weights``: one weight
vector per output); inputs whose weight is 0 in every output are not read at all. Memory is
bounded by a handful of chunk-sized buffers (three read buffers; per output one accumulator,
or two where the accumulator itself is written, and two output buffers for casts), whatever the
number of inputs or the model size; nothing is memory-mapped, so the page cache does not count
against the process.

CUDA (``device="cuda"``) uses the same code: the read buffers are pinned, each chunk is
copied to the device with ``non_blocking=True`` and accumulated there; a CUDA event per read
buffer makes the reader wait until the copy out of that buffer has finished.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NonFiniteError, OptionError
from .io import TensorRef, Writer
from .io.files import tensor_memoryview
from .planner import MergePlan, PlannedTensor
from .weights import Weights

__all__ = ["run", "EngineStats", "DEFAULT_CHUNK_ELEMS", "resolve_device", "accumulator_dtype"]

#: elements per chunk at most (float32: 8 MB per buffer); override with CKPTAVG_CHUNK_ELEMS
DEFAULT_CHUNK_ELEMS = 1 << 21
#: elements per block for dtype conversions (fits in a core's cache)
SUB = 1 << 16
#: read buffers the reader rotates through (it can run this many minus one inputs ahead)
N_READ = 3
#: bytes of unrelated file data read through (into a scratch buffer) to join two reads into one
MAX_GAP = 4096


@dataclass
class EngineStats:
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    tensors_averaged: int = 0
    tensors_copied: int = 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate a device option (``cpu``, ``cuda``, ``cuda:N``).

    Example::

        resolve_device("cpu")  # torch.device("cpu")
    """
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


def accumulator_dtype(pt: PlannedTensor) -> torch.dtype:
    """The dtype a tensor is accumulated in: the plan's choice, widened to float64 when every
    input is a 16-bit float (float64 holds their weighted sums exactly in all practical
    cases, so a uniform mean is correctly rounded even under cancellation).

    Example::

        accumulator_dtype(plan.tensors[0])  # torch.float64 for bf16 inputs
    """
    acc = pt.acc_dtype
    assert acc is not None
    if acc == torch.float32 and all(r.dtype in (torch.float16, torch.bfloat16) for r in pt.refs):
        return torch.float64
    return acc


def _auto_chunk(plan: MergePlan) -> int:
    """Half the largest averaged tensor (so buffers stay ~2x the largest tensor), at least
    256K elements (so per-chunk overhead stays negligible) and at most 2M elements (1M with a
    float64 accumulator: 8 MB per accumulator either way)."""
    avg = [t for t in plan.tensors if t.kind == "average"]
    largest = max((t.numel for t in avg), default=1)
    wide = any(accumulator_dtype(t).itemsize > 4 for t in avg)
    return min(DEFAULT_CHUNK_ELEMS // (2 if wide else 1), max(1 << 18, -(-largest // 2)))


# ------------------------------------------------------------------------------------------
# The schedule: units of packed segments, and the reads that fill them
# ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Unit:
    """A piece of the output stream: averaged segments (packed in the accumulator, all of one
    dtype signature) and copied segments (packed in a copy buffer), in plan order."""

    key: tuple | None = None  # (input dtypes, accumulator dtype, output dtype) of the averaged part
    avg: list[tuple[int, int, int, int]] = field(default_factory=list)  # (tensor, elem0, count, acc offset)
    copy: list[tuple[int, int, int, int]] = field(default_factory=list)  # (tensor, byte0, nbytes, buffer offset)
    n: int = 0  # averaged elements
    copy_bytes: int = 0
    pieces: list[tuple[bool, int, int]] = field(default_factory=list)  # (from copy buffer, lo, hi) in order
    done: list[int] = field(default_factory=list)  # tensors whose last bytes are in this unit
    averaged: int = 0
    copied: int = 0

    def add_piece(self, is_copy: bool, lo: int, hi: int) -> None:
        if self.pieces and self.pieces[-1][0] == is_copy and self.pieces[-1][2] == lo:
            self.pieces[-1] = (is_copy, self.pieces[-1][1], hi)
        else:
            self.pieces.append((is_copy, lo, hi))


def _schedule(plan: MergePlan, chunk: int, copy_cap: int, acc_of: list[torch.dtype | None],
              numels: list[int]) -> Iterator[_Unit]:
    u = _Unit()
    for j, pt in enumerate(plan.tensors):
        numel = numels[j]
        if pt.alias_of is not None or numel == 0:
            continue
        if pt.kind == "copy":
            total = pt.refs[-1].nbytes
            if u.copy_bytes + total > copy_cap and (u.n or u.copy_bytes):
                yield u
                u = _Unit()
            b0 = 0
            while b0 < total:
                n = min(copy_cap - u.copy_bytes, total - b0)
                u.copy.append((j, b0, n, u.copy_bytes))
                u.add_piece(True, u.copy_bytes, u.copy_bytes + n)
                u.copy_bytes += n
                b0 += n
                if b0 >= total:
                    u.done.append(j)
                    u.copied += 1
                if u.copy_bytes >= copy_cap:
                    yield u
                    u = _Unit()
            continue
        acc = acc_of[j]
        assert acc is not None
        key = (tuple(r.dtype for r in pt.refs), acc, pt.out_dtype)
        if (u.key is not None and u.key != key) or (u.n and u.n + numel > chunk):
            yield u
            u = _Unit()
        e0 = 0
        osz = pt.out_dtype.itemsize
        while e0 < numel:
            n = min(chunk - u.n, numel - e0)
            u.key = key
            u.avg.append((j, e0, n, u.n))
            u.add_piece(False, u.n * osz, (u.n + n) * osz)
            u.n += n
            e0 += n
            if e0 >= numel:
                u.done.append(j)
                u.averaged += 1
            if u.n >= chunk:
                yield u
                u = _Unit()
    if u.n or u.copy_bytes:
        yield u


def _runs(parts: list[tuple[TensorRef, int, int, int]]) -> list[tuple[Any, int, list[tuple[int, int]]]]:
    """Group (ref, byte start in the tensor, nbytes, buffer offset) reads into file runs: one
    ``preadv`` each, with short gaps of unrelated bytes read into a scratch buffer. Returns
    (InputFile or TensorRef, file offset or byte start, [(buffer offset or -gap, nbytes)])."""
    runs: list[tuple[Any, int, list[tuple[int, int]]]] = []
    end = -1
    cur_file = None
    for ref, start, n, dst in parts:
        if not ref.direct:
            runs.append((ref, start, [(dst, n)]))
            cur_file = None
            continue
        off = ref.offset + start
        if cur_file is ref.file and 0 <= off - end <= MAX_GAP and len(runs[-1][2]) < 500:
            iov = runs[-1][2]
            if off > end:
                iov.append((-1, off - end))
            iov.append((dst, n))
        else:
            runs.append((ref.file, off, [(dst, n)]))
            cur_file = ref.file
        end = off + n
    return runs


# ------------------------------------------------------------------------------------------
# Buffers
# ------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside a helper thread when the merge is being abandoned."""


class _Pool:
    """A fixed set of reusable buffers; :meth:`get` blocks until one is free."""

    def __init__(self, make: Any, count: int, stop: threading.Event) -> None:
        self._make = make
        self._made = 0
        self._count = count
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = stop

    def get(self) -> Any:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._count:
            self._made += 1
            return self._make()
        while True:
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stop() from None

    def put(self, buf: Any) -> None:
        self._free.put(buf)


@dataclass(eq=False)
class _Output:
    writer: Writer
    coeffs: list[float]
    divisor: float
    first: int  # first input with a non-zero weight
    accs: dict[torch.dtype, _Pool] = field(default_factory=dict)
    outs: _Pool | None = None
    cur: torch.Tensor | None = None  # accumulator of the unit in progress


# ------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------


def run(plan: MergePlan, writers: Writer | Sequence[Writer], *, weights: Sequence[Weights] | None = None,
        device: str | torch.device = "cpu", progress: bool = False, allow_nonfinite: bool = False,
        chunk_elems: int | None = None) -> EngineStats:
    """Average the plan's tensors into ``writers`` (open, not yet committed), one output per
    weight vector of ``weights`` (default: the plan's own), reading every input chunk once.

    Example::

        w1 = open_writer("safetensors", Path("swa.safetensors"), plan.entries())
        w2 = open_writer("safetensors", Path("ema.safetensors"), plan.entries())
        run(plan, [w1, w2], weights=[plan.weights, ema(len(plan.inputs), 0.9)])
        w1.commit(); w2.commit()
    """
    ws: list[Writer] = [writers] if isinstance(writers, Writer) else list(writers)  # type: ignore[list-item]
    wts = list(weights) if weights is not None else [plan.weights]
    if len(wts) != len(ws) or not ws:
        raise OptionError(f"{len(ws)} output(s) but {len(wts)} weight vector(s); give one weight vector per output")
    n_in = len(plan.inputs)
    for w in wts:
        if len(w.coeffs) != n_in:
            raise OptionError(f"a weight vector has {len(w.coeffs)} values but {n_in} checkpoints are selected")
        if not any(c != 0 for c in w.coeffs):
            raise OptionError("a weight vector is all zeros")
    dev = resolve_device(device)
    chunk = int(chunk_elems or os.environ.get("CKPTAVG_CHUNK_ELEMS", 0)) or _auto_chunk(plan)
    if chunk < 1:
        raise OptionError("chunk size must be positive")
    t0 = time.perf_counter()
    cuda = dev.type == "cuda"
    active = [i for i in range(n_in) if any(w.coeffs[i] != 0 for w in wts)]
    acc_of = [accumulator_dtype(pt) if pt.kind == "average" else None for pt in plan.tensors]

    # buffer sizes
    numels = [t.numel for t in plan.tensors]
    avg = [(j, t) for j, t in enumerate(plan.tensors) if t.kind == "average" and t.alias_of is None and numels[j]]
    total_avg = sum(numels[j] for j, _ in avg)
    max_elems = max(1, min(chunk, total_avg))
    max_in = max((r.itemsize for _, t in avg for r in t.refs), default=1)
    max_out = max((t.out_dtype.itemsize for _, t in avg), default=1)
    copy_total = sum(t.refs[-1].nbytes for t in plan.tensors if t.kind == "copy" and t.alias_of is None)
    copy_cap = max(1, chunk * 4)
    read_bytes = max(1, max_elems * max_in)

    stop = threading.Event()
    host = [torch.empty(read_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(N_READ)]
    host_mv = [tensor_memoryview(h) for h in host]
    events = [torch.cuda.Event() if cuda else None for _ in range(N_READ)]
    dev_in = torch.empty(read_bytes, dtype=torch.uint8, device=dev) if cuda else None
    copy_size = max(1, min(copy_cap, copy_total))
    copies = _Pool(lambda: torch.empty(copy_size, dtype=torch.uint8), 2, stop)
    outs: list[_Output] = []
    for w, wt in zip(ws, wts):
        o = _Output(w, list(wt.coeffs), float(wt.divisor), next(i for i, c in enumerate(wt.coeffs) if c != 0))
        o.outs = _Pool(lambda: torch.empty(max_elems * max_out, dtype=torch.uint8, pin_memory=cuda), 2, stop)
        outs.append(o)
    scratch: dict[torch.dtype, torch.Tensor] = {}

    def scratch_of(dt: torch.dtype) -> torch.Tensor:
        if dt not in scratch:
            scratch[dt] = torch.empty(min(SUB, max_elems), dtype=dt, device=dev)
        return scratch[dt]

    # an accumulator is handed to the writer (so a second one is needed meanwhile) only when it
    # already has the output dtype; otherwise the cast goes to an output buffer
    handed = set() if cuda else {acc_of[j] for j, t in avg if acc_of[j] == t.out_dtype}

    def acc_pool(o: _Output, dt: torch.dtype) -> _Pool:
        if dt not in o.accs:
            o.accs[dt] = _Pool(lambda: torch.empty(max_elems, dtype=dt, device=dev), 2 if dt in handed else 1, stop)
        return o.accs[dt]

    stats = EngineStats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="averaging",
                   file=sys.stderr, leave=False, dynamic_ncols=True)

    ready: queue.Queue[Any] = queue.Queue()
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for b in range(N_READ):
        free.put(b)
    jobs: queue.Queue[Any] = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    # -- reader thread ------------------------------------------------------------------
    def reader() -> None:
        gap = memoryview(bytearray(MAX_GAP))
        try:
            units = _schedule(plan, chunk, copy_cap, acc_of, numels)
            cur = next(units, None)
            while cur is not None:
                nxt = next(units, None)
                if nxt is not None:
                    _advise(plan, nxt, active)
                if cur.copy:
                    cbuf = copies.get()
                    cmv = tensor_memoryview(cbuf)
                    parts = [(plan.tensors[j].refs[-1], b0, n, dst) for j, b0, n, dst in cur.copy]
                    _read_runs(_runs(parts), cmv, gap)
                    ready.put(("copy", cur, cbuf))
                for k, i in enumerate(active):
                    if not cur.avg:
                        break
                    b = _take(free, stop)
                    ev = events[b]
                    if ev is not None:
                        ev.synchronize()  # the copy out of this buffer must be done before refilling it
                    isz = cur.key[0][i].itemsize if cur.key else 1
                    parts = [(plan.tensors[j].refs[i], e0 * isz, n * isz, off * isz) for j, e0, n, off in cur.avg]
                    _read_runs(_runs(parts), host_mv[b], gap)
                    ready.put(("avg", cur, i, b, k == len(active) - 1))
                cur = nxt
            ready.put(("end",))
        except _Stop:
            return
        except BaseException as e:  # handed to the main thread, which raises it
            ready.put(("error", e))

    # -- writer thread ------------------------------------------------------------------
    def writer_loop() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            pieces, release = job
            try:
                if not failure and not stop.is_set():
                    for w, mvs in pieces:
                        for mv in mvs:
                            w.write(mv)
            except BaseException as e:
                failure.append(e)
            finally:
                for pool, buf in release:
                    pool.put(buf)

    def submit(job: Any) -> None:
        while True:
            if failure:
                raise failure[0]
            try:
                jobs.put(job, timeout=0.05)
                return
            except queue.Full:
                continue

    threads = torch.get_num_threads()
    if not cuda:
        # The reader and writer threads keep a core busy copying file data; torch's own worker
        # threads would then compete for the same cores and (spin-waiting in OpenMP) slow every
        # operation down several-fold. Chunk arithmetic is memory-bound: one thread.
        torch.set_num_threads(1)
    rt = threading.Thread(target=reader, name="ckptavg-read", daemon=True)
    wt = threading.Thread(target=writer_loop, name="ckptavg-write", daemon=True)
    rt.start()
    wt.start()
    ok = False
    try:
        pending_copy: torch.Tensor | None = None
        while True:
            item = ready.get()
            tag = item[0]
            if tag == "end":
                break
            if tag == "error":
                raise item[1]
            unit: _Unit = item[1]
            if tag == "copy":
                pending_copy = item[2]
                stats.bytes_read += unit.copy_bytes
                if bar is not None:
                    bar.update(unit.copy_bytes)
                if unit.avg:
                    continue
                _emit(unit, outs, pending_copy, None, copies, submit)
                pending_copy = None
            else:
                _, _, i, b, last = item
                _accumulate(plan, unit, i, b, host, dev_in, events, outs, acc_pool, scratch_of)
                free.put(b)
                nb = unit.n * unit.key[0][i].itemsize  # type: ignore[index]
                stats.bytes_read += nb
                if bar is not None:
                    bar.update(nb)
                if not last:
                    continue
                finished = [_finish(plan, unit, o, acc_pool, cuda, allow_nonfinite, scratch_of) for o in outs]
                _emit(unit, outs, pending_copy, finished, copies, submit)
                pending_copy = None
            stats.tensors_averaged += unit.averaged
            stats.tensors_copied += unit.copied
            for j in unit.done:
                for r in plan.tensors[j].refs:
                    r.release()
        jobs.put(None)
        wt.join()
        if failure:
            raise failure[0]
        ok = True
    finally:
        if not ok:
            stop.set()
            while True:  # let a blocked writer thread finish its job and see the end
                try:
                    jobs.put(None, timeout=0.05)
                    break
                except queue.Full:
                    if not wt.is_alive():
                        break
            wt.join(timeout=60)
        rt.join(timeout=60)
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
        for pt in plan.tensors:
            for r in pt.refs:
                r.release()
    stats.bytes_written = sum(getattr(w, "bytes_written", 0) for w in ws)
    stats.seconds = time.perf_counter() - t0
    return stats


def _take(free: queue.SimpleQueue[int], stop: threading.Event) -> int:
    while True:
        try:
            return free.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                raise _Stop() from None


def _advise(plan: MergePlan, unit: _Unit, active: list[int]) -> None:
    """Ask the kernel to start reading the unit's byte ranges of every input (read-ahead)."""
    spans: dict[Any, list[int]] = {}
    for j, e0, n, _ in unit.avg:
        for i in active:
            r = plan.tensors[j].refs[i]
            if r.direct:
                lo, hi = r.offset + e0 * r.itemsize, r.offset + (e0 + n) * r.itemsize
                s = spans.setdefault(r.file, [lo, hi])
                s[0], s[1] = min(s[0], lo), max(s[1], hi)
    for j, b0, n, _ in unit.copy:
        r = plan.tensors[j].refs[-1]
        if r.direct:
            s = spans.setdefault(r.file, [r.offset + b0, r.offset + b0 + n])
            s[0], s[1] = min(s[0], r.offset + b0), max(s[1], r.offset + b0 + n)
    for f, (lo, hi) in spans.items():
        f.advise_willneed(lo, hi - lo)


def _read_runs(runs: list[tuple[Any, int, list[tuple[int, int]]]], mv: memoryview, gap: memoryview) -> None:
    for src, off, iov in runs:
        if isinstance(src, TensorRef):
            dst, n = iov[0]
            src.read_into(off, mv[dst : dst + n])
            continue
        src.preadv_into([mv[d : d + n] if d >= 0 else gap[:n] for d, n in iov], off)


def _accumulate(plan: MergePlan, unit: _Unit, i: int, b: int, host: list[torch.Tensor], dev_in: torch.Tensor | None,
                events: list[Any], outs: list[_Output], acc_pool: Any, scratch_of: Any) -> None:
    """Add input ``i``'s chunk (in read buffer ``b``) into every output's accumulator."""
    assert unit.key is not None
    in_dt, acc_dt, _ = unit.key
    dt = in_dt[i]
    n = unit.n
    nbytes = n * dt.itemsize
    x = host[b][:nbytes].view(dt)  # readers hand over native byte order
    if dev_in is not None:
        dx = dev_in[:nbytes]
        dx.copy_(host[b][:nbytes], non_blocking=True)
        ev = events[b]
        ev.record()
        x = dx.view(dt)
    todo = []
    for o in outs:
        c = o.coeffs[i]
        if c == 0:
            continue
        if o.first == i:
            o.cur = acc_pool(o, acc_dt).get()
        assert o.cur is not None
        todo.append((o.cur[:n], c, o.first == i))
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
    # convert in cache-sized blocks (once for all outputs): no chunk-sized temporary
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


def _finish(plan: MergePlan, unit: _Unit, o: _Output, acc_pool: Any, cuda: bool, allow_nonfinite: bool,
            scratch_of: Any) -> tuple[torch.Tensor, list[tuple[_Pool, Any]]]:
    """Divide, cast and check one output's chunk; returns the bytes to write and the buffers
    to give back once they are written."""
    assert unit.key is not None and o.cur is not None
    _, acc_dt, od = unit.key
    n = unit.n
    full = o.cur
    a = full[:n]
    o.cur = None
    pool = acc_pool(o, acc_dt)
    divisor = o.divisor
    if not allow_nonfinite:
        s = a.sum() if not a.dtype.is_complex else a.abs().sum()
        if not math.isfinite(float(s.real if s.is_complex() else s)):
            _explain_nonfinite(plan, unit, a)
    exact16 = divisor != 1.0 and a.dtype == torch.float32 and od.itemsize < 4 and not od.is_complex
    if divisor != 1.0 and not exact16:
        a.div_(divisor)
    if a.dtype == od and not cuda:
        return a, [(pool, full)]  # the accumulator itself is written, then reused
    assert o.outs is not None
    obuf = o.outs.get()
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
    pool.put(full)
    if not allow_nonfinite and od.is_floating_point and od.itemsize < a.dtype.itemsize:
        _check_cast(plan, unit, out)
    return out, [(o.outs, obuf)]


def _emit(unit: _Unit, outs: list[_Output], cbuf: torch.Tensor | None,
          finished: list[tuple[torch.Tensor, list[tuple[_Pool, Any]]]] | None, copies: _Pool, submit: Any) -> None:
    """Queue one unit's bytes, for every output, for the writer thread."""
    cmv = tensor_memoryview(cbuf) if cbuf is not None else None
    pieces = []
    release: list[tuple[_Pool, Any]] = []
    for m, o in enumerate(outs):
        amv = None
        if finished is not None:
            t, rel = finished[m]
            amv = tensor_memoryview(t)
            release += rel
        mvs = []
        for is_copy, lo, hi in unit.pieces:
            src = cmv if is_copy else amv
            assert src is not None
            mvs.append(src[lo:hi])
        pieces.append((o.writer, mvs))
    if cbuf is not None:
        release.append((copies, cbuf))
    submit((pieces, release))


def _segment_at(plan: MergePlan, unit: _Unit, idx: int) -> tuple[PlannedTensor, int, int, int]:
    """The averaged segment holding element ``idx`` of the unit: (tensor, elem0, count, offset)."""
    for j, e0, n, off in unit.avg:
        if off <= idx < off + n:
            return plan.tensors[j], e0, n, off
    raise AssertionError("index outside the unit")


def _check_cast(plan: MergePlan, unit: _Unit, out: torch.Tensor) -> None:
    """The average must also fit the (narrower) output dtype: overflow to inf is an error."""
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        pt, e0, _, off = _segment_at(plan, unit, k)
        pos = _unravel(k - off + e0, pt.shape)
        raise NonFiniteError(
            f"tensor {pt.name!r}: the average at index {list(pos)} overflows "
            f"{str(out.dtype).removeprefix('torch.')} (the output dtype); choose a wider --dtype, or pass "
            "--allow-nonfinite (allow_nonfinite=True) to write inf"
        )


def _explain_nonfinite(plan: MergePlan, unit: _Unit, a: torch.Tensor) -> None:
    """Find which input holds NaN/Inf in this chunk and raise, or accept an overflow."""
    finite = torch.isfinite(a) if not a.is_complex() else torch.isfinite(a.real) & torch.isfinite(a.imag)
    if bool(finite.all()):
        return  # only the check's own sum overflowed
    k = int((~finite).nonzero()[0, 0])
    pt, e0, count, _ = _segment_at(plan, unit, k)
    for ref in pt.refs:
        buf = bytearray(count * ref.itemsize)
        ref.read_into(e0 * ref.itemsize, memoryview(buf))
        x = torch.frombuffer(buf, dtype=ref.dtype) if buf else torch.empty(0, dtype=ref.dtype)
        xf = x.to(torch.complex128 if x.is_complex() else torch.float64)
        bad = ~(torch.isfinite(xf.real) & torch.isfinite(xf.imag)) if xf.is_complex() else ~torch.isfinite(xf)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0]) + e0
            pos = _unravel(idx, pt.shape)
            val = xf[idx - e0].item()
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

"""Stream-average: compute ``sum_i w_i * theta_i`` chunk by chunk, for one or several weight vectors.

The output is cut into *units* of at most ``chunk_elems`` averaged elements: a slice of one
large tensor, or many consecutive small tensors packed together (so that a model of 100,000
tiny tensors costs a few hundred Python operations, not a few per tensor). Integer and bool
tensors ride along in the same units: their bytes are copied from the last selected
checkpoint, not averaged.

Threads work on consecutive units at the same time:

* a **dispenser** hands the units out in plan order, each with every buffer it will need,
  and asks the kernel to read ahead the units that come next (``posix_fadvise``
  ``WILLNEED``), so interleaving N files stays a sequential read of each;
* **workers** (one per core, at most four: :func:`worker_count`) each take a whole unit and,
  block by block (128K elements, so the block and its part of the accumulator stay in the
  core's cache between the read and the add), read every active input's bytes with
  ``preadv`` (neighbouring tensors of a file in one call) and add them into one accumulator
  per output (float32, or float64 for float64 inputs and for 16-bit inputs, whose sums are
  then exact); then they finish the unit (divisor, one cast to the output dtype, checks for
  non-finite values and for overflow of a narrower output dtype);
* the **writer** hands the finished units to the writers in plan order; the files flush what
  was written as they go (:class:`~ckptavg.io.files.AtomicFile`), so the final fsync has
  little left to do.

Reading from the page cache is a memory copy that one core does at a few GB/s: that, not the
arithmetic, is the cost of a warm merge, so it is spread over the workers. The sums are the
same, element for element and in the same order, whatever the number of workers; the first
error in plan order is the one reported.

Each input chunk is read once, however many outputs there are (``weights``: one weight
vector per output); inputs whose weight is 0 in every output are not read at all. Memory is
bounded by a handful of chunk-sized buffers (per output one accumulator per unit in flight,
that is workers + 1, plus cast buffers where the output dtype differs), whatever the number
of inputs or the model size; nothing is memory-mapped, so the page cache does not count
against the process.

CUDA (``device="cuda"``) uses the same code: each worker reads whole chunks into two pinned
buffers in turn, copies each to the device with ``non_blocking=True`` and accumulates there;
a CUDA event per buffer makes the worker wait until the copy out of it has finished.
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

__all__ = ["run", "EngineStats", "DEFAULT_CHUNK_ELEMS", "resolve_device", "accumulator_dtype", "worker_count"]

#: elements per chunk at most (float32: 8 MB per buffer); override with CKPTAVG_CHUNK_ELEMS
DEFAULT_CHUNK_ELEMS = 1 << 21
#: elements per block for dtype conversions (fits in a core's cache)
SUB = 1 << 16
#: elements of one input read and added at a time on the CPU: the block (512 KiB of float32)
#: and its part of the accumulator stay in a core's L2 cache between the read and the add
#: (measured here on the reference case: 1.15 s with 512 KiB blocks, 1.6-1.85 s with 256 KiB,
#: and reads of 8 MiB ran at two thirds the speed of 512 KiB ones)
BLOCK_ELEMS = 1 << 17
#: worker threads at most (reading scales with cores until memory bandwidth runs out)
MAX_WORKERS = 4
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


def _auto_chunk(plan: MergePlan, workers: int = 1) -> int:
    """Half the largest averaged tensor, at least 256K elements (so per-chunk overhead stays
    negligible) and at most 2M elements (1M with a float64 accumulator: 8 MB per accumulator
    either way) for up to two workers, less beyond (each worker has a chunk in flight, so
    memory stays about the same: 1.2M elements with four)."""
    avg = [t for t in plan.tensors if t.kind == "average"]
    largest = max((t.numel for t in avg), default=1)
    wide = any(accumulator_dtype(t).itemsize > 4 for t in avg)
    cap = min(DEFAULT_CHUNK_ELEMS, DEFAULT_CHUNK_ELEMS * 3 // (workers + 1)) // (2 if wide else 1)
    return min(cap, max(1 << 18, -(-largest // 2)))


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
# Buffers and the shared state of one run
# ------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside a helper thread when the merge is being abandoned."""


class _Control:
    """Failures and cancellation shared by the threads of one run.

    A failure in unit ``k`` (a NaN, a short file) cancels the units after ``k`` but lets the
    units before it finish, so the error reported is the first one in plan order, as in a
    sequential run; a failure of the output (disk full) or an interrupt stops everything."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.limit = math.inf  # units from this index on are not started
        self.errors: list[tuple[float, int, BaseException]] = []

    def fail(self, idx: float, exc: BaseException, *, hard: bool = False) -> None:
        with self.lock:
            self.errors.append((idx, len(self.errors), exc))
            self.limit = min(self.limit, idx)
        if hard:
            self.stop.set()

    def cancelled(self, idx: float) -> bool:
        return self.stop.is_set() or idx >= self.limit

    def first_error(self) -> BaseException | None:
        with self.lock:
            return min(self.errors, key=lambda e: e[:2])[2] if self.errors else None


class _Crew:
    """The threads of one run, each counting itself out when its function has returned.

    Waiting is done on this count, never with ``Thread.join`` while Ctrl-C can arrive: before
    Python 3.13 a join interrupted by KeyboardInterrupt marks the thread it waited for as
    finished although it still runs (bpo-45274's fix), so a later join returns at once, the interpreter
    starts its teardown under a thread still freeing tensors, and the process aborts
    ("terminate called without an active exception") instead of exiting with status 130."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._running = 0
        self._threads: list[threading.Thread] = []

    def start(self, name: str, fn: Any, then: Any = None) -> None:
        """Run ``fn`` on a new thread; ``then`` runs on it afterwards, however ``fn`` ended."""
        def body() -> None:
            try:
                fn()
            finally:
                if then is not None:
                    then()
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

        t = threading.Thread(target=body, name=name, daemon=True)
        with self._cv:
            self._running += 1
        self._threads.append(t)
        t.start()

    def _counted_out(self, deadline: float = math.inf) -> None:
        with self._cv:
            while self._running > 0 and time.monotonic() < deadline:
                self._cv.wait(0.1)

    def wait(self) -> None:
        """Until every thread has counted itself out (Ctrl-C interrupts this wait safely), then
        join each: a thread still drops references after counting itself out, and freeing a
        tensor once the interpreter's teardown has begun aborts the process."""
        self._counted_out()
        for t in self._threads:
            t.join()

    def end(self, timeout: float = 60.0) -> None:
        """After a failure or an interrupt (the threads told to stop): wait for them, with a
        further Ctrl-C or SIGTERM held back until they have ended or ``timeout`` has passed,
        then join each (at once now: it only lets the thread's interpreter state go)."""
        deadline = time.monotonic() + timeout
        held: BaseException | None = None
        while True:
            try:
                self._counted_out(deadline)
                for t in self._threads:
                    t.join(max(0.0, deadline - time.monotonic()))
                break
            except BaseException as e:  # only a signal handler's exception can arrive here
                held = held or e
        if held is not None:
            raise held


class _Pool:
    """A fixed number of reusable buffers, made on first need; :meth:`get` blocks until one
    is free (or the unit asking is cancelled)."""

    def __init__(self, make: Any, count: int) -> None:
        self._make = make
        self._made = 0
        self._count = count
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def get(self, ctl: _Control, idx: int) -> Any:
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
                if ctl.cancelled(idx):
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


@dataclass(eq=False)
class _Job:
    """One unit on its way through a worker to the writer, with the buffers it holds."""

    idx: int
    unit: _Unit
    cbuf: torch.Tensor | None = None  # copied bytes
    accs: list[torch.Tensor] = field(default_factory=list)  # per output
    obufs: list[torch.Tensor | None] = field(default_factory=list)  # per output, when cast
    pieces: list[tuple[Writer, list[memoryview]]] = field(default_factory=list)
    release: list[tuple[_Pool, Any]] = field(default_factory=list)
    nread: int = 0


class _Dispenser:
    """Hands out the units in plan order, each with every buffer it will need (taken here, in
    order, so the lowest unit in flight can always finish and the writer always progresses),
    and asks the kernel to read ahead the units that come next."""

    def __init__(self, units: Iterator[_Unit], ahead: int, acquire: Any, advise: Any, ctl: _Control) -> None:
        self._units = units
        self._queue: list[_Unit] = []
        self._ahead = ahead
        self._acquire = acquire
        self._advise = advise
        self._ctl = ctl
        self._lock = threading.Lock()
        self._next = 0
        self._exhausted = False

    @property
    def position(self) -> int:
        return self._next

    def _fill(self, n: int) -> None:
        while len(self._queue) < n and not self._exhausted:
            u = next(self._units, None)
            if u is None:
                self._exhausted = True
                return
            self._queue.append(u)
            self._advise(u)

    def take(self) -> _Job | None:
        with self._lock:
            idx = self._next
            if self._ctl.cancelled(idx):
                return None
            self._fill(self._ahead + 1)
            if not self._queue:
                return None
            job = _Job(idx, self._queue[0])
            self._acquire(job)  # may block until the writer gives buffers back
            self._queue.pop(0)
            self._next += 1
            return job


# ------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------


def worker_count() -> int:
    """Threads that read and accumulate at the same time: one per core, at most 4 (reading
    from the page cache is a memory copy that one core does at a few GB/s); under torchrun the
    cores are shared among the node's ranks (``LOCAL_WORLD_SIZE``). ``CKPTAVG_WORKERS``
    overrides.

    Example::

        worker_count()  # 2 on a 2-core machine
    """
    env = os.environ.get("CKPTAVG_WORKERS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise OptionError(f"CKPTAVG_WORKERS must be a positive integer; got {env!r}") from None
        if n < 1:
            raise OptionError(f"CKPTAVG_WORKERS must be a positive integer; got {env!r}")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, min(MAX_WORKERS, cores // ranks))


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
    n_workers = worker_count()
    chunk = int(chunk_elems or os.environ.get("CKPTAVG_CHUNK_ELEMS", 0)) or _auto_chunk(plan, n_workers)
    if chunk < 1:
        raise OptionError("chunk size must be positive")
    t0 = time.perf_counter()
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # the caller's; workers are other threads
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
    # On the CPU each input is read and added in blocks that stay in a core's cache; a GPU
    # gets whole chunks (few large host-to-device copies).
    block = max_elems if cuda else min(max_elems, BLOCK_ELEMS)

    ctl = _Control()
    in_flight = n_workers + 1  # units computing, plus one being written
    copy_size = max(1, min(copy_cap, copy_total))
    copies = _Pool(lambda: torch.empty(copy_size, dtype=torch.uint8), in_flight)
    outs: list[_Output] = []
    for w, wt in zip(ws, wts):
        o = _Output(w, list(wt.coeffs), float(wt.divisor), next(i for i, c in enumerate(wt.coeffs) if c != 0))
        o.outs = _Pool(lambda: torch.empty(max_elems * max_out, dtype=torch.uint8, pin_memory=cuda), in_flight)
        outs.append(o)

    def acc_pool(o: _Output, dt: torch.dtype) -> _Pool:
        if dt not in o.accs:
            o.accs[dt] = _Pool(lambda: torch.empty(max_elems, dtype=dt, device=dev), in_flight)
        return o.accs[dt]

    def acquire(job: _Job) -> None:
        u = job.unit
        if u.copy:
            job.cbuf = copies.get(ctl, job.idx)
        if u.avg:
            assert u.key is not None
            _, acc_dt, od = u.key
            for o in outs:
                job.accs.append(acc_pool(o, acc_dt).get(ctl, job.idx))
                # an accumulator that already has the output dtype is written as it is
                assert o.outs is not None
                job.obufs.append(o.outs.get(ctl, job.idx) if cuda or acc_dt != od else None)

    stats = EngineStats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="averaging",
                   file=sys.stderr, leave=False, dynamic_ncols=True)

    dispenser = _Dispenser(_schedule(plan, chunk, copy_cap, acc_of, numels), n_workers,
                           acquire, lambda u: _advise(plan, u, active), ctl)
    done: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()

    # -- workers: read and accumulate whole units -----------------------------------------
    def worker() -> None:
        if cuda:
            # the current device is per thread: events and copies must use the merge's device
            torch.cuda.set_device(dev)
        nbuf = 2 if cuda else 1  # on a GPU, read the next block while the last one is copied
        rbufs = [torch.empty(block * max_in, dtype=torch.uint8, pin_memory=cuda) for _ in range(nbuf)]
        rmvs = [tensor_memoryview(r) for r in rbufs]
        events = [torch.cuda.Event() if cuda else None for _ in range(nbuf)]
        dev_in = torch.empty(block * max_in, dtype=torch.uint8, device=dev) if cuda else None
        scratch: dict[torch.dtype, torch.Tensor] = {}

        def scratch_of(dt: torch.dtype) -> torch.Tensor:
            if dt not in scratch:
                scratch[dt] = torch.empty(min(SUB, max_elems), dtype=dt, device=dev)
            return scratch[dt]

        gap = memoryview(bytearray(MAX_GAP))
        turn = 0
        idx: float = math.inf
        try:
            while True:
                idx = dispenser.position
                job = dispenser.take()
                if job is None:
                    return
                idx = job.idx
                unit = job.unit
                if unit.copy:
                    assert job.cbuf is not None
                    parts = [(plan.tensors[j].refs[-1], b0, n, dst) for j, b0, n, dst in unit.copy]
                    _read_runs(_runs(parts), tensor_memoryview(job.cbuf), gap)
                    job.nread += unit.copy_bytes
                if unit.avg:
                    assert unit.key is not None
                    in_dt, acc_dt, _ = unit.key
                    for b0, m, segs in _blocks(unit.avg, block):
                        if ctl.cancelled(idx):
                            raise _Stop()
                        for i in active:
                            dt = in_dt[i]
                            isz = dt.itemsize
                            ev = events[turn]
                            if ev is not None:
                                ev.synchronize()  # the copy out of this buffer must be done before refilling it
                            parts = [(plan.tensors[j].refs[i], e0 * isz, n * isz, (off - b0) * isz)
                                     for j, e0, n, off in segs]
                            _read_runs(_runs(parts), rmvs[turn], gap)
                            x = rbufs[turn][: m * isz]
                            if dev_in is not None:
                                dx = dev_in[: m * isz]
                                dx.copy_(x, non_blocking=True)
                                events[turn].record()  # type: ignore[union-attr]
                                x = dx
                                turn = (turn + 1) % nbuf
                            todo = [(job.accs[k][b0 : b0 + m], o.coeffs[i], o.first == i)
                                    for k, o in enumerate(outs) if o.coeffs[i] != 0]
                            _accumulate(x.view(dt), acc_dt, todo, scratch_of)
                    job.nread += unit.n * sum(in_dt[i].itemsize for i in active)
                    for k, o in enumerate(outs):
                        _finish(plan, unit, job.accs[k], job.obufs[k], o.divisor, cuda, allow_nonfinite, scratch_of)
                _emit(job, outs, copies, acc_pool)
                done.put(job)
        except _Stop:
            return
        except BaseException as e:
            ctl.fail(idx, e)

    # -- writer: the finished units' bytes, in plan order -----------------------------------
    def writer_loop() -> None:
        waiting: dict[int, _Job] = {}
        nxt = 0
        while True:
            job = done.get()
            if job is None:
                return
            waiting[job.idx] = job
            while nxt in waiting:
                job = waiting.pop(nxt)
                nxt += 1
                try:
                    if not ctl.stop.is_set():
                        for w, mvs in job.pieces:
                            for mv in mvs:
                                w.write(mv)
                    unit = job.unit
                    stats.bytes_read += job.nread
                    stats.tensors_averaged += unit.averaged
                    stats.tensors_copied += unit.copied
                    if bar is not None:
                        bar.update(job.nread)
                    for j in unit.done:
                        for r in plan.tensors[j].refs:
                            r.release()
                except BaseException as e:  # stops everything: the workers wait for these buffers
                    ctl.fail(job.idx, e, hard=True)
                finally:
                    for pool, buf in job.release:
                        pool.put(buf)

    threads = torch.get_num_threads()
    if not cuda:
        # Several threads already run chunk operations side by side; torch's own worker threads
        # would compete for the same cores (spin-waiting in OpenMP) and slow every operation
        # down several-fold. Chunk arithmetic is memory-bound: one thread each.
        torch.set_num_threads(1)
    crew = _Crew()
    left = [n_workers]  # workers still running; the last one to end tells the writer

    def worker_ended() -> None:
        with ctl.lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            done.put(None)

    ok = False
    try:
        crew.start("ckptavg-write", writer_loop)
        for k in range(n_workers):
            crew.start(f"ckptavg-work-{k}", worker, worker_ended)
        crew.wait()
        err = ctl.first_error()
        if err is not None:
            raise err
        ok = True
    finally:
        if not ok:
            ctl.stop.set()
            done.put(None)
            crew.end()
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
        for pt in plan.tensors:
            for r in pt.refs:
                r.release()
    stats.bytes_written = sum(getattr(w, "bytes_written", 0) for w in ws)
    stats.seconds = time.perf_counter() - t0
    return stats


_Seg = tuple[int, int, int, int]  # (tensor, first element, elements, accumulator offset)


def _blocks(segs: list[_Seg], size: int) -> Iterator[tuple[int, int, list[_Seg]]]:
    """Cut a unit's averaged segments into blocks of at most ``size`` elements: (first
    accumulator element, elements, segments inside the block)."""
    cur: list[_Seg] = []
    start = fill = 0
    for j, e0, n, off in segs:
        while n:
            m = min(n, size - fill)
            cur.append((j, e0, m, off))
            fill += m
            e0 += m
            off += m
            n -= m
            if fill == size:
                yield start, fill, cur
                start += fill
                cur, fill = [], 0
    if cur:
        yield start, fill, cur


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


def _accumulate(x: torch.Tensor, acc_dt: torch.dtype, todo: list[tuple[torch.Tensor, float, bool]],
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


def _finish(plan: MergePlan, unit: _Unit, full: torch.Tensor, obuf: torch.Tensor | None, divisor: float, cuda: bool,
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
            _explain_nonfinite(plan, unit, a)
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
            _check_cast(plan, unit, out)


def _emit(job: _Job, outs: list[_Output], copies: _Pool, acc_pool: Any) -> None:
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


def _segment_at(plan: MergePlan, unit: _Unit, idx: int) -> tuple[PlannedTensor, int, int, int]:
    """The averaged segment holding element ``idx`` of the unit: (tensor, elem0, count, offset)."""
    for j, e0, n, off in unit.avg:
        if off <= idx < off + n:
            return plan.tensors[j], e0, n, off
    raise AssertionError("index outside the unit")


def _check_cast(plan: MergePlan, unit: _Unit, out: torch.Tensor) -> None:
    """The average must also fit the (narrower) output dtype: overflow to inf is an error
    naming the first element that overflowed (scanned in cache-sized blocks: a chunk-sized
    mask would cost a chunk of memory per worker)."""
    for s0 in range(0, out.numel(), SUB):
        blk = out[s0 : s0 + SUB]
        if bool(torch.isfinite(blk).all()):
            continue
        k = s0 + int((~torch.isfinite(blk)).nonzero()[0, 0])
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

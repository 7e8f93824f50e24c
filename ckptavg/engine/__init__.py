"""The engine. Stream-average: compute ``sum_i w_i * theta_i`` chunk by chunk, for one or several weight vectors.

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

The parts: :mod:`.schedule` (units, reads, chunk size, workers), :mod:`.threads` (failure
control, the crew of threads, buffer pools, the dispenser), :mod:`.worker` (the worker and the
writer loop), :mod:`.kernels` (reading, accumulating, finishing, emitting) and :mod:`.checks`
(NaN/Inf and overflow); :func:`run` puts them together.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import torch

from ..devices import resolve_device
from ..errors import OptionError
from ..io import Writer
from ..plans import MergePlan
from ..settings import CHUNK_ENV, env_int
from ..weights import Weights
from . import schedule
from .schedule import DEFAULT_CHUNK_ELEMS, advise, auto_chunk, cut_units, worker_count
from .threads import Control, Crew, Dispenser, Output, Pool
from .worker import EngineStats, RunState, Worker, WriterLoop

__all__ = ["run", "EngineStats", "DEFAULT_CHUNK_ELEMS", "resolve_device", "worker_count",
           "auto_chunk"]


def _check_weights(plan: MergePlan, ws: list[Writer], wts: list[Weights]) -> None:
    if len(wts) != len(ws) or not ws:
        raise OptionError(f"{len(ws)} output(s) but {len(wts)} weight vector(s); give one weight vector per output")
    n_in = len(plan.inputs)
    for w in wts:
        if len(w.coeffs) != n_in:
            raise OptionError(f"a weight vector has {len(w.coeffs)} values but {n_in} checkpoints are selected")
        if not any(c != 0 for c in w.coeffs):
            raise OptionError("a weight vector is all zeros")


def _state(plan: MergePlan, ws: list[Writer], wts: list[Weights], dev: torch.device, chunk: int, n_workers: int,
           allow_nonfinite: bool) -> tuple[RunState, int]:
    """The shared state of a run (buffer sizes and pools) and the copy buffer's size."""
    cuda = dev.type == "cuda"
    numels = [t.numel for t in plan.tensors]
    avg = [(j, t) for j, t in enumerate(plan.tensors) if t.kind == "average" and t.alias_of is None and numels[j]]
    max_elems = max(1, min(chunk, sum(numels[j] for j, _ in avg)))
    max_in = max((r.itemsize for _, t in avg for r in t.refs), default=1)
    max_out = max((t.out_dtype.itemsize for _, t in avg), default=1)
    copy_total = sum(t.refs[-1].nbytes for t in plan.tensors if t.kind == "copy" and t.alias_of is None)
    copy_cap = max(1, chunk * 4)
    # On the CPU each input is read and added in blocks that stay in a core's cache; a GPU
    # gets whole chunks (few large host-to-device copies).
    block = max_elems if cuda else min(max_elems, schedule.BLOCK_ELEMS)
    in_flight = n_workers + 1  # units computing, plus one being written
    copy_size = max(1, min(copy_cap, copy_total))
    outs: list[Output] = []
    for w, wt in zip(ws, wts):
        o = Output(w, list(wt.coeffs), float(wt.divisor), next(i for i, c in enumerate(wt.coeffs) if c != 0))
        o.outs = Pool(lambda: torch.empty(max_elems * max_out, dtype=torch.uint8, pin_memory=cuda), in_flight)
        outs.append(o)
    active = [i for i in range(len(plan.inputs)) if any(w.coeffs[i] != 0 for w in wts)]
    copies = Pool(lambda: torch.empty(copy_size, dtype=torch.uint8), in_flight)
    state = RunState(plan, outs, active, dev, block, max_in, max_elems, copies, in_flight, allow_nonfinite)
    return state, copy_cap


def run(plan: MergePlan, writers: Writer | Sequence[Writer], *, weights: Sequence[Weights] | None = None,
        device: str | torch.device = "cpu", progress: bool = False, allow_nonfinite: bool = False,
        chunk_elems: int | None = None, cancel: Callable[[], bool] | None = None) -> EngineStats:
    """Average the plan's tensors into ``writers`` (open, not yet committed), one output per
    weight vector of ``weights`` (default: the plan's own), reading every input chunk once.
    ``cancel``: asked every 0.1 s; True stops the run and raises
    :class:`~ckptavg.engine.threads.Cancelled` (the writers are left for the caller to abort).

    Example::

        w1 = open_writer("safetensors", Path("swa.safetensors"), plan.entries())
        w2 = open_writer("safetensors", Path("ema.safetensors"), plan.entries())
        run(plan, [w1, w2], weights=[plan.weights, ema(len(plan.inputs), 0.9)])
        w1.commit(); w2.commit()
    """
    ws: list[Writer] = [writers] if isinstance(writers, Writer) else list(writers)
    wts = list(weights) if weights is not None else [plan.weights]
    _check_weights(plan, ws, wts)
    dev = resolve_device(device)
    n_workers = worker_count()
    chunk = chunk_elems or env_int(CHUNK_ENV, minimum=0) or auto_chunk(plan, n_workers)
    if chunk < 1:
        raise OptionError("chunk size must be positive")
    t0 = time.perf_counter()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # the caller's; workers are other threads
    state, copy_cap = _state(plan, ws, wts, dev, chunk, n_workers, allow_nonfinite)
    acc_of = [pt.acc_dtype if pt.kind == "average" else None for pt in plan.tensors]  # planner.accumulator_for
    units = cut_units(plan, chunk, copy_cap, acc_of, [t.numel for t in plan.tensors])
    dispenser = Dispenser(units, n_workers, state.acquire, lambda u: advise(plan, u, state.active), state.ctl)
    stats = EngineStats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="averaging",
                   file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        _run_threads(state, dispenser, WriterLoop(state, stats, bar.update if bar is not None else None), n_workers,
                     cancel)
    finally:
        if bar is not None:
            bar.close()
        for pt in plan.tensors:
            for r in pt.refs:
                r.release()
    stats.bytes_written = sum(getattr(w, "bytes_written", 0) for w in ws)
    stats.seconds = time.perf_counter() - t0
    return stats


def _run_threads(state: RunState, dispenser: Dispenser, writer: WriterLoop, n_workers: int,
                 cancel: Callable[[], bool] | None = None) -> None:
    """Start the writer and the workers, wait for them and raise the first error in plan order;
    on a failure or an interrupt, stop them all and wait until they have ended."""
    ctl: Control = state.ctl
    threads = torch.get_num_threads()
    if not state.cuda:
        # Several threads already run chunk operations side by side; torch's own worker threads
        # would compete for the same cores (spin-waiting in OpenMP) and slow every operation
        # down several-fold. Chunk arithmetic is memory-bound: one thread each.
        torch.set_num_threads(1)
    crew = Crew()
    left = [n_workers]  # workers still running; the last one to end tells the writer

    def work() -> None:
        try:
            worker = Worker(state)  # made on its own thread: a CUDA worker sets that thread's device
        except BaseException as e:
            ctl.fail(dispenser.position, e)
            return
        worker(dispenser)

    def worker_ended() -> None:
        with ctl.lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            state.done.put(None)

    ok = False
    try:
        crew.start("ckptavg-write", writer)
        for k in range(n_workers):
            crew.start(f"ckptavg-work-{k}", work, worker_ended)
        crew.wait(cancel)
        err = ctl.first_error()
        if err is not None:
            raise err
        ok = True
    finally:
        if not ok:
            ctl.stop.set()
            state.done.put(None)
            crew.end()
        torch.set_num_threads(threads)

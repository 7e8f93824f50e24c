"""The two kinds of thread of a run: a :class:`Worker` reads and accumulates whole units, the
:class:`WriterLoop` hands the finished units to the writers in plan order. Both get everything
they use from one :class:`RunState`, so each can be built and driven alone (the tests do)."""

from __future__ import annotations

import math
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointReadError
from ..io.files import tensor_memoryview
from ..plans import MergePlan
from .kernels import SUB, accumulate, emit, finish, read_runs
from .schedule import MAX_GAP, blocks, file_runs
from .threads import Control, Dispenser, Job, Output, Pool, Stop

__all__ = ["RunState", "Worker", "WriterLoop", "EngineStats"]


@dataclass
class EngineStats:
    """What a run read and wrote, and how long it took."""

    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    tensors_averaged: int = 0
    tensors_copied: int = 0


@dataclass(eq=False)
class RunState:
    """What the threads of one run share: the plan, the outputs, the active inputs, the buffer
    sizes, the buffer pools, the failure control and the queue of finished units."""

    plan: MergePlan
    outs: list[Output]
    active: list[int]  # inputs with a non-zero weight in some output
    device: torch.device
    block: int  # elements read and added at a time
    max_in: int  # widest input dtype's itemsize
    max_elems: int  # elements of an accumulator
    copies: Pool
    in_flight: int
    allow_nonfinite: bool = False
    ctl: Control = field(default_factory=Control)
    done: queue.SimpleQueue[Job | None] = field(default_factory=queue.SimpleQueue)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def acc_pool(self, o: Output, dt: torch.dtype) -> Pool:
        """The pool of ``o``'s accumulators of dtype ``dt`` (made on first need)."""
        if dt not in o.accs:
            n, dev = self.max_elems, self.device
            o.accs[dt] = Pool(lambda: torch.empty(n, dtype=dt, device=dev), self.in_flight)
        return o.accs[dt]

    def acquire(self, job: Job) -> None:
        """Take every buffer ``job`` needs (in plan order, by the dispenser)."""
        u = job.unit
        if u.copy:
            job.cbuf = self.copies.get(self.ctl, job.idx)
        if u.avg:
            assert u.key is not None
            _, acc_dt, od = u.key
            for o in self.outs:
                job.accs.append(self.acc_pool(o, acc_dt).get(self.ctl, job.idx))
                # an accumulator that already has the output dtype is written as it is
                assert o.outs is not None
                job.obufs.append(o.outs.get(self.ctl, job.idx) if self.cuda or acc_dt != od else None)


class Worker:
    """Reads and accumulates whole units: :meth:`process` does one job, :meth:`__call__` takes
    jobs from a dispenser until none is left (the body of a worker thread)."""

    def __init__(self, state: RunState) -> None:
        self.s = state
        cuda = state.cuda
        if cuda:
            # the current device is per thread: events and copies must use the merge's device
            torch.cuda.set_device(state.device)
        self.nbuf = 2 if cuda else 1  # on a GPU, read the next block while the last one is copied
        nbytes = state.block * state.max_in
        self.rbufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(self.nbuf)]
        self.rmvs = [tensor_memoryview(r) for r in self.rbufs]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(self.nbuf)]
        self.dev_in = torch.empty(nbytes, dtype=torch.uint8, device=state.device) if cuda else None
        self.scratch: dict[torch.dtype, torch.Tensor] = {}
        self.gap = memoryview(bytearray(MAX_GAP))
        self.turn = 0

    def scratch_of(self, dt: torch.dtype) -> torch.Tensor:
        """A cache-sized scratch block of dtype ``dt`` (for conversions)."""
        if dt not in self.scratch:
            self.scratch[dt] = torch.empty(min(SUB, self.s.max_elems), dtype=dt, device=self.s.device)
        return self.scratch[dt]

    def __call__(self, dispenser: Dispenser) -> None:
        idx: float = math.inf
        try:
            while True:
                idx = dispenser.position
                job = dispenser.take()
                if job is None:
                    return
                idx = job.idx
                self.process(job)
                self.s.done.put(job)
        except Stop:
            return
        except BaseException as e:
            self.s.ctl.fail(idx, e)

    def process(self, job: Job) -> None:
        """Read the unit's copied bytes and accumulate its averaged part, for every output; then
        finish each output's chunk and lay out the bytes to write (:func:`~.kernels.emit`)."""
        s, unit = self.s, job.unit
        if unit.copy:
            assert job.cbuf is not None
            parts = [(s.plan.tensors[j].refs[-1], b0, n, dst) for j, b0, n, dst in unit.copy]
            try:
                read_runs(file_runs(parts), tensor_memoryview(job.cbuf), self.gap)
            except CheckpointReadError as e:
                raise _naming(e, s.plan.tensors[unit.copy[0][0]].name) from None
            job.nread += unit.copy_bytes
        if unit.avg:
            self._accumulate_unit(job)
            for k, o in enumerate(s.outs):
                finish(s.plan, unit, job.accs[k], job.obufs[k], o.divisor, s.cuda, s.allow_nonfinite,
                       self.scratch_of)
        emit(job, s.outs, s.copies, s.acc_pool)

    def _accumulate_unit(self, job: Job) -> None:
        s, unit = self.s, job.unit
        assert unit.key is not None
        in_dt, acc_dt, _ = unit.key
        for b0, m, segs in blocks(unit.avg, s.block):
            if s.ctl.cancelled(job.idx):
                raise Stop()
            for i in s.active:
                dt = in_dt[i]
                isz = dt.itemsize
                try:
                    x = self._read_block(i, isz, [(s.plan.tensors[j].refs[i], e0 * isz, n * isz, (off - b0) * isz)
                                                  for j, e0, n, off in segs], m)
                except CheckpointReadError as e:
                    raise _naming(e, s.plan.tensors[segs[0][0]].name) from None
                todo = [(job.accs[k][b0 : b0 + m], o.coeffs[i], o.first == i)
                        for k, o in enumerate(s.outs) if o.coeffs[i] != 0]
                accumulate(x.view(dt), acc_dt, todo, self.scratch_of)
        job.nread += unit.n * sum(in_dt[i].itemsize for i in s.active)

    def _read_block(self, i: int, isz: int, parts: list[Any], m: int) -> torch.Tensor:
        """One input's block, read into this worker's buffer (on a GPU: copied to the device)."""
        ev = self.events[self.turn]
        if ev is not None:
            ev.synchronize()  # the copy out of this buffer must be done before refilling it
        read_runs(file_runs(parts), self.rmvs[self.turn], self.gap)
        x = self.rbufs[self.turn][: m * isz]
        if self.dev_in is not None:
            dx = self.dev_in[: m * isz]
            dx.copy_(x, non_blocking=True)
            assert ev is not None
            ev.record()
            x = dx
            self.turn = (self.turn + 1) % self.nbuf
        return x


class WriterLoop:
    """Writes the finished units' bytes in plan order (the body of the writer thread), counts
    what was read, lets the inputs' finished tensors go and gives the buffers back."""

    def __init__(self, state: RunState, stats: EngineStats, on_bytes: Callable[[int], Any] | None = None) -> None:
        self.s = state
        self.stats = stats
        self.on_bytes = on_bytes

    def __call__(self) -> None:
        waiting: dict[int, Job] = {}
        nxt = 0
        while True:
            job = self.s.done.get()
            if job is None:
                return
            waiting[job.idx] = job
            while nxt in waiting:
                self.write(waiting.pop(nxt))
                nxt += 1

    def write(self, job: Job) -> None:
        """Write one unit (the next in plan order); a failure stops everything, since the
        workers wait for these buffers."""
        s, st = self.s, self.stats
        try:
            if not s.ctl.stop.is_set():
                for w, mvs in job.pieces:
                    for mv in mvs:
                        w.write(mv)
            unit = job.unit
            st.bytes_read += job.nread
            st.tensors_averaged += unit.averaged
            st.tensors_copied += unit.copied
            if self.on_bytes is not None:
                self.on_bytes(job.nread)
            for j in unit.done:
                for r in s.plan.tensors[j].refs:
                    r.release()
        except BaseException as e:
            s.ctl.fail(job.idx, e, hard=True)
        finally:
            for pool, buf in job.release:
                pool.put(buf)


def _naming(e: CheckpointReadError, tensor: str) -> CheckpointReadError:
    """A read error that names the tensor being read (when the reader could not: it sees bytes)."""
    if "tensor" in str(e):
        return e
    return CheckpointReadError(f"{e} (reading tensor {tensor!r})")

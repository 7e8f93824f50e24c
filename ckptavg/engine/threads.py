"""The coordination of a run's threads: shared failure and cancellation (:class:`Control`), the
threads themselves counted out (:class:`Crew`), reusable buffers (:class:`Pool`), the units in
flight (:class:`Job`) and the dispenser that hands them out in plan order."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..io import Writer
from .schedule import Unit

__all__ = ["Stop", "Cancelled", "Control", "Crew", "Pool", "Output", "Job", "Dispenser"]


class Stop(Exception):
    """Raised inside a helper thread when the merge is being abandoned."""


class Cancelled(Exception):
    """Raised by the run's own thread when its ``cancel`` predicate turned true (a watcher asked
    to stop): an ordinary failure of the run, so that the merge driver abandons it through the
    same agreement as any other error (every rank of a merge across ranks learns it)."""


class Control:
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


class Crew:
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

    def _counted_out(self, deadline: float = math.inf, cancel: Callable[[], bool] | None = None) -> None:
        with self._cv:
            while self._running > 0 and time.monotonic() < deadline:
                self._cv.wait(0.1)
                if cancel is not None and cancel():
                    raise Cancelled("the update was cancelled")

    def wait(self, cancel: Callable[[], bool] | None = None) -> None:
        """Until every thread has counted itself out (Ctrl-C interrupts this wait safely), then
        join each: a thread still drops references after counting itself out, and freeing a
        tensor once the interpreter's teardown has begun aborts the process. ``cancel`` is
        asked every 0.1 s; when it answers True, :class:`Cancelled` is raised."""
        self._counted_out(cancel=cancel)
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


class Pool:
    """A fixed number of reusable buffers, made on first need; :meth:`get` blocks until one
    is free (or the unit asking is cancelled)."""

    def __init__(self, make: Any, count: int) -> None:
        self._make = make
        self._made = 0
        self._count = count
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def get(self, ctl: Control, idx: int) -> Any:
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
                    raise Stop() from None

    def put(self, buf: Any) -> None:
        self._free.put(buf)


@dataclass(eq=False)
class Output:
    writer: Writer
    coeffs: list[float]
    divisor: float
    first: int  # first input with a non-zero weight
    accs: dict[torch.dtype, Pool] = field(default_factory=dict)
    outs: Pool | None = None


@dataclass(eq=False)
class Job:
    """One unit on its way through a worker to the writer, with the buffers it holds."""

    idx: int
    unit: Unit
    cbuf: torch.Tensor | None = None  # copied bytes
    accs: list[torch.Tensor] = field(default_factory=list)  # per output
    obufs: list[torch.Tensor | None] = field(default_factory=list)  # per output, when cast
    pieces: list[tuple[Writer, list[memoryview]]] = field(default_factory=list)
    release: list[tuple[Pool, Any]] = field(default_factory=list)
    nread: int = 0


class Dispenser:
    """Hands out the units in plan order, each with every buffer it will need (taken here, in
    order, so the lowest unit in flight can always finish and the writer always progresses),
    and asks the kernel to read ahead the units that come next."""

    def __init__(self, units: Iterator[Unit], ahead: int, acquire: Any, advise: Any, ctl: Control) -> None:
        self._units = units
        self._queue: list[Unit] = []
        self._ahead = ahead
        self._acquire = acquire
        self.advise = advise
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
            self.advise(u)

    def take(self) -> Job | None:
        with self._lock:
            idx = self._next
            if self._ctl.cancelled(idx):
                return None
            self._fill(self._ahead + 1)
            if not self._queue:
                return None
            job = Job(idx, self._queue[0])
            self._acquire(job)  # may block until the writer gives buffers back
            self._queue.pop(0)
            self._next += 1
            return job



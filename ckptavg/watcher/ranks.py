"""``ckptavg watch`` under torchrun: rank 0 watches, every rank averages.

Rank 0 alone scans the checkpoints, judges them complete, decides when an update is due, reports
the events and keeps the watch state. Each update is then a merge across the ranks
(:class:`ckptavg.distributed.Ranks`) of exactly the checkpoints rank 0 judged complete, split,
agreed and published as ``ckptavg merge`` does under torchrun: OUTPUT is what that merge writes
(a sharded safetensors folder ``-o DIR/``, a DCP folder ``-o NAME.dcp``, a Megatron root).

The ranks meet at a *tick*, at least once a second (:data:`TICK`), in one collective: each says
whether it was asked to stop, rank 0 adds its decision (nothing, an update of these checkpoints
at these stamps, or an error that ends the watch). The other ranks wait for rank 0 in that
collective. Stopping is the one protocol every rank follows:

* a signal (SIGINT, SIGTERM; torchrun forwards the one it receives to every rank) only sets the
  rank's stop flag, never raises in the middle of a collective, so the ranks' collectives always
  line up;
* at the next tick every rank learns that one of them was asked to stop, and they all leave the
  loop together (exit status 0, the ``stopped`` event from rank 0);
* during an update, a rank asked to stop cancels its share of the averaging within 0.1 s (the
  engine's ``cancel``); just before publishing, the ranks exchange their stop flags, and if any is
  set every rank abandons the update (nothing is published, the temporaries are removed); they
  then stop at the next tick.

A rank that dies or stops answering ends the watch on every rank with an error (the collective
fails, or times out after ``CKPTAVG_DIST_TIMEOUT`` seconds); the output keeps its last update.

Example::

    # torchrun --nproc-per-node 2 -m ckptavg watch runs/ -o swa/ --last 5
    with ckptavg.distributed.session("cpu"):
        RankWatcher(["runs/"], "swa/", MergeOptions(last=5), on_event=print).run()
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .. import distributed
from ..distributed import Ranks
from ..errors import CkptavgError
from ..io import kind_of
from ..io.urls import as_path
from ..options import MergeOptions
from ..plans import MergePlan
from .loop import StopRequested, Watcher, changed_since_judged
from .scan import make_waiter

__all__ = ["RankWatcher", "TICK"]

TICK = 1.0  # the longest the ranks go without meeting (seconds): a stop takes effect within about two


class _CheckedRanks(Ranks):
    """The ranks of one update: rank 0 refuses a plan whose files are not the ones it judged
    complete; no rank publishes once any rank was asked to stop."""

    def __init__(self, files: Mapping[str, Any], stop: Any) -> None:
        super().__init__()
        self.files = files
        self.stop = stop

    def prepare(self, targets: Any, err: BaseException | None, plan: MergePlan | None) -> None:
        if err is None and plan is not None and self.rank == 0:
            err = changed_since_judged(plan, self.files)
        super().prepare(targets, err, plan)

    def publish(self, writers: Any, err: BaseException | None, read: int) -> tuple[int, int]:
        asked = self.agree(None, self.stop.is_set())  # every rank learns whether any was asked to stop
        if any(asked):
            err = StopRequested()  # a stop on every rank alike, whatever else went wrong
        return super().publish(writers, err, read)

    def stopping(self) -> bool:
        return bool(self.stop.is_set())


class RankWatcher(Watcher):
    """A :class:`~ckptavg.watcher.loop.Watcher` on every rank of the default process group (see
    the module docstring); construct it on every rank with the same arguments."""

    def __init__(self, inputs: Sequence[str], output: str, opts: MergeOptions, **kw: Any) -> None:
        super().__init__(inputs, output, opts, **kw)
        from ..pipeline import Target

        self.rank = dist.get_rank()
        self.ranks = Ranks()
        # refuse what cannot be split (a single file, several outputs) before waiting for checkpoints
        self.ranks.check(opts, [Target(o, kind_of(o, opts.format)) for o in self.outputs])
        if self.rank != 0:
            self.emit = lambda ev: None  # rank 0 reports

    def _group(self, files: Mapping[str, str]) -> Any:
        return _CheckedRanks(files, self.stop)

    def update(self, complete: Mapping[Path, str], files: Mapping[str, str]) -> bool:
        done = super().update(complete, files)
        if not done:
            distributed._set_failing(False)  # the ranks agreed on the failure and go on watching
        return done

    def _decide(self, once: bool, last_update: float) -> tuple[Any, float, BaseException | None]:
        """Rank 0's decision: ("update", [(path, stamp)...], files) or None, when to scan next,
        and an error that ends the watch."""
        try:
            todo, wait = self.next_update(once, last_update)
        except CkptavgError as e:
            return None, math.inf, e
        if todo is None:
            return None, time.monotonic() + wait, None
        complete, files = todo
        return ("update", [(os.fspath(p), k) for p, k in complete.items()], dict(files)), time.monotonic() + wait, None

    def _meet(self, decision: Any, err: BaseException | None) -> tuple[bool, Any]:
        """The tick: whether any rank was asked to stop, and rank 0's decision (raising, on every
        rank, an error rank 0 met)."""
        got = self.ranks.agree(err, (self.stop.is_set(), decision),
                               lost="the output keeps its last update", left="the output keeps its last update")
        return any(s for s, _d in got), got[0][1]

    def run(self, once: bool = False) -> Any:
        """Watch on every rank until any rank is asked to stop (or, with ``once``, one update if due)."""
        from ..events import event

        waiter = make_waiter(self.stop, self.poll or once) if self.rank == 0 else None
        self.emit(event("start", inputs=self.inputs, outputs=[os.fspath(o) for o in self.outputs],
                        mode=waiter.mode if waiter is not None else "poll", once=once))
        last_update = -math.inf
        next_scan = 0.0
        woke = True
        try:
            while True:
                decision: Any = None
                err: BaseException | None = None
                if self.rank == 0 and not self.stop.is_set() and (woke or time.monotonic() >= next_scan):
                    decision, next_scan, err = self._decide(once, last_update)
                stop, decision = self._meet(decision, err)
                if stop:
                    break
                if decision is not None:
                    _kind, complete, files = decision
                    self.update({as_path(p): k for p, k in complete}, files)
                    last_update = time.monotonic()
                if once:
                    break
                woke = False
                if waiter is not None and not self.stop.is_set():
                    left = max(0.0, min(TICK, next_scan - time.monotonic()))
                    woke = waiter.wait(left, self.folders() if left > 0 and waiter.mode == "inotify" else [])
        except StopRequested:
            pass
        finally:
            if waiter is not None:
                waiter.close()
        self.emit(event("stopped", reason=self.stop_reason(once), updates=self.result.updates))
        return self.result

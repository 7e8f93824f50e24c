"""The watch loop: scan -> judge completeness -> (re)average -> publish -> (prune) -> wait.

Each update is a full ``merge`` of the checkpoints complete so far, through the one merge driver
(:func:`ckptavg.pipeline.merge_into`) with the selection and method options as given: OUTPUT is
therefore, byte for byte, what ``ckptavg merge`` writes for the same checkpoints, and memory
stays bounded as in ``merge``. What the watcher adds is only *which* checkpoints go in:

* a checkpoint is used once its format says it is complete (:mod:`ckptavg.watcher.complete`)
  and its stamp (size, times, identity of every file) has not changed for ``settle`` seconds;
* its headers are then opened once; one that fails is reported (``skipped``, ``unreadable``)
  and left out until its stamp changes;
* the group given to the driver (:class:`_Checked`) refuses, before anything is read, a plan
  whose files are not exactly the ones judged complete (a file rewritten in between), and
  abandons an update when a stop is requested before it publishes;
* what was last published (inputs and their stamps, options) is kept beside the first output
  in ``.NAME.ckptavg-watch.json``, so that a restarted watcher or ``--once`` re-averages only
  when something changed.

Example::

    w = Watcher(["runs/"], "swa.safetensors", MergeOptions(last=5), on_event=print)
    w.run(once=True)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from ..errors import CheckpointReadError, CkptavgError, OptionError
from ..events import event
from ..io.files import write_atomically
from ..io.urls import is_remote, is_url
from ..options import MergeOptions, expand_variants, single_values
from ..outputs import MergeReport, output_names
from ..pipeline import OneProcess, close_inputs, merge_into
from ..plans import MergePlan
from .complete import LocalSource, Source, judge, stamp
from .scan import abs_key, candidates, make_waiter, watched_folders

__all__ = ["Watcher", "WatchResult", "StopRequested", "changed_since_judged"]

Emit = Callable[[dict[str, Any]], None]


class StopRequested(BaseException):
    """A stop was requested while an update ran: it is abandoned, nothing is published."""


@dataclass
class WatchResult:
    """What a watch did: the updates published, the last report, whether it stopped on request."""

    updates: int = 0
    last: MergeReport | None = None
    errors: int = 0


def _key(st: Any) -> str:
    return json.dumps(st, default=str)


def changed_since_judged(plan: MergePlan, files: Mapping[str, Any]) -> CheckpointReadError | None:
    """The error when a file of the plan is not, by its stamp, the one judged complete (``files``:
    absolute path -> stamp key)."""
    for i in plan.inputs:
        for f in i.checkpoint.files:
            if _key(f.stamp) != files.get(abs_key(f.path)):
                return CheckpointReadError(f"{f.path}: changed after it was judged complete; left for the next update")
    return None


class _Checked(OneProcess):
    """A group of one that publishes only what was judged complete, and not after a stop."""

    def __init__(self, files: Mapping[str, Any], stop: threading.Event) -> None:
        self.files = files
        self.stop = stop

    def prepare(self, targets: Any, err: BaseException | None, plan: MergePlan | None) -> None:
        if err is None and plan is not None:
            err = changed_since_judged(plan, self.files)
        super().prepare(targets, err, plan)

    def publish(self, writers: Any, err: BaseException | None, read: int) -> tuple[int, int]:
        if self.stop.is_set():  # also when the stop cancelled the run: a stop, not an error
            err = StopRequested()
        return super().publish(writers, err, read)

    def stopping(self) -> bool:
        return self.stop.is_set()


class Watcher:
    """Keeps ``output`` equal to the merge ``opts`` describe over the complete checkpoints of
    ``inputs`` (see the module docstring)."""

    def __init__(self, inputs: Sequence[str], output: str, opts: MergeOptions, *, on_event: Emit,
                 interval: float = 10.0, settle: float = 1.0, every_new: int = 1, prune: bool = False,
                 poll: bool = False, source: Source | None = None, stop: threading.Event | None = None) -> None:
        if opts.dry_run:
            raise OptionError("watch: --dry-run does not apply (use ckptavg merge --dry-run)")
        if every_new < 1 or interval <= 0 or settle < 0:
            raise OptionError("watch: --every-new must be >= 1, --interval > 0 and --settle >= 0")
        if prune and (opts.every is not None or opts.weights is not None):
            raise OptionError("watch: --prune cannot tell which checkpoints --every or --weights may still select")
        self.inputs, self.output, self.opts, self.emit = list(inputs), output, opts, on_event
        self.interval, self.settle, self.every_new, self.prune = interval, settle, every_new, prune
        self.src: Source = source or LocalSource()
        urls = any(is_url(i) for i in self.inputs)
        if prune and urls:
            raise OptionError("watch: --prune deletes local checkpoints only; it does not delete objects at URLs")
        self.poll = poll or source is not None or urls  # object stores have no change notification
        self.stop = stop or threading.Event()
        self.outputs = output_names(output, [label for label, _o in expand_variants(opts)], single_values(opts))
        self.state_file = _state_file(self.outputs[0])
        self.first_seen: dict[Path, tuple[str, float]] = {}  # path -> (stamp, when first seen so)
        self.known: dict[Path, str] = {}  # complete and readable, at this stamp
        self.failed: dict[Path, str] = {}  # unreadable at this stamp
        self.told: dict[Path, str] = {}  # 'skipped' reason reported while it is being written
        self.published = self._load_state()
        self.failed_set: dict[str, str] | None = None  # the selection whose last update failed
        self.result = WatchResult()
        self.rank = 0  # the member that scans, decides, reports and keeps the state

    # ---- state ------------------------------------------------------------------------------
    def _options_key(self) -> str:
        return json.dumps(asdict(replace(self.opts, progress=False)), sort_keys=True, default=str)

    def _load_state(self) -> dict[str, str] | None:
        try:
            data = json.loads(self.state_file.read_text())
            ok = data["options"] == self._options_key() and all(o.exists() for o in self.outputs)
            return dict(data["inputs"]) if ok else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_state(self, complete: Mapping[str, str]) -> None:
        text = json.dumps({"options": self._options_key(), "outputs": [os.fspath(o) for o in self.outputs],
                           "inputs": dict(complete)})
        def write(name: str) -> None:
            Path(name).write_text(text)

        write_atomically(self.state_file, write, "the watch state")

    # ---- one scan ---------------------------------------------------------------------------
    def scan(self) -> tuple[dict[Path, str], dict[str, str], bool]:
        """The complete, readable checkpoints (path -> stamp key) in discovery order, the stamp of
        each of their files (absolute path -> key), and whether one is still settling."""
        from ..io import open_checkpoint

        now = time.monotonic()
        complete: dict[Path, str] = {}
        files: dict[str, str] = {}
        settling = False
        for path, is_dir in candidates(self.src, self.inputs, self.outputs + [self.state_file]):
            st = stamp(self.src, path, is_dir)
            if st is None:
                continue
            k = _key(st)
            if self.first_seen.get(path, ("", 0.0))[0] != k:
                self.first_seen[path] = (k, now)
            if self.failed.get(path) == k:
                continue
            if self.known.get(path) != k:  # judged complete and readable at this very stamp: nothing to redo
                v = judge(self.src, path, is_dir)
                if not v.complete:
                    reason = "not-a-checkpoint" if v.format == "unknown" else "incomplete"
                    if self.told.get(path) != reason:  # once, until it completes (not at every scan)
                        self.told[path] = reason
                        self.emit(event("skipped", path=path, reason=reason, detail=v.reason))
                    continue
                self.told.pop(path, None)
                if now - self.first_seen[path][1] < self.settle:
                    settling = True
                    continue
                try:
                    open_checkpoint(path, key=self.opts.key, trust_pickle=self.opts.trust_pickle).close()
                except CkptavgError as e:
                    self.failed[path] = k
                    self.emit(event("skipped", path=path, reason="unreadable", detail=str(e)))
                    continue
                self.known[path] = k
                self.emit(event("seen", path=path, format=v.format, bytes=None if is_dir else self.src.size(path)))
            complete[path] = k
            if is_dir:
                for entry in st:
                    rel, fst = cast("tuple[str, Any]", entry)
                    files[abs_key(path / str(rel))] = _key(fst)
            else:
                files[abs_key(path)] = k
        return complete, files, settling

    def _due(self, complete: Mapping[Path, str]) -> bool:
        if not complete:
            return False  # nothing yet, or the folder is away for a moment: keep what was published
        now = {os.fspath(p): k for p, k in complete.items()}
        if now == self.failed_set:
            return False  # it failed as it is: retry once something changes
        if self.published is None or not all(o.exists() for o in self.outputs):
            return True
        changed = sum(self.published.get(p) != k for p, k in now.items())
        changed += sum(p not in now for p in self.published)
        return changed >= self.every_new

    # ---- one update -------------------------------------------------------------------------
    def update(self, complete: Mapping[Path, str], files: Mapping[str, str]) -> bool:
        """Average the complete checkpoints into the outputs; True when published."""
        paths = list(complete)
        try:
            report = merge_into(paths, self.output, self.opts, self._group(files))
        except CkptavgError as e:
            self.result.errors += 1
            self.failed_set = {os.fspath(p): k for p, k in complete.items()}
            self.emit(event("error", message=str(e), exit_code=e.exit_code, path=None))
            if e.exit_code == OptionError.exit_code:  # the options are wrong: every update would fail alike
                raise
            return False
        self.published = {os.fspath(p): k for p, k in complete.items()}
        if self.rank == 0:
            self._save_state(self.published)
        d = report.to_dict()
        self.emit(event("published", outputs=[os.fspath(o) for o in self.outputs], inputs=d["inputs"],
                        method=d["method"], bytes_written=report.bytes_written, bytes_read=report.bytes_read,
                        seconds=round(report.seconds, 3)))
        self.result.updates += 1
        self.result.last = report
        if self.prune and self.rank == 0:
            self._prune(report, paths)
        return True

    def _group(self, files: Mapping[str, str]) -> Any:
        """The merge driver's group for one update (one process here; the ranks in :mod:`.ranks`)."""
        return _Checked(files, self.stop)

    def _prune(self, report: MergeReport, paths: list[Path]) -> None:
        """Delete the complete checkpoints ordered before the first one selected: the selections
        --prune allows (windows, ranges, --last, --best) never take them back."""
        from ..planner import build_plan

        everything = replace(self.opts, epochs=None, steps=None, last=None, best=None, method="uniform",
                             decay=None, decay_per_step=None, gamma=None, sigma_rel=None, at=None,
                             bn_spec=None)
        try:
            p = build_plan(paths, everything)
        except CkptavgError as e:  # cannot order them all: delete nothing
            self.emit(event("error", message=f"--prune: nothing deleted: {e}", exit_code=e.exit_code, path=None))
            return
        try:
            ordered = [i.path for i in p.inputs]
        finally:
            close_inputs(p)
        first = report.plan.inputs[0].path
        gone = [q for q in ordered[: ordered.index(first)] if q in paths and q not in report.plan.paths]
        for q in gone:
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q)
            else:
                q.unlink()
            self.known.pop(q, None)
            if self.published is not None:
                self.published.pop(os.fspath(q), None)
        if gone:
            self._save_state(self.published or {})
            self.emit(event("pruned", paths=gone))

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, once: bool = False) -> WatchResult:
        """Watch until a stop is requested (``stop`` set, SIGINT or SIGTERM in the CLI), or, with
        ``once``, do one update if one is due and return."""
        waiter = make_waiter(self.stop, self.poll or once)
        self.emit(event("start", inputs=self.inputs, outputs=[os.fspath(o) for o in self.outputs],
                        mode=waiter.mode, once=once))
        last_update = -math.inf
        try:
            while True:
                todo, wait = self.next_update(once, last_update)
                if todo is not None:
                    self.update(*todo)
                    last_update = time.monotonic()
                if once or self.stop.is_set():
                    break
                waiter.wait(wait, self.folders() if waiter.mode == "inotify" else [])  # polling lists nothing more
                if self.stop.is_set():
                    break
        except StopRequested:
            pass
        finally:
            waiter.close()
        self.emit(event("stopped", reason=self.stop_reason(once), updates=self.result.updates))
        return self.result

    def next_update(self, once: bool, last_update: float
                    ) -> tuple[tuple[dict[Path, str], dict[str, str]] | None, float]:
        """Scan; the update due now (the complete checkpoints and their files' stamps), if any,
        and the seconds to wait before the next scan (at most one update per interval)."""
        complete, files, settling = self.scan()
        if once and settling:
            self.stop.wait(self.settle)
            complete, files, settling = self.scan()
        wait = self.interval
        todo = None
        if self._due(complete):
            gap = self.interval - (time.monotonic() - last_update)
            if once or gap <= 0:
                todo = (complete, files)
            else:
                wait = gap
        elif once:
            self.emit(event("unchanged", checkpoints=len(complete)))
        return todo, (min(wait, self.settle) if settling else wait)

    def folders(self) -> list[Path]:
        """The folders a change notification is asked for."""
        return watched_folders(self.inputs, candidates(self.src, self.inputs))

    def stop_reason(self, once: bool) -> str:
        """The ``stopped`` event's reason: ``once``, ``signal`` (the CLI's handler set the stop) or ``stop``."""
        return "once" if once and not self.stop.is_set() else getattr(self.stop, "reason", "stop")


def _state_file(first: Path) -> Path:
    """Where the watcher remembers what it published: beside a local output; for an output at a URL,
    in the user's cache folder (named after the URL), since the store is not written until an update
    is published."""
    if not is_remote(first):
        return first.parent / f".{first.name}.ckptavg-watch.json"
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckptavg" / "watch"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"{first.name}.{hashlib.sha256(str(first).encode()).hexdigest()[:16]}.json"

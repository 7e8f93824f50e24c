"""``ckptavg watch``: keep an average up to date while training writes checkpoints.

:func:`watch` is the API; :mod:`.complete` judges whether a checkpoint is completely written
(per format), :mod:`.scan` lists the candidates and waits for changes (inotify or polling),
:mod:`.loop` runs scan -> update -> publish through the one merge driver, :mod:`.ranks` the
same across the ranks of torchrun. Events are the
JSON objects of :mod:`ckptavg.events`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .. import distributed
from ..errors import OptionError
from ..options import api_signature, collect, option_fields
from .loop import Watcher, WatchResult

__all__ = ["watch", "Watcher", "WatchResult"]


def watch(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
          once: bool = False, every_new: int = 1, interval: float = 10.0, settle: float = 1.0, prune: bool = False,
          poll: bool = False, on_event: Callable[[dict[str, Any]], None] | None = None,
          stop: threading.Event | None = None, **options: Any) -> WatchResult:
    """Keep ``output`` equal to ``merge(inputs, output, **options)`` over the checkpoints complete so far.

    Each time a new complete checkpoint appears (judged per format: see
    :mod:`ckptavg.watcher.complete`) the whole selection is averaged again through the merge
    driver and published atomically, so ``output`` is byte for byte what :func:`ckptavg.merge`
    writes for those checkpoints. ``once``: one update if one is due, then return (for cron);
    ``every_new``: re-average only after that many new or changed checkpoints; ``interval``:
    at most one update per ``interval`` seconds, and the seconds between scans when polling
    (with inotify a change wakes it sooner); ``settle``: seconds a
    checkpoint's size and times must stay unchanged; ``prune``: delete checkpoints that can no
    longer enter the selection (never by default); ``poll``: never use inotify; ``on_event``:
    called with each event (a dict, see :mod:`ckptavg.events`); ``stop``: set it (from another
    thread) to stop within about a second, abandoning an update in progress. The keyword
    options are those of :func:`ckptavg.merge`.

    Under torchrun (or in an initialised process group; ``distributed=False`` to keep one
    process) every rank calls it with the same arguments: rank 0 scans, decides and reports,
    each update is split across the ranks as :func:`ckptavg.merge` splits one, and a stop on
    any rank stops them all (see :mod:`ckptavg.watcher.ranks`).

    Example::

        import threading, ckptavg
        stop = threading.Event()
        threading.Thread(target=ckptavg.watch, args=("runs/", "swa.safetensors"),
                         kwargs={"last": 5, "stop": stop, "on_event": print}, daemon=True).start()
        ...
        stop.set()
        ckptavg.watch("runs/", "ema.pt", once=True, method="ema", decay=0.9)  # cron: one update
    """
    opts = collect(options, option_fields(), "watch")
    items = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(i) for i in inputs]
    if not items:
        raise OptionError("no input checkpoints given")
    kw: dict[str, Any] = dict(on_event=on_event or (lambda e: None), interval=interval, settle=settle,
                              every_new=every_new, prune=prune, poll=poll, stop=stop)
    if distributed.active(opts.distributed):  # under torchrun: rank 0 watches, every update is split
        from .ranks import RankWatcher

        with distributed.session(opts.device):
            return RankWatcher(items, os.fspath(output), opts, **kw).run(once=once)
    return Watcher(items, os.fspath(output), opts, **kw).run(once=once)


watch.__signature__ = api_signature(watch, option_fields())  # type: ignore[attr-defined]

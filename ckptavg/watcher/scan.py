"""What the watcher looks at: the candidate checkpoints CHECKPOINTS names right now (listing
folders and matching patterns through a :class:`~ckptavg.watcher.complete.Source`, tolerating
folders that are absent for a while), and how it waits for the next change (inotify when the
optional ``inotify_simple`` package is installed and the source is local, else polling).

Example::

    cands = candidates(LocalSource(), ["runs/"], exclude=[Path("runs/swa.pt")])
    waiter = make_waiter(poll=False)
    waiter.wait(10.0, watched_folders(["runs/"], cands))
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..discover import has_checkpoint_suffix, natural_key, skipped_in_folders
from ..io.files import TMP_SUFFIX
from ..io.snapshot_names import EDM2_NAME
from ..io.urls import as_path, is_remote, is_url
from .complete import Source, component_folders, looks_like_checkpoint_folder

__all__ = ["abs_key", "candidates", "watched_folders", "make_waiter", "PollWaiter", "InotifyWaiter"]

_FOLDER_NAME_RE = re.compile(r"^(?:checkpoint-\d+|iter_\d{7}|global_step\d+|.*\.dcp|.*\.ckpt)$")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.endswith(TMP_SUFFIX)


def _children(src: Source, folder: Path) -> list[tuple[Path, bool]]:
    out = []
    for name, is_dir in sorted(src.listdir(folder) or [], key=lambda e: natural_key(e[0])):
        if _hidden(name):
            continue
        p = folder / name
        if is_dir:
            if _FOLDER_NAME_RE.match(name) or looks_like_checkpoint_folder(src, p):
                out.append((p, True))
        elif (has_checkpoint_suffix(name) or EDM2_NAME.match(name)) and not skipped_in_folders(name):
            out.append((p, False))
    # a diffusers training output: its checkpoint-N/ folders holding unet/... are its checkpoints,
    # never the final pipeline's unet/ beside them (as merge discovers it)
    holders = [(p, True) for p, is_dir in out if is_dir and component_folders(src, p)]
    return holders or out


def abs_key(p: Path) -> str:
    """A path as a key: its URL, or a local path made absolute."""
    return str(p) if is_remote(p) else os.path.abspath(p)


_abs = abs_key


def _matches(src: Source, pattern: str) -> list[tuple[Path, bool]]:
    if is_url(pattern):
        parent, _, name = pattern.rpartition("/")
        found = [(as_path(parent) / n, d) for n, d in src.listdir(as_path(parent)) or []
                 if fnmatch.fnmatch(n, name) and not _hidden(n)]
        kept = [e for e in found if e[1] or not skipped_in_folders(e[0].name)]
        return sorted(kept or found, key=lambda e: natural_key(str(e[0])))
    parent, name = os.path.split(pattern)
    if glob.has_magic(parent):  # magic in a folder name: the local file system only
        return sorted(((Path(m), os.path.isdir(m)) for m in glob.glob(pattern)), key=lambda e: natural_key(str(e[0])))
    found = [(Path(parent) / n, d) for n, d in src.listdir(Path(parent or ".")) or []
             if fnmatch.fnmatch(n, name) and not _hidden(n)]
    kept = [e for e in found if e[1] or not skipped_in_folders(e[0].name)]
    return sorted(kept or found, key=lambda e: natural_key(str(e[0])))


def candidates(src: Source, inputs: Sequence[str], exclude: Sequence[Path] = ()) -> list[tuple[Path, bool]]:
    """The checkpoints (path, is a folder) CHECKPOINTS names now, in the order a merge discovers
    them: a folder of checkpoints gives its checkpoint files and checkpoint folders (hidden,
    temporary, alias and training-state names left out, as ``merge`` does); a folder that is
    (or is becoming) one checkpoint gives itself; a pattern gives its matches; a named file
    gives itself. Absent paths give nothing (a folder may be recreated). ``exclude``: the
    watcher's own outputs."""
    skip = {_abs(p) for p in exclude}
    out: list[tuple[Path, bool]] = []
    for item in inputs:
        p = as_path(item)
        if glob.has_magic(item) and src.listdir(p) is None and src.size(p) is None:
            found = _matches(src, item)
        elif src.listdir(p) is not None:
            is_ckpt = looks_like_checkpoint_folder(src, p) or _FOLDER_NAME_RE.match(p.name) is not None
            found = [(p, True)] if is_ckpt else _children(src, p)
        else:
            found = [(p, False)] if src.size(p) is not None else []
        out.extend(e for e in found if _abs(e[0]) not in skip)
    seen: set[Path] = set()
    return [e for e in out if not (e[0] in seen or seen.add(e[0]))]  # type: ignore[func-returns-value]


def watched_folders(inputs: Sequence[str], cands: Sequence[tuple[Path, bool]]) -> list[Path]:
    """The folders whose changes matter: each input folder (or a pattern's folder), its parent
    (to see it recreated), and each candidate checkpoint folder."""
    out: list[Path] = []
    for item in inputs:
        if is_url(item):
            continue  # URLs are polled
        p = Path(item)
        base = Path(os.path.dirname(item) or ".") if glob.has_magic(item) else p
        out += [base, base.parent]
    out += [p for p, is_dir in cands if is_dir]
    return list(dict.fromkeys(out))


class PollWaiter:
    """Waits by sleeping (any source)."""

    mode = "poll"

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def wait(self, timeout: float, folders: Sequence[Path]) -> bool:
        """Sleep ``timeout`` seconds, or until a stop is requested; False (no change was seen)."""
        self.stop.wait(max(0.0, timeout))
        return False

    def close(self) -> None:
        """Nothing to release."""


class InotifyWaiter:
    """Waits for a change in the watched folders (Linux inotify), at most ``timeout`` seconds."""

    mode = "inotify"

    def __init__(self, stop: threading.Event, inotify: Any, flags: Any) -> None:
        self.stop = stop
        self.ino = inotify
        self.mask = (flags.CREATE | flags.MODIFY | flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM
                     | flags.DELETE | flags.DELETE_SELF | flags.MOVE_SELF | flags.ATTRIB)
        self.watched: dict[Path, int] = {}

    def _refresh(self, folders: Sequence[Path]) -> None:
        for f in folders:
            try:  # adding an existing watch again is harmless; a recreated folder needs a new one
                self.watched[f] = self.ino.add_watch(os.fspath(f), self.mask)
            except OSError:
                self.watched.pop(f, None)

    def wait(self, timeout: float, folders: Sequence[Path]) -> bool:
        """Return when something changed in ``folders`` (True), after ``timeout`` seconds or on a
        stop (False)."""
        import time

        self._refresh(folders)
        end = time.monotonic() + max(0.0, timeout)
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            if self.ino.read(timeout=int(min(left, 0.5) * 1000)):
                self.stop.wait(0.05)  # let a burst of writes arrive; then drain what came meanwhile
                self.ino.read(timeout=0)
                return True
        return False

    def close(self) -> None:
        """Release the inotify descriptor."""
        self.ino.close()


def make_waiter(stop: threading.Event, poll: bool) -> PollWaiter | InotifyWaiter:
    """inotify when asked not to poll, the ``inotify_simple`` package is installed and the
    kernel has inotify; polling otherwise."""
    if not poll:
        try:
            from inotify_simple import INotify, flags
            return InotifyWaiter(stop, INotify(), flags)
        except (ImportError, OSError):
            pass
    return PollWaiter(stop)

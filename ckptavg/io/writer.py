"""The Writer protocol every output kind implements, and the choice of writer for an output.

A writer is given the whole plan up front (every entry's name, dtype, shape, and which
entries are aliases of an earlier one) and then receives the tensor bytes as one
sequential stream, in plan order, in pieces of any size (:meth:`Writer.write`). Entries
that alias an earlier entry (tied weights) get no bytes of their own. :meth:`Writer.commit`
publishes the output atomically (temporary name, fsync, rename); :meth:`Writer.abort`
removes everything it wrote and leaves an existing destination untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import OutputError
from .files import signals_blocked, tensor_memoryview
from .folders import publish_folder

__all__ = ["Entry", "Writer", "StreamWriter", "FolderPart", "local_entries"]



@dataclass
class Entry:
    """One tensor of the output."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    alias_of: int | None = None  # index of an earlier entry holding the same tensor

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@runtime_checkable
class Writer(Protocol):
    """What the engine writes into: one output, streamed and published atomically."""

    entries: list[Entry]
    bytes_written: int

    def write(self, data: Any) -> None:
        """Append bytes (a buffer, or a contiguous CPU tensor) to the stream of tensor data."""

    def commit(self) -> None:
        """Publish the complete output (atomically)."""

    def abort(self) -> None:
        """Remove everything written; an existing destination stays untouched."""

    def report(self) -> dict[str, Any]:
        """Writer-specific facts for the merge report (shards, copied files...)."""


class StreamWriter:
    """Base of the writers: splits the incoming byte stream at entry boundaries and calls the
    hooks ``_begin``/``_data``/``_end`` per entry and ``_alias`` for tied entries.

    A subclass whose ``_data`` appends to one stream whatever the entry (and whose ``_begin``
    and ``_end`` do nothing) sets ``_one_stream = True``: the bytes of many consecutive
    entries then reach ``_data`` in one call (100,000 small tensors: a few calls, not 100,000).
    """

    _one_stream = False

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = list(entries)
        self._sizes = [-1 if e.alias_of is not None else e.nbytes for e in self.entries]
        self._i = -1
        self._left = 0
        self.bytes_written = 0
        self._advance()

    def _advance(self) -> None:
        sizes = self._sizes
        while True:
            self._i += 1
            if self._i >= len(sizes):
                return
            size = sizes[self._i]
            if size < 0:
                flush = getattr(getattr(self, "out", None), "flush", None)
                if flush is not None:
                    flush()  # an alias may re-read bytes written earlier
                self._alias(self._i, self.entries[self._i].alias_of)  # type: ignore[arg-type]
                continue
            self._begin(self._i)
            self._left = size
            if size == 0:
                self._end(self._i)
                continue
            return

    def write(self, data: Any) -> None:
        """Append bytes (a buffer, or a contiguous CPU tensor) to the stream of tensor data."""
        mv = tensor_memoryview(data) if isinstance(data, torch.Tensor) else memoryview(data).cast("B")
        sizes = self._sizes
        while mv:
            if self._i >= len(sizes):
                raise RuntimeError("more bytes written than the plan holds")
            n = min(len(mv), self._left)
            if self._one_stream and n < len(mv):
                # extend over the following entries up to the next alias (which re-reads written bytes)
                k = self._i + 1
                while n < len(mv) and k < len(sizes) and sizes[k] >= 0:
                    n += sizes[k]
                    k += 1
                n = min(n, len(mv))
            self._data(self._i, mv[:n])
            self.bytes_written += n
            mv = mv[n:]
            while True:
                if n < self._left:
                    self._left -= n
                    n = 0
                    break
                n -= self._left
                self._left = 0
                self._end(self._i)
                self._advance()
                if n == 0 or self._i >= len(sizes):
                    break
            if n:
                raise RuntimeError("more bytes written than the plan holds")

    def _check_complete(self) -> None:
        if self._i < len(self.entries):
            raise RuntimeError(f"output incomplete: entry {self.entries[self._i].name!r} not fully written")

    # hooks
    def _begin(self, i: int) -> None: ...
    def _data(self, i: int, mv: memoryview) -> None: ...
    def _end(self, i: int) -> None: ...
    def _alias(self, i: int, src: int) -> None: ...


    def report(self) -> dict[str, Any]:
        """Writer-specific facts for the merge report (shards, copied files...)."""
        return {}


class FolderPart:
    """Publishing one rank's part of a folder output that several ranks write together
    (:mod:`ckptavg.distributed`): rank 0 renames the shared temporary folder into place after every
    rank agreed (:meth:`publish`); a rank that made its node's own temporary folder (no shared file
    system with rank 0) renames that one on its node after rank 0 published (:meth:`publish_node`).
    The writer's ``finish`` returns what rank 0 needs from this rank (:meth:`complete` gets every
    rank's), and its ``abort`` removes this rank's own files only."""

    dest: Path
    tmp: Path
    mode: str
    _done: bool

    def complete(self, payloads: Sequence[Any]) -> None:
        """Rank 0, after every rank finished: write what needs every rank's part (an index)."""

    def publish(self) -> None:
        """Rename the shared temporary folder into place (rank 0, after every rank agreed)."""
        try:
            with signals_blocked():
                publish_folder(self.tmp, self.dest, self.mode)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot move the finished folder into place: {e.strerror}") from None
        self._done = True

    def keep(self) -> None:
        """Rank 0 has published: from here on no failure removes this rank's files."""
        self._done = True

    def publish_node(self) -> None:
        """Rename this node's own temporary folder into place on this node (as this node's check
        of the destination found it), after :meth:`keep`; if it cannot be moved, the error says
        where it stays."""
        try:
            with signals_blocked():
                publish_folder(self.tmp, self.dest, self.mode)
        except OSError as e:
            raise OutputError(f"{self.dest}: this node's part stays in {self.tmp}: cannot move it into place "
                              f"({e.strerror})") from None


def local_entries(entries: Sequence[Entry], mine: Sequence[int]) -> list[Entry]:
    """``entries[g] for g in mine``, with alias indices renumbered within ``mine`` (an alias and
    its source are always written by the same rank).

    Example::

        local_entries([Entry("a", torch.float32, (2,)), Entry("b", torch.float32, (2,), alias_of=0)], [0, 1])
    """
    pos = {g: j for j, g in enumerate(mine)}
    out = []
    for g in mine:
        e, src = entries[g], entries[g].alias_of
        out.append(Entry(e.name, e.dtype, e.shape, None if src is None else pos[src]))
    return out

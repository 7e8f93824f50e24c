"""Writer into memory: the output as a state dict of CPU tensors (for :func:`ckptavg.average`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .writer import Entry, StreamWriter

__all__ = ["MemoryWriter"]


class MemoryWriter(StreamWriter):
    """Collects the output into CPU tensors (for :func:`ckptavg.average`)."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.result: dict[str, torch.Tensor] = {}
        self._cur: torch.Tensor | None = None
        self._pos = 0
        super().__init__(entries)

    def _begin(self, i: int) -> None:
        e = self.entries[i]
        t = torch.empty(e.shape, dtype=e.dtype)
        self.result[e.name] = t
        self._cur = t.view(-1).view(torch.uint8) if e.nbytes else None
        self._pos = 0

    def _data(self, i: int, mv: memoryview) -> None:
        assert self._cur is not None
        self._cur[self._pos : self._pos + len(mv)].copy_(torch.frombuffer(mv, dtype=torch.uint8))
        self._pos += len(mv)

    def _alias(self, i: int, src: int) -> None:
        self.result[self.entries[i].name] = self.result[self.entries[src].name]

    def commit(self) -> None:
        self._check_complete()

    def abort(self) -> None:
        self.result.clear()

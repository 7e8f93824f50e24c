"""Writer for ``--keep-structure`` outputs: a torch checkpoint with the last input's object
tree, whose averaged tensors arrive from the engine and whose other tensors are copied byte
for byte from that input when the stream is complete (see :mod:`ckptavg.structure` for what
is kept, averaged and dropped)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import TensorRef
from .torch_out import TensorStub, TorchWriter
from .writer import Entry

__all__ = ["StructuredWriter"]

_COPY_CHUNK = 8 << 20


class StructuredWriter(TorchWriter):
    """A :class:`TorchWriter` over a whole checkpoint tree. The engine writes the averaged
    entries (the first ones); :meth:`commit` then streams the pass-through ``copies``
    (entry index, source tensor) before publishing."""

    def __init__(self, dest: Path, entries: Sequence[Entry], *, tree: Any, stubs: Sequence[TensorStub],
                 copies: list[tuple[int, TensorRef]]) -> None:
        super().__init__(dest, entries, tree, stubs=stubs)
        self.copies = copies

    def commit(self) -> None:
        try:
            self._copy_tensors()
        except BaseException:
            self.abort()
            raise
        super().commit()

    def _copy_tensors(self) -> None:
        buf: bytearray | None = None
        for _j, ref in self.copies:
            n = ref.nbytes
            if n == 0:
                continue
            if buf is None or len(buf) < min(n, _COPY_CHUNK):
                buf = bytearray(min(max(n, 1 << 16), _COPY_CHUNK))
            mv = memoryview(buf)
            try:
                for off in range(0, n, _COPY_CHUNK):
                    m = min(_COPY_CHUNK, n - off)
                    ref.read_into(off, mv[:m])
                    self.write(mv[:m])
            finally:
                ref.release()

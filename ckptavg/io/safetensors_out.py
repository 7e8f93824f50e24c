"""Writer for a ``.safetensors`` file, streamed: the header first (every offset is known from
the plan), then each tensor's bytes as the engine produces them.

Written here rather than with ``safetensors.torch.save_file``, which needs every tensor in
memory at once; the header is the format's plain JSON (``dtype``, ``shape``,
``data_offsets``, ``__metadata__``), padded to 8 bytes as the library pads it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .dtypes import TORCH_TO_SAFETENSORS
from .files import AtomicFile
from .kinds import OutputKind, OutputSetup
from .writer import Entry, StreamWriter

__all__ = ["KIND", "SafetensorsWriter", "safetensors_header"]


def safetensors_header(dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None
                       ) -> tuple[bytes, list[int]]:
    """The length-prefixed header for ``entries`` in order, and each entry's data offset."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets: list[int] = []
    off = 0
    for e in entries:
        if e.dtype not in TORCH_TO_SAFETENSORS:
            raise OutputError(f"{dest}: tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot store")
        header[e.name] = {"dtype": TORCH_TO_SAFETENSORS[e.dtype], "shape": list(e.shape),
                          "data_offsets": [off, off + e.nbytes]}
        offsets.append(off)
        off += e.nbytes
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb, offsets


class SafetensorsWriter(StreamWriter):
    """Streams a ``.safetensors`` file: header first (all offsets known), then data."""

    _one_stream = True  # _data appends to the one file whatever the entry

    def __init__(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None) -> None:
        head, self._offsets = safetensors_header(dest, entries, metadata)
        self._data_start = len(head)
        self.total_size = self._data_start + sum(e.nbytes for e in entries)
        self.out = AtomicFile(dest)
        try:
            self.out.write(head)
            super().__init__(entries)
        except BaseException:
            self.out.abort()
            raise

    def _data(self, i: int, mv: memoryview) -> None:
        self.out.write(mv)

    def _alias(self, i: int, src: int) -> None:
        # safetensors cannot share bytes between names: copy the earlier entry's bytes
        n = self.entries[src].nbytes
        pos = self._data_start + self._offsets[src]
        chunk = 8 << 20
        buf = bytearray(min(n, chunk))
        done = 0
        while done < n:
            k = min(chunk, n - done)
            got = os.preadv(self.out.file.fileno(), [memoryview(buf)[:k]], pos + done)
            if got != k:
                raise OutputError(f"{self.out.dest}: could not re-read written data")
            self.out.write(memoryview(buf)[:k])
            done += k
        self.bytes_written += n

    def commit(self) -> None:
        self._check_complete()
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()




class SafetensorsKind(OutputKind):
    """``-o NAME.safetensors``: one safetensors file with the merge's provenance in its metadata."""

    name = "safetensors"

    def matches(self, path: str) -> bool:
        return path.lower().endswith(".safetensors")

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> SafetensorsWriter:
        return SafetensorsWriter(dest, entries, metadata)


KIND = SafetensorsKind()

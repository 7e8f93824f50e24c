"""The Writer protocol every output kind implements, and the choice of writer for an output.

A writer is given the whole plan up front (every entry's name, dtype, shape, and which
entries are aliases of an earlier one) and then receives the tensor bytes as one
sequential stream, in plan order, in pieces of any size (:meth:`Writer.write`). Entries
that alias an earlier entry (tied weights) get no bytes of their own. :meth:`Writer.commit`
publishes the output atomically (temporary name, fsync, rename); :meth:`Writer.abort`
removes everything it wrote and leaves an existing destination untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import OptionError, OutputError
from .files import CHECKPOINT_SUFFIXES, tensor_memoryview

__all__ = ["Entry", "Writer", "StreamWriter", "output_kind", "open_writer", "write_state_dict", "OUTPUT_KINDS"]

#: output kinds: a single file (by extension), a Hugging Face folder, or in memory
OUTPUT_KINDS = ("safetensors", "torch", "hf-folder", "memory")


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
                out = getattr(self, "out", None)
                if hasattr(out, "flush"):
                    out.flush()  # an alias may re-read bytes written earlier
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


def output_kind(path: str | os.PathLike[str]) -> str:
    """The output kind a path asks for: ``"safetensors"``, ``"torch"`` (``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``, ``.pth.tar``, ``.tar``) or ``"hf-folder"`` (a path ending in ``/``, an
    existing folder, or a name without a file extension)."""
    from .hf_folder_out import is_folder_output

    text = os.fspath(path)
    if is_folder_output(text):
        return "hf-folder"
    low = text.lower()
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith(CHECKPOINT_SUFFIXES):
        return "torch"
    raise OptionError(
        f"{text}: the output must end in .safetensors or .pt/.pth/.bin/.ckpt (the extension picks the format), "
        "or name a folder (ending in /) for Hugging Face sharded safetensors"
    )


def open_writer(kind: str, dest: Path | None, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                **options: Any) -> StreamWriter:
    """The writer for an output kind. ``options`` are the kind's own (``shard_size``,
    ``copy_source``, ``config_dtype`` for folders)."""
    if kind == "memory" or dest is None:
        from .memory_out import MemoryWriter

        return MemoryWriter(entries)
    if kind == "safetensors":
        from .safetensors_out import SafetensorsWriter

        return SafetensorsWriter(dest, entries, metadata)
    if kind == "torch":
        from .torch_out import TorchWriter

        return TorchWriter(dest, entries)
    if kind == "hf-folder":
        from .hf_folder_out import ShardedSafetensorsWriter

        return ShardedSafetensorsWriter(dest, entries, metadata, **options)
    raise OptionError(f"unknown output kind {kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")


def state_dict_entries(state_dict: Mapping[str, torch.Tensor], dest: Any = None
                       ) -> tuple[list[Entry], list[torch.Tensor]]:
    """Entries for an in-memory state dict (tensors sharing one storage become aliases) and the
    tensors whose bytes a writer must receive, in order."""
    entries: list[Entry] = []
    seen: dict[tuple, int] = {}
    tensors: list[torch.Tensor] = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise OutputError(f"{dest}: entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            entries.append(Entry(name, t.dtype, tuple(t.shape), alias_of=seen[key]))
            continue
        if key is not None:
            seen[key] = len(entries)
        entries.append(Entry(name, t.dtype, tuple(t.shape)))
        tensors.append(t)
    return entries, tensors


def feed(writer: Writer, tensors: Sequence[torch.Tensor]) -> None:
    """Stream in-memory tensors (in entry order, aliases left out) into ``writer``."""
    for t in tensors:
        if t.numel():
            writer.write(t.cpu().contiguous())


def write_state_dict(state_dict: Mapping[str, torch.Tensor], dest: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> int:
    """Write an in-memory state dict atomically (kind by the path); returns bytes written.

    Example::

        write_state_dict({"w": torch.ones(2)}, "out.safetensors", {"step": "10"})
    """
    dest = Path(dest)
    entries, tensors = state_dict_entries(state_dict, dest)
    w = open_writer(output_kind(dest), dest, entries, metadata)
    try:
        feed(w, tensors)
        w.commit()
    except BaseException:
        w.abort()
        raise
    return w.bytes_written

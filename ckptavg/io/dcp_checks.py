"""Checks of a DCP folder's claims, made once when it is opened (and once per chunk blob when a
chunk is first read), so that nothing later trusts a type, size or byte range the folder states.

* :func:`checked_metadata`: ``.metadata`` unpickled with the restricted unpickler can still hold
  any allowed value anywhere (an int where a key or offset should be, ``inf`` or negative sizes,
  NUL in a path, attributes shadowing a dict's methods, deep nesting, megabyte keys). Every
  entry is checked for the exact types torch writes, and turned into plain values.
* :class:`ChunkBlob` / :func:`load_small_blob`: a chunk's ``torch.save`` blob is a zip inside the
  data file: its records are checked (:class:`~ckptavg.io.torch_zip.ZipRecords`) before torch
  decompresses anything, and the record holding a tensor's bytes must hold all of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError
from .files import InputFile
from .torch_zip import ZipRecords, exact_offsets, short

__all__ = ["shown", "checked_metadata", "StoredChunk", "chunk_storage", "load_small_blob", "MAX_DIM"]

#: Largest size of one dimension, and of a tensor's element count, a DCP metadata may state.
MAX_DIM = 1 << 62
_MAX_NAME = 4096

#: (data file, byte offset, length, transforms) of one stored item
StoredChunk = tuple[str, int, int, Any]


def shown(x: Any, n: int = 100) -> str:
    """``repr(x)`` on one line, cut to about ``n`` characters (keys and paths may be megabytes)."""
    if isinstance(x, str):
        s = repr(x[: n + 1])
    else:
        s = f"<{type(x).__name__}>"
    return s if len(s) <= n else s[:n] + "...'"


def _ints(x: Any, ndim: int | None = None) -> tuple[int, ...] | None:
    """``x`` as a tuple of non-negative ints (torch.Size, tuple or list of exact ints), else None."""
    if not isinstance(x, (tuple, list)) or (ndim is not None and len(x) != ndim) or len(x) > 64:
        return None
    if not all(type(v) is int and 0 <= v < MAX_DIM for v in x):
        return None
    return tuple(x)


def _tensor_entry(p: Path, fqn: str, tmd: Any) -> None:
    where = f"{p}: tensor {shown(fqn)}"
    props = getattr(tmd, "properties", None)
    if not isinstance(getattr(props, "dtype", None), torch.dtype):
        raise CheckpointReadError(f"{where}: the metadata records no dtype")
    size = _ints(getattr(tmd, "size", None))
    if size is None or math.prod(size) >= MAX_DIM:
        raise CheckpointReadError(f"{where}: malformed size in the metadata (not a list of sizes below 2**62)")
    chunks = getattr(tmd, "chunks", None)
    if not isinstance(chunks, list):
        raise CheckpointReadError(f"{where}: malformed chunks in the metadata (not a list)")
    for c in chunks:
        if _ints(getattr(c, "offsets", None), len(size)) is None or _ints(getattr(c, "sizes", None),
                                                                           len(size)) is None:
            raise CheckpointReadError(f"{where}: malformed chunk in the metadata (offsets and sizes must be "
                                      f"{len(size)} non-negative integers)")


def checked_metadata(p: Path, md: Any) -> tuple[dict[str, Any], dict[tuple[str, tuple[int, ...] | None], StoredChunk]]:
    """``(state_dict_metadata, {(key, chunk offsets): (file, offset, length, transforms)})`` of an
    unpickled ``.metadata`` (``p``), as plain dicts, after checking every entry's types.

    Example::

        sdm, index = checked_metadata(folder / ".metadata", read_metadata(folder, False))
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    raw_sdm = getattr(md, "state_dict_metadata", None)
    raw_storage = getattr(md, "storage_data", None)
    if not isinstance(raw_sdm, dict):
        raise CheckpointReadError(f"{p}: not DCP metadata (state_dict_metadata is {shown(raw_sdm)})")
    if not isinstance(raw_storage, dict):
        raise CheckpointReadError(
            f"{p}: DCP metadata without file storage information (storage_data is {shown(raw_storage)}); only "
            "folders written by FileSystemWriter are supported")
    sdm: dict[str, Any] = {}
    for k, v in dict.items(raw_sdm):  # (dict's own method: a pickle may shadow ``items`` on the instance)
        if not isinstance(k, str) or len(k) > _MAX_NAME or "\0" in k:
            raise CheckpointReadError(f"{p}: malformed DCP metadata: key {shown(k)} (keys are names of at most "
                                      f"{_MAX_NAME} characters)")
        if type(v) is TensorStorageMetadata:
            _tensor_entry(p, k, v)
        elif type(v) is not BytesStorageMetadata:
            raise CheckpointReadError(f"{p}: entry {shown(k)} has an unknown DCP storage type ({shown(v)})")
        sdm[k] = v
    index: dict[tuple[str, tuple[int, ...] | None], StoredChunk] = {}
    for k, v in dict.items(raw_storage):
        fqn, off = getattr(k, "fqn", None), getattr(k, "offset", None)
        offsets = None if off is None else _ints(off)
        if not isinstance(fqn, str) or (off is not None and offsets is None):
            raise CheckpointReadError(f"{p}: malformed DCP metadata: storage entry for {shown(fqn)} (a key and "
                                      "chunk offsets are expected)")
        rel, at, length = (getattr(v, a, None) for a in ("relative_path", "offset", "length"))
        where = f"{p}: tensor {shown(fqn)}"
        if not isinstance(rel, str) or not rel or "\0" in rel or len(rel) > _MAX_NAME or os.path.isabs(rel) or (
                ".." in Path(rel).parts):
            raise CheckpointReadError(f"{where}: bad data file name {shown(rel)} in the metadata")
        if type(at) is not int or type(length) is not int or not (0 <= at < MAX_DIM and 0 <= length < MAX_DIM):
            raise CheckpointReadError(f"{where}: bad storage entry in the metadata (offset {shown(at)}, length "
                                      f"{shown(length)})")
        index[(fqn, offsets)] = (rel, at, length, getattr(v, "transform_descriptors", None))
    return sdm, index


def _view(fh: Any, off: int, length: int) -> Any:
    """Bytes ``[off, off + length)`` of an open file as a file (torch's own view, as DCP's reader uses)."""
    from torch.distributed.checkpoint.utils import _create_file_view

    return _create_file_view(fh, off, length)


def chunk_storage(f: InputFile, blob: int, length: int, where: str) -> tuple[torch.Tensor, int]:
    """The chunk tensor of a ``torch.save`` blob (bytes ``[blob, blob + length)`` of ``f``) on
    the meta device, and the absolute offset of its storage's bytes, after checking the blob's zip
    records and that the record holding the storage holds all its bytes.

    Example::

        t, data = chunk_storage(f, 0, f.size, "chunk at [0, 0] in __0_0.distcp")
    """
    recs = ZipRecords(f, where, "chunk", blob, length)
    if recs.byteorder not in (None, b"little"):  # (torch's meta loading crashes on big-endian archives)
        raise CheckpointReadError(f"{where}: a chunk saved with byte order {recs.byteorder[:16]!r}; ckptavg reads "
                                  "little-endian chunks")
    try:
        with f.open_stream() as fh, exact_offsets():
            t = torch.load(_view(fh, blob, length), map_location="meta", weights_only=True)
    except Exception as e:
        raise CheckpointReadError(f"{where}: damaged chunk ({type(e).__name__}: {short(e)})") from None
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise CheckpointReadError(f"{where} does not hold a dense tensor ({type(t).__name__})")
    st = torch.Tensor.untyped_storage(t)
    rec = getattr(st, "_checkpoint_offset", None)
    if not isinstance(rec, int):
        raise CheckpointReadError(f"{where}: unsupported chunk layout")
    name, size = recs.record_at(int(rec))
    if "/data/" not in name or st.nbytes() != size:  # (torch.load refuses a record of another size)
        raise CheckpointReadError(
            f"{where}: damaged chunk: its tensor's storage is {st.nbytes()} bytes but its data record "
            f"{shown(name.split('/')[-1], 40)} holds {size}")
    return t, blob + int(rec)


def load_small_blob(f: InputFile, off: int, length: int, where: str, cap: int) -> Any:
    """A small non-tensor DCP item (a ``torch.save`` blob such as ``step``), loaded weights-only
    after its zip records are checked and its tensors' records shown to hold their bytes (at
    most ``cap`` bytes of them)."""
    if f.pread(off, 4) != b"PK\x03\x04":
        raise CheckpointReadError(f"{where}: not a torch.save blob")
    recs = ZipRecords(f, where, "item", off, length)

    with f.open_stream() as fh:
        with exact_offsets():
            meta = torch.load(_view(fh, off, length), map_location="meta", weights_only=True)
        total = 0
        stack, seen = [meta], 0
        while stack and seen < 10_000:
            o = stack.pop()
            seen += 1
            if isinstance(o, torch.Tensor):
                st = torch.Tensor.untyped_storage(o)
                _name, size = recs.record_at(int(getattr(st, "_checkpoint_offset", -1)))
                total += st.nbytes()
                if st.nbytes() != size or total > cap:
                    raise CheckpointReadError(f"{where}: damaged item (a tensor larger than its record)")
            elif isinstance(o, dict):
                stack.extend(dict.values(o))
            elif isinstance(o, (list, tuple)):
                stack.extend(o)
        if stack:
            raise CheckpointReadError(f"{where}: item too complex")
        return torch.load(_view(fh, off, length), map_location="cpu", weights_only=True)

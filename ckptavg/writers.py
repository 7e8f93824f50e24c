"""Writers: stream one model file to disk, atomically.

A writer is given the whole plan up front (every entry's name, dtype, shape) and then
receives the tensor bytes as one sequential stream, in plan order, in pieces of any
size. Entries marked as an alias of an earlier entry (tied weights) get no bytes of
their own: the ``.pt`` writer makes both names share one storage, the safetensors
writer (whose format cannot share) writes a second copy from the first.

Every writer writes to a temporary file created next to the destination, fsyncs it
and renames it over the destination only once complete; on any error or interrupt
the temporary file is removed and an existing destination is left untouched.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError
from .readers import SAFETENSORS_DTYPES

__all__ = ["Entry", "AtomicFile", "SafetensorsWriter", "TorchWriter", "MemoryWriter", "open_writer",
           "save_state_dict", "output_format", "tensor_memoryview"]

_TORCH_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: identical inputs give byte-identical files


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


def output_format(path: str | os.PathLike[str]) -> str:
    """``"safetensors"`` or ``"torch"`` from the output file's extension."""
    name = os.fspath(path).lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    return "torch"


# --------------------------------------------------------------------------------------
# atomic file


class AtomicFile:
    """A temporary file beside ``dest`` that becomes ``dest`` on :meth:`commit`."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        parent = self.dest.parent
        if self.dest.is_dir():
            raise OutputError(f"{self.dest}: is a folder; give a file name ending in .pt or .safetensors")
        for anc in [parent, *parent.parents]:
            if anc.exists():
                if not anc.is_dir():
                    raise OutputError(f"{self.dest}: cannot create the output folder: {anc} is a file")
                break
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot create the output folder {parent}: {e.strerror}") from None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=".ckptavg-tmp", dir=parent)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot write in {parent}: {e.strerror}") from None
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "w+b", buffering=0)
        self._done = False

    def write(self, data: Any) -> None:
        try:
            mv = memoryview(data).cast("B")
            while mv:
                n = self.file.write(mv)
                mv = mv[n:]
        except OSError as e:
            raise OutputError(f"{self.dest}: write failed: {e.strerror}") from None

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            mode = 0o666 & ~_umask()
            os.chmod(self.tmp, mode)
            os.replace(self.tmp, self.dest)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.dest}: cannot finish writing: {e.strerror}") from None
        self._done = True
        try:
            dfd = os.open(self.dest.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink()
        except OSError:
            pass


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# --------------------------------------------------------------------------------------
# stream bookkeeping shared by the writers


class _StreamWriter:
    """Splits the incoming byte stream at entry boundaries and handles aliases."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = list(entries)
        self._i = -1
        self._left = 0
        self.bytes_written = 0
        self._advance()

    def _advance(self) -> None:
        while True:
            self._i += 1
            if self._i >= len(self.entries):
                return
            e = self.entries[self._i]
            if e.alias_of is not None:
                self._alias(self._i, e.alias_of)
                continue
            self._begin(self._i)
            self._left = e.nbytes
            if self._left == 0:
                self._end(self._i)
                continue
            return

    def write(self, data: Any) -> None:
        """Append bytes (a buffer, or a contiguous CPU tensor) to the stream of tensor data."""
        mv = tensor_memoryview(data) if isinstance(data, torch.Tensor) else memoryview(data).cast("B")
        while mv:
            if self._i >= len(self.entries):
                raise RuntimeError("more bytes written than the plan holds")
            n = min(len(mv), self._left)
            self._data(self._i, mv[:n])
            self.bytes_written += n
            self._left -= n
            mv = mv[n:]
            if self._left == 0:
                self._end(self._i)
                self._advance()

    def _check_complete(self) -> None:
        if self._i < len(self.entries):
            raise RuntimeError(f"output incomplete: entry {self.entries[self._i].name!r} not fully written")

    # hooks
    def _begin(self, i: int) -> None: ...
    def _data(self, i: int, mv: memoryview) -> None: ...
    def _end(self, i: int) -> None: ...
    def _alias(self, i: int, src: int) -> None: ...


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's memory.

    The caller must keep ``t`` alive for as long as the view is used.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_memoryview needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    import ctypes

    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


# --------------------------------------------------------------------------------------
# safetensors


class SafetensorsWriter(_StreamWriter):
    """Streams a ``.safetensors`` file: header first (all offsets known), then data."""

    def __init__(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None) -> None:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._offsets: list[int] = []
        off = 0
        for e in entries:
            if e.dtype not in _TORCH_TO_ST:
                raise OutputError(f"{dest}: tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot store")
            header[e.name] = {"dtype": _TORCH_TO_ST[e.dtype], "shape": list(e.shape),
                              "data_offsets": [off, off + e.nbytes]}
            self._offsets.append(off)
            off += e.nbytes
        hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        hb += b" " * (-len(hb) % 8)
        self._data_start = 8 + len(hb)
        self.total_size = self._data_start + off
        self.out = AtomicFile(dest)
        try:
            self.out.write(struct.pack("<Q", len(hb)) + hb)
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


# --------------------------------------------------------------------------------------
# torch zip (.pt)


class _StorageRef:
    __slots__ = ("key", "dtype", "nbytes")

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int) -> None:
        self.key, self.dtype, self.nbytes = key, dtype, nbytes


_LEGACY_STORAGE = {dt: getattr(torch, name) for dt, name in torch.storage._dtype_to_storage_type_map().items()
                   if hasattr(torch, name)}


class TensorStub:
    """Stands for a tensor in an object tree given to :class:`TorchWriter`.

    Pickles exactly like ``torch.save`` pickles a contiguous CPU tensor, pointing at
    the storage record the writer streams the data into.
    """

    __slots__ = ("storage", "shape", "requires_grad", "param")

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...], param: bool = False) -> None:
        self.storage = storage
        self.shape = tuple(shape)
        self.param = param

    def __reduce__(self) -> Any:
        stride = []
        acc = 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= max(s, 1)
        stride_t = tuple(reversed(stride))
        dt = self.storage.dtype
        if dt in _LEGACY_STORAGE:
            return (torch._utils._rebuild_tensor_v2,
                    (self.storage, 0, self.shape, stride_t, False, OrderedDict()))
        return (torch._utils._rebuild_tensor_v3,
                (self.storage, 0, self.shape, stride_t, False, OrderedDict(), dt))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            dt = obj.dtype
            if dt in _LEGACY_STORAGE:
                return ("storage", _LEGACY_STORAGE[dt], obj.key, "cpu", obj.nbytes // dt.itemsize)
            return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.nbytes)
        return None


class TorchWriter(_StreamWriter):
    """Streams a torch zip checkpoint that ``torch.load(weights_only=True)`` reads.

    ``obj`` is the object tree to save (by default ``{name: tensor}`` for the entries);
    it may hold :class:`TensorStub` leaves made with :meth:`stub` for each entry.
    """

    def __init__(self, dest: Path, entries: Sequence[Entry], obj: Any = None, *,
                 stubs: Sequence[TensorStub] | None = None) -> None:
        self.dest = Path(dest)
        self._storages: list[_StorageRef] = []
        made: list[TensorStub] = []
        for e in entries:
            if e.alias_of is not None:
                made.append(made[e.alias_of])
                continue
            sref = _StorageRef(str(len(self._storages)), e.dtype, e.nbytes)
            self._storages.append(sref)
            made.append(TensorStub(sref, e.shape))
        self.stubs = made if stubs is None else list(stubs)
        if obj is None:
            obj = {e.name: s for e, s in zip(entries, self.stubs)}
        buf = io.BytesIO()
        try:
            _Pickler(buf, protocol=2).dump(obj)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise OutputError(f"{self.dest}: cannot serialise the checkpoint structure: {e}") from None
        self.out = AtomicFile(self.dest)
        try:
            self.zf = zipfile.ZipFile(_Sink(self.out), mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self._prefix = "archive/"
            self._record("data.pkl", buf.getvalue())
            self._record(".format_version", b"1")
            self._record(".storage_alignment", b"64")
            self._record("byteorder", b"little")
            self._w: Any = None
            super().__init__(entries)
        except BaseException:
            self.out.abort()
            raise

    def _zinfo(self, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
        zi = zipfile.ZipInfo(self._prefix + name, date_time=_ZIP_DATE)
        zi.compress_type = zipfile.ZIP_STORED
        zi.file_size = size
        zi.create_system = 3
        zi.external_attr = 0o600 << 16
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
        pos = self.zf.start_dir
        head = 30 + len(zi.filename.encode("utf-8")) + (20 if zip64 else 0) + 4
        pad = -(pos + head) % 64
        zi.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        return zi, zip64

    def _record(self, name: str, data: bytes) -> None:
        zi, zip64 = self._zinfo(name, len(data))
        with self.zf.open(zi, mode="w", force_zip64=zip64) as w:
            w.write(data)

    def _begin(self, i: int) -> None:
        e = self.entries[i]
        key = self.stubs[i].storage.key
        zi, zip64 = self._zinfo(f"data/{key}", e.nbytes)
        self._w = self.zf.open(zi, mode="w", force_zip64=zip64)

    def _data(self, i: int, mv: memoryview) -> None:
        self._w.write(mv)

    def _end(self, i: int) -> None:
        self._w.close()
        self._w = None

    def _alias(self, i: int, src: int) -> None:
        pass  # the pickle already points both names at one storage

    def commit(self) -> None:
        self._check_complete()
        try:
            self._record("version", b"3\n")
            self.zf.close()
        except BaseException:
            self.abort()
            raise
        self.out.commit()

    def abort(self) -> None:
        # Drop the half-written archive without finishing it (and stop ZipFile.__del__
        # from trying to close it later).
        self._w = None
        self.zf._writing = False
        self.zf.fp = None
        self.out.abort()


class _Sink(io.RawIOBase):
    """File object for zipfile that writes through an :class:`AtomicFile`."""

    def __init__(self, out: AtomicFile) -> None:
        self.out = out
        self._f = out.file

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self.out.write(mv)
        return len(mv)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# in memory


class MemoryWriter(_StreamWriter):
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


def open_writer(dest: Path | None, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                fmt: str | None = None) -> SafetensorsWriter | TorchWriter | MemoryWriter:
    """The writer for ``dest`` chosen by its extension (``None``: in memory)."""
    if dest is None:
        return MemoryWriter(entries)
    fmt = fmt or output_format(dest)
    if fmt == "safetensors":
        return SafetensorsWriter(dest, entries, metadata)
    return TorchWriter(dest, entries)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], dest: str | os.PathLike[str],
                    metadata: Mapping[str, str] | None = None) -> int:
    """Write an in-memory state dict atomically (format by extension); returns bytes written.

    Tensors sharing one storage are written once in ``.pt`` files and once per name in
    ``.safetensors`` files.
    """
    dest = Path(dest)
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
    w = open_writer(dest, entries, metadata)
    try:
        for t in tensors:
            if t.numel():
                w.write(t.cpu().contiguous())
        w.commit()
    except BaseException:
        w.abort()
        raise
    return w.bytes_written

"""Writer for torch checkpoints (``.pt``/``.pth``/``.bin``/``.ckpt``), streamed.

Written by hand rather than with ``torch.save``, which needs every tensor in memory: the
zip archive is produced record by record with :mod:`zipfile` (stored, 64-byte aligned as
torch aligns it), the pickle is built from :class:`TensorStub` s that pickle exactly like
``torch.save`` pickles a contiguous CPU tensor, and dates are fixed so that identical
inputs give byte-identical files (torch's own writer stamps no dates either; zipfile
computes each record's CRC as the bytes stream through). ``torch.load(weights_only=True)``
and ``mmap=True`` read the result.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError
from .files import CHECKPOINT_SUFFIXES, AtomicFile
from .kinds import OutputKind, OutputSetup
from .writer import Entry, StreamWriter

__all__ = ["KIND", "TorchWriter", "TensorStub", "StorageRef", "refuse_reduce_hooks"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: identical inputs give byte-identical files


class StorageRef:
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

    def __init__(self, storage: StorageRef, shape: tuple[int, ...], param: bool = False) -> None:
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


#: attributes through which an object chooses what runs when it is pickled
_REDUCE_HOOKS = frozenset({"__reduce_ex__", "__reduce__", "__getstate__", "__getnewargs__", "__getnewargs_ex__"})


def refuse_reduce_hooks(obj: Any) -> Any:
    """``reducer_override`` for picklers of a tree that came from a checkpoint: an object whose own
    attributes (set when the checkpoint was loaded) name what pickling calls would choose a callable
    that runs while ckptavg saves; refuse it. Everything else pickles as usual (NotImplemented).

    Example::

        class P(pickle.Pickler):
            reducer_override = staticmethod(refuse_reduce_hooks)
    """
    own = getattr(obj, "__dict__", None)
    if isinstance(own, dict) and not isinstance(obj, type):
        hooks = sorted(k for k in own if k in _REDUCE_HOOKS)
        if hooks:
            raise pickle.PicklingError(
                f"a {type(obj).__name__} object sets {hooks[0]} itself, which would choose code to run while "
                "it is saved")
    return NotImplemented


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        return refuse_reduce_hooks(obj)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            dt = obj.dtype
            if dt in _LEGACY_STORAGE:
                return ("storage", _LEGACY_STORAGE[dt], obj.key, "cpu", obj.nbytes // dt.itemsize)
            return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.nbytes)
        return None


class TorchWriter(StreamWriter):
    """Streams a torch zip checkpoint that ``torch.load(weights_only=True)`` reads.

    ``obj`` is the object tree to save (by default ``{name: tensor}`` for the entries);
    it may hold :class:`TensorStub` leaves made with :meth:`stub` for each entry.
    """

    def __init__(self, dest: Path, entries: Sequence[Entry], obj: Any = None, *,
                 stubs: Sequence[TensorStub] | None = None, out: Any = None) -> None:
        self.dest = Path(dest)
        self._storages: list[StorageRef] = []
        made: list[TensorStub] = []
        for e in entries:
            if e.alias_of is not None:
                made.append(made[e.alias_of])
                continue
            sref = StorageRef(str(len(self._storages)), e.dtype, e.nbytes)
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
        # ``out``: an open AtomicFile-like target to write into instead of a new temporary file
        # for ``dest`` (the DCP writer embeds one such archive per tensor)
        self.out = out if out is not None else AtomicFile(self.dest)
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
        self.zf._writing = False  # type: ignore[attr-defined]  # zipfile keeps no public way to drop a stream
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


class TorchKind(OutputKind):
    """``-o NAME.pt`` (``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``, ``.tar``): a torch zip checkpoint
    holding a plain state dict, or with ``--keep-structure`` the last input's whole checkpoint.
    A plain state dict has no place for metadata: sweeps and soups write a JSON sidecar."""

    name = "torch"
    options = frozenset({"keep_structure"})
    stores_metadata = False

    def matches(self, path: str) -> bool:
        return path.lower().endswith(CHECKPOINT_SUFFIXES)

    def notes(self, dest: Path, objects: Sequence[Any], keep_structure: bool) -> list[str]:
        lightning = any(isinstance(o, dict) and "pytorch-lightning_version" in o for o in objects)
        if not lightning or keep_structure:
            return []
        return [f"{dest}: written as a plain state dict (name -> tensor), which Lightning's load_from_checkpoint "
                "cannot load; add --keep-structure for a Lightning checkpoint, or load it with "
                "model.load_state_dict(torch.load(...))"]

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> TorchWriter:
        return TorchWriter(dest, entries)


KIND = TorchKind()

"""Reader for torch checkpoints (``torch.save`` zip files of any extension, and legacy files).

A zip checkpoint is described with torch's own loader: ``torch.load(path,
map_location="meta", weights_only=True)`` runs the pickle through torch's vetted
``weights_only`` unpickler and places every storage on the ``meta`` device, so the whole
object tree (dtypes, shapes, strides, tied tensors, metadata such as epoch and step) is
known without reading tensor data; torch records on each storage the absolute file offset
of its bytes (``_checkpoint_offset``, torch >= 2.7). The tensors' bytes are then read with
positioned reads at those offsets.

What is checked here, because loading to ``meta`` reads no data and torch checks none of
it then: the zip directory (via :mod:`zipfile`: one ``data.pkl``, one top-level folder, no
two members of one name, the pickle's CRC), each storage against its zip record (it must
lie inside the record the pickle names), and each tensor view against its storage (offset,
size and stride inside the storage, no overlapping elements), so that no allocation is ever
sized from the file's claims before they are checked against the file.

Legacy (pre-1.6, non-zip) files cannot be read piecewise: they are loaded whole with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import pathlib
import pickle
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import CheckpointReadError, CkptavgWarning, UnsafePickleError
from .checkpoint import Checkpoint, CheckpointMeta, TensorRef
from .files import InputFile
from .metadata import apply_name_metadata, find_state_dict, meta_from_object
from .torch_storages import effective_storages
from .torch_zip import ZipRecords, exact_offsets, short
from .urls import is_remote

__all__ = ["open_torch", "open_torch_tree", "open_torch_legacy", "SAFE_GLOBALS", "LAZY_SAFE_GLOBALS", "is_torch_zip",
           "is_legacy_pickle"]

_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}

#: Harmless non-tensor classes real training frameworks put into checkpoints, allowed on top of
#: torch's own ``weights_only`` allowlist (and of ``torch.serialization.add_safe_globals``).
#: Each only stores attributes, items, path parts or a number when unpickled; none runs code.
#: ``argparse.Namespace``: timm's CheckpointSaver and fairseq store their command-line args.
#: ``pathlib`` paths: Lightning hyper-parameters and configs often hold paths.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                           pathlib.PureWindowsPath]

#: More harmless classes, by the name a pickle uses, imported only when a checkpoint needs one
#: and its package is installed: numpy scalars and their dtypes (metrics such as timm's
#: ``best_metric`` saved as ``numpy.float64``). Nothing that can run code is listed.
#: (Lightning's ``save_checkpoint`` stores hyper-parameters as a plain dict, so a LightningModule's
#: Namespace/path/dict hparams need only :data:`SAFE_GLOBALS`; its ``AttributeDict`` cannot be
#: listed: torch's weights_only unpickler fills no dict subclass but OrderedDict and Counter.)
LAZY_SAFE_GLOBALS: dict[str, str] = {
    "numpy._core.multiarray.scalar": "numpy:_core.multiarray.scalar",
    "numpy.core.multiarray.scalar": "numpy:_core.multiarray.scalar",
    "numpy.dtype": "numpy:dtype",
    **{f"numpy.dtypes.{n}DType": f"numpy:dtypes.{n}DType" for n in (
        "Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Long", "ULong",
        "LongLong", "ULongLong", "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128",
        "CLongDouble")},
}


def _lazy_safe_global(name: str) -> Any | None:
    """The object a pickle names ``name`` if it is in :data:`LAZY_SAFE_GLOBALS` and importable."""
    target = LAZY_SAFE_GLOBALS.get(name)
    if target is None:
        return None
    module, attr = target.split(":")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) or callable(obj) else None


def _weights_only_load(path: Any, map_location: str) -> Any:
    """``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS`, and with each of
    :data:`LAZY_SAFE_GLOBALS` the pickle turns out to need (imported on first need)."""
    extra: list[Any] = []
    while True:
        try:
            with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra]):
                if hasattr(path, "seek"):
                    path.seek(0)  # a stream (a URL's file): every attempt reads from the start
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            name = _unsafe_global(str(e))
            obj = _lazy_safe_global(name) if name is not None and len(extra) < len(LAZY_SAFE_GLOBALS) else None
            if obj is None or any(obj is x or (isinstance(x, tuple) and x[0] is obj and x[1] == name)
                                  for x in extra):
                raise
            extra.append((obj, name) if isinstance(obj, type) and name != f"{obj.__module__}.{obj.__qualname__}"
                         else obj)


def is_torch_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"


def is_legacy_pickle(head: bytes) -> bool:
    return head[:1] == b"\x80"


def _refuse_unsafe(path: Any, e: Exception, trust_pickle: bool) -> None:
    """Raise the refusal for a pickle that names a global weights-only loading does not allow."""
    bad = _unsafe_global(str(e))
    if bad is not None and not trust_pickle:
        raise UnsafePickleError(
            f"{path}: refusing to load: the pickle needs {bad}, which weights_only loading does not allow "
            f"(it could run code); pass --trust-pickle (trust_pickle=True) only if you trust this file"
        ) from None


@contextlib.contextmanager
def _load_source(f: InputFile) -> Iterator[Any]:
    """What ``torch.load`` reads: a local file's path, or a URL's file as a range-reading stream."""
    if is_remote(f.path):
        with f.open_stream() as stream:
            yield stream
    else:
        yield f.path


def _load_meta(f: InputFile, trust_pickle: bool) -> tuple[Any, list[int]]:
    """The checkpoint's object tree with every storage on the meta device (no data read), each
    storage's offset read from its record's local header (:func:`exact_offsets`), and the
    offsets torch asked for, in order."""
    try:
        with exact_offsets() as calls, _load_source(f) as src:
            if trust_pickle:
                return torch.load(src, map_location="meta", weights_only=False), calls
            return _weights_only_load(src, "meta"), calls
    except pickle.UnpicklingError as e:
        _refuse_unsafe(f.path, e, trust_pickle)
        raise CheckpointReadError(f"{f.path}: not a valid torch checkpoint (bad pickle: {short(e)})") from None
    except (MemoryError, RecursionError, OverflowError) as e:
        raise CheckpointReadError(f"{f.path}: not a valid torch checkpoint ({type(e).__name__})") from None
    except Exception as e:  # a damaged pickle or zip can fail in any way while being parsed
        raise CheckpointReadError(f"{f.path}: not a valid torch checkpoint ({type(e).__name__}: {short(e)})") from None


_MAX_OBJECTS = 10_000_000


def _unshadow(obj: Any, path: Any) -> None:
    """Remove instance attributes that a pickle set on dicts and tensors to shadow their methods
    (BUILD on an ``OrderedDict`` making ``items`` ``5``; ``_rebuild_from_type_v2`` setting a
    tensor's ``stride``), everywhere in the object tree, so that the code reading the tree calls
    the real methods. Walks iteratively (any depth, cycles)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if len(seen) > _MAX_OBJECTS:
            raise CheckpointReadError(f"{path}: not a valid torch checkpoint (more than {_MAX_OBJECTS} objects)")
        if isinstance(o, (dict, torch.Tensor)):
            attrs = getattr(o, "__dict__", None)
            if isinstance(attrs, dict) and attrs:
                for k in [k for k in attrs if not isinstance(k, str) or hasattr(type(o), k)]:
                    del attrs[k]
            if isinstance(o, dict):
                stack.extend(dict.values(o))
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


def _check_view(path: Any, name: str, t: torch.Tensor, storage_nbytes: int, itemsize: int) -> None:
    """The view (offset, size, stride) must lie inside its storage and not overlap itself."""
    shape, stride, soff = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    where = f"{path}: tensor {name!r}"
    if soff < 0 or any(s < 0 for s in stride) or any(n < 0 for n in shape):
        raise CheckpointReadError(f"{where}: invalid view (negative offset, size or stride)")
    if t.numel() == 0:
        return
    # non-overlapping: with dims sorted by stride, each stride must step over everything before it
    extent = 0
    for n, st in sorted(((n, st) for n, st in zip(shape, stride) if n > 1), key=lambda x: x[1]):
        if st <= extent:
            raise CheckpointReadError(f"{where}: its elements overlap in storage (stride {list(stride)}); "
                                      "expanded or overlapping views are not supported")
        extent += (n - 1) * st
    end = (soff + extent + 1) * itemsize
    if end > storage_nbytes:
        raise CheckpointReadError(
            f"{where}: the view (offset {soff}, shape {list(shape)}, stride {list(stride)}) runs past its storage "
            f"({storage_nbytes} bytes)"
        )


def open_torch(f: InputFile, key: str | None, trust_pickle: bool) -> Checkpoint:
    """Describe a torch zip checkpoint (no tensor data read)."""
    ckpt = open_torch_tree(f, trust_pickle)
    sd, wkey = find_state_dict(ckpt.obj, key, f.path)
    for name, t in sd.items():
        if isinstance(t, torch.Tensor):
            ckpt.tensors[str(name)] = ckpt.ref_for(t, str(name))
    ckpt.weights_key = wkey
    meta_from_object(ckpt)
    apply_name_metadata(ckpt)
    return ckpt


def open_torch_tree(f: InputFile, trust_pickle: bool) -> Checkpoint:
    """A torch zip checkpoint's object tree (``obj``, tensors on the meta device) with no state dict
    chosen (``tensors`` empty): :meth:`Checkpoint.ref_for` gives any tensor's checked byte location.
    Readers of formats that spread a model over several ``torch.save`` files start here."""
    recs = ZipRecords(f, str(f.path))
    byteswap = False
    if recs.byteorder is not None:
        if recs.byteorder not in (b"little", b"big"):
            raise CheckpointReadError(f"{f.path}: damaged torch checkpoint: unknown byte order {recs.byteorder[:16]!r}")
        byteswap = recs.byteorder.decode() != sys.byteorder
        if recs.byteorder == b"big":
            # torch's meta loading (which describes the file without reading it) crashes the whole
            # process on big-endian archives: refuse before torch sees the file
            raise CheckpointReadError(
                f"{f.path}: a big-endian torch checkpoint (its byteorder record says 'big'); ckptavg reads "
                "little-endian ones: load it with torch.load and save it again with torch.save on a little-endian "
                "machine")
    if trust_pickle:
        warnings.warn(
            CkptavgWarning(f"{f.path}: loading with full unpickling (--trust-pickle): code in this file can run"),
            stacklevel=4,
        )
    obj, calls = _load_meta(f, trust_pickle)
    fixed = effective_storages(obj, calls, str(f.path))  # tensors torch.load gives another storage's dtype
    checked: dict[int, tuple[str, int]] = {}  # storage data offset -> (record name, record size)
    sources: dict[int, TensorRef] = {}

    def make_ref(t: torch.Tensor, name: str) -> TensorRef:
        if id(t) in sources:
            return sources[id(t)]
        st = t.untyped_storage()
        dtype, nbytes = fixed.get(id(t)) or (t.dtype, st.nbytes())
        if dtype in _QUANTIZED or t.is_quantized:
            raise CheckpointReadError(
                f"{f.path}: tensor {name!r} is quantized ({dtype}); dequantize the model before averaging"
            )
        if t.layout != torch.strided:
            raise CheckpointReadError(
                f"{f.path}: tensor {name!r} has layout {t.layout}; only dense tensors are supported"
            )
        off = getattr(st, "_checkpoint_offset", None)
        if not isinstance(off, int):
            raise CheckpointReadError(
                f"{f.path}: tensor {name!r}: torch {torch.__version__} did not report where its bytes are "
                "(ckptavg needs torch >= 2.7)"
            )
        off = int(off)
        if off not in checked:
            rname, rsize = recs.record_at(off)
            if "/data/" not in rname:
                raise CheckpointReadError(f"{f.path}: damaged torch checkpoint: tensor {name!r} has no data record")
            checked[off] = (rname, rsize)
        rname, rsize = checked[off]
        if nbytes != rsize or off + nbytes > f.size:  # (torch.load refuses a record of another size too)
            raise CheckpointReadError(
                f"{f.path}: damaged torch checkpoint: tensor {name!r} names a storage of {nbytes} bytes, "
                f"its record {rname.split('/')[-1]!r} holds {rsize}"
            )
        _check_view(f.path, name, t, nbytes, dtype.itemsize)
        shape, stride, soff = tuple(t.shape), tuple(t.stride()), int(t.storage_offset())
        contiguous = t.is_contiguous() or t.numel() <= 1
        ref = TensorRef(name=name, dtype=dtype, shape=shape, file=f, byteswap=byteswap)
        ref.alias_key = (off, soff, shape, stride if not contiguous else None)
        if contiguous:
            ref.offset = off + soff * dtype.itemsize
        else:
            ref.strided = (off, nbytes, soff, stride)
        sources[id(t)] = ref
        return ref

    _unshadow(obj, f.path)
    ckpt = Checkpoint(path=f.path, format="torch", tensors={}, meta=CheckpointMeta(), size=f.size, obj=obj,
                      files=[f])
    ckpt._tensor_source = sources
    # Tensors outside the state dict (metrics saved as tensors, other weight sets) get refs on demand.
    ckpt._make_ref = make_ref
    return ckpt


def _walk_tensors(obj: Any, fn: Any, path: str = "", depth: int = 0) -> None:
    if depth > 50:
        return
    if isinstance(obj, torch.Tensor):
        try:
            fn(obj, path)
        except CheckpointReadError:
            pass  # not needed unless used; it will fail again if it is
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _walk_tensors(v, fn, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk_tensors(v, fn, f"{path}.{i}" if path else str(i), depth + 1)


# --------------------------------------------------------------------------------------
# legacy torch files


def _is_plain_pickle(f: InputFile) -> bool:
    """A pickle that is no torch file: torch's legacy format opens with its magic number (a protocol-2
    LONG1 of 10 bytes); EDM2's network pickles are ``pickle.dump`` of a dict holding modules."""
    head = f.pread(0, min(f.size, 4))
    return head[:1] == b"\x80" and head[2:4] != b"\x8a\x0a"


def _load_plain_pickle(f: InputFile, trust_pickle: bool) -> Any:
    if not trust_pickle:
        raise UnsafePickleError(
            f"{f.path}: a plain Python pickle (EDM2's network-snapshot .pkl files pickle whole modules), which "
            f"weights-only loading cannot read (it could run code); pass --trust-pickle (trust_pickle=True) "
            f"only if you trust this file")
    warnings.warn(CkptavgWarning(f"{f.path}: loading a plain pickle (--trust-pickle): code in this file can run"),
                  stacklevel=4)
    try:
        with f.open_stream() if is_remote(f.path) else open(f.path, "rb") as src:
            obj = pickle.load(src)  # noqa: S301 (the user vouched for the file with --trust-pickle)
    except ModuleNotFoundError as e:
        raise CheckpointReadError(
            f"{f.path}: unpickling needs the module {e.name!r}, which is not importable (EDM2's pickles need "
            f"EDM2's torch_utils and training: run from its checkout or put it on PYTHONPATH)") from None
    if isinstance(obj, Mapping):  # EDM2: {"ema": module, "loss_fn": ..., ...}: the modules' state dicts
        obj = {k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in obj.items()}
    return obj


def open_torch_legacy(f: InputFile, key: str | None, trust_pickle: bool) -> Checkpoint:
    p = f.path
    plain = _is_plain_pickle(f)
    try:
        if plain:
            obj = _load_plain_pickle(f, trust_pickle)
            key = "ema" if key is None and isinstance(obj, Mapping) and "ema" in obj else key
        else:
            with _load_source(f) as src:
                obj = (torch.load(src, map_location="cpu", weights_only=False) if trust_pickle
                       else _weights_only_load(src, "cpu"))
    except CheckpointReadError:  # (UnsafePickleError included): already one line naming the file
        raise
    except pickle.UnpicklingError as e:
        _refuse_unsafe(p, e, trust_pickle)
        raise CheckpointReadError(f"{p}: not a checkpoint ckptavg can read ({short(e)})") from None
    except Exception as e:
        raise CheckpointReadError(f"{p}: not a checkpoint ckptavg can read ({short(e)})") from None
    if not isinstance(obj, (Mapping, torch.nn.Module)):
        raise CheckpointReadError(f"{p}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    _unshadow(obj, p)
    warnings.warn(
        CkptavgWarning(f"{p}: legacy (non-zip) torch format, loaded whole into memory: it cannot be streamed"),
        stacklevel=3,
    )
    sd, wkey = find_state_dict(obj, key, p)
    tensors = {}
    for name, t in sd.items():
        if isinstance(t, torch.Tensor):
            if t.is_quantized:
                raise CheckpointReadError(f"{p}: tensor {name!r} is quantized; dequantize the model before averaging")
            tensors[str(name)] = TensorRef(name=str(name), dtype=t.dtype, shape=tuple(t.shape), tensor=t)
            tensors[str(name)].alias_key = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
            )
    ckpt = Checkpoint(path=p, format="torch-legacy", tensors=tensors, meta=CheckpointMeta(),
                      weights_key=wkey, size=f.size, obj=obj, files=[f])
    srcs = {id(held): ref for ref in tensors.values() if (held := ref.tensor) is not None}

    def mk(t: torch.Tensor, path: str) -> None:
        if id(t) not in srcs:
            srcs[id(t)] = TensorRef(name=path, dtype=t.dtype, shape=tuple(t.shape), tensor=t)

    _walk_tensors(obj, mk)
    ckpt._tensor_source = srcs
    meta_from_object(ckpt)
    apply_name_metadata(ckpt)
    return ckpt


_GLOBAL_RES = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|$)"),
    re.compile(r"new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got (.+)$"),
    re.compile(r"types allowlisted via `add_safe_globals`, but got <class '([^']+)'>"),
)


def _unsafe_global(msg: str) -> str | None:
    for rx in _GLOBAL_RES:
        m = rx.search(msg)
        if m:
            return m.group(1).strip()
    return None



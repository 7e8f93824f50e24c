"""Readers: open one checkpoint and describe it without loading tensor data.

A :class:`Checkpoint` lists its tensors (name, dtype, shape, where the bytes are), the
metadata it records (epoch, step, metrics) and reads any byte range of one tensor into
a caller's buffer. Nothing here keeps a whole checkpoint in memory and nothing maps
files: tensor bytes are read with ``pread`` at offsets taken from the file's own index
(the safetensors header, or the zip directory of a torch checkpoint), so the process's
memory stays independent of the checkpoint's size.

Formats:

* ``.safetensors``: the header is parsed and validated here (sizes are checked against
  the file before anything is allocated).
* torch zip checkpoints (any extension): the pickle is run through torch's own
  ``weights_only`` unpickler with every storage placed on the ``meta`` device, which
  yields the full object tree (dtypes, shapes, strides, sharing) without reading data;
  each storage is then located in the zip by its record name.
* legacy (pre-1.6, non-zip) torch files cannot be read piecewise: they are loaded whole
  with a warning.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointReadError, CkptavgWarning, OptionError, UnsafePickleError

__all__ = [
    "Checkpoint",
    "CheckpointMeta",
    "TensorRef",
    "open_checkpoint",
    "SAFETENSORS_DTYPES",
    "STATE_DICT_KEYS",
]

# Keys searched, in order, for the state dict inside a torch checkpoint.
STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")

_ST_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}
#: safetensors dtype string -> torch dtype (only those this torch build knows)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    k: getattr(torch, v) for k, v in _ST_DTYPE_NAMES.items() if hasattr(torch, v)
}

_MAX_ST_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_MAX_PICKLE = 1 << 30
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


# --------------------------------------------------------------------------------------
# files and tensor references


class _File:
    """A file opened lazily for positioned reads (``pread``), shared by its tensors."""

    __slots__ = ("path", "size", "_fd")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointReadError(f"{self.path}: cannot open: {e.strerror}") from None
        return self._fd

    def pread_into(self, mv: memoryview, offset: int) -> None:
        """Fill ``mv`` with the bytes at ``offset``; a short file is a read error."""
        fd = self.fd()
        want = len(mv)
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [mv[got:]], offset + got)
            except OSError as e:
                raise CheckpointReadError(f"{self.path}: read failed: {e.strerror}") from None
            if n <= 0:
                raise CheckpointReadError(
                    f"{self.path}: file ended early (truncated?): needed bytes up to "
                    f"{offset + want}, file has {offset + got}"
                )
            got += n

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(eq=False)
class TensorRef:
    """One tensor of a checkpoint: what it is and where its bytes are.

    Contiguous tensors stored in a file are read straight from ``file`` at ``offset``.
    Strided views (a transposed tensor saved as is, a slice of a larger storage) and
    tensors of legacy files are materialised on first use and released by
    :meth:`release`.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: _File | None = None
    offset: int = 0  # absolute file offset of element 0 (contiguous file tensors)
    # strided views: (storage file offset, storage nbytes, storage_offset, stride)
    strided: tuple[int, int, int, tuple[int, ...]] | None = None
    tensor: torch.Tensor | None = None  # in-memory source (legacy files)
    alias_key: tuple | None = None  # equal keys within a checkpoint = the very same tensor
    byteswap: bool = False
    _cache: torch.Tensor | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def path(self) -> Path | None:
        return self.file.path if self.file is not None else None

    @property
    def direct(self) -> bool:
        """True when byte ranges can be read from the file without materialising."""
        return self.file is not None and self.strided is None and not self.byteswap

    def read_into(self, start: int, mv: memoryview) -> None:
        """Copy ``len(mv)`` bytes of the tensor's C-order data, from byte ``start``, into ``mv``."""
        if self.direct:
            assert self.file is not None
            self.file.pread_into(mv, self.offset + start)
            return
        src = self.materialize()
        flat = src.reshape(-1).view(torch.uint8) if src.numel() else torch.empty(0, dtype=torch.uint8)
        dst = torch.frombuffer(mv, dtype=torch.uint8) if len(mv) else None
        if dst is not None:
            dst.copy_(flat[start : start + len(mv)])

    def materialize(self) -> torch.Tensor:
        """The whole tensor as a contiguous CPU tensor (cached until :meth:`release`)."""
        if self._cache is not None:
            return self._cache
        if self.tensor is not None:
            t = self.tensor.detach().contiguous()
        else:
            assert self.file is not None
            if self.strided is not None:
                st_off, st_nbytes, soff, stride = self.strided
                isz = self.itemsize
                if self.numel == 0:
                    t = torch.empty(self.shape, dtype=self.dtype)
                else:
                    last = soff + sum((s - 1) * st for s, st in zip(self.shape, stride))
                    lo, hi = soff * isz, (last + 1) * isz
                    raw = bytearray(hi - lo)
                    self.file.pread_into(memoryview(raw), st_off + lo)
                    base = _bytes_to_tensor(raw, self.dtype, self.byteswap)
                    t = base.as_strided(self.shape, stride, 0).contiguous()
            else:
                raw = bytearray(self.nbytes)
                self.file.pread_into(memoryview(raw), self.offset)
                t = _bytes_to_tensor(raw, self.dtype, self.byteswap).reshape(self.shape)
        self._cache = t
        return t

    def release(self) -> None:
        self._cache = None


def _bytes_to_tensor(raw: bytearray, dtype: torch.dtype, byteswap: bool) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    u8 = torch.frombuffer(raw, dtype=torch.uint8)
    if byteswap and dtype.itemsize > 1:
        u8 = u8.view(-1, dtype.itemsize).flip(1).contiguous().view(-1)
    return u8.view(dtype)


# --------------------------------------------------------------------------------------
# checkpoint


@dataclass
class CheckpointMeta:
    """What a checkpoint records about itself (or what its file name says)."""

    epoch: int | None = None
    step: int | None = None
    epoch_from: str | None = None  # "recorded" | "name"
    step_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    name_numbers: tuple[int, ...] = ()


@dataclass(eq=False)
class Checkpoint:
    """An opened checkpoint: its tensors (in the file's order) and metadata.

    Example::

        ckpt = open_checkpoint("runs/epoch=3-step=300.ckpt")
        print(ckpt.format, ckpt.weights_key, ckpt.meta.epoch, len(ckpt.tensors))
        w = ckpt.tensors["layer.weight"].materialize()
        ckpt.close()
    """

    path: Path
    format: str  # "torch" | "torch-legacy" | "safetensors" | "hf-folder"
    tensors: dict[str, TensorRef]
    meta: CheckpointMeta
    weights_key: str | None = None  # where the state dict was found (dotted), None = top level
    size: int = 0  # bytes on disk
    obj: Any = None  # torch checkpoints: the full object tree, tensors on the meta device
    files: list[_File] = field(default_factory=list)
    st_metadata: dict[str, str] | None = None
    _tensor_source: dict[int, TensorRef] = field(default_factory=dict, repr=False)
    _make_ref: Any = field(default=None, repr=False)

    def ref_for(self, t: torch.Tensor, name: str = "") -> TensorRef:
        """The :class:`TensorRef` for a (meta) tensor anywhere in ``obj`` (torch formats)."""
        ref = self._tensor_source.get(id(t))
        if ref is None and self._make_ref is not None:
            ref = self._make_ref(t, name)
        if ref is None:
            raise CheckpointReadError(f"{self.path}: internal: tensor {name!r} has no source")
        return ref

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# file-name metadata and natural ordering

_EPOCH_RE = re.compile(r"(?:^|[^a-z])(?:epoch|ep)[=_\-]?(\d+)", re.IGNORECASE)
_STEP_RE = re.compile(r"(?:^|[^a-z])(?:global_step|step|iteration|iter|it)[=_\-]?(\d+)", re.IGNORECASE)
_FAIRSEQ_RE = re.compile(r"^checkpoint[_-]?(\d+)(?:[_-](\d+))?$", re.IGNORECASE)
_NUM_RE = re.compile(r"\d+")


def _model_stem(path: Path) -> str:
    name = path.name
    for ext in (".pth.tar", ".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".tar"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def name_metadata(path: Path) -> tuple[int | None, int | None, tuple[int, ...]]:
    """Epoch, step and all numbers found in a checkpoint's file name."""
    stem = _model_stem(path)
    epoch = step = None
    m = _FAIRSEQ_RE.match(stem)
    if m:
        epoch = int(m.group(1))
        if m.group(2) is not None:
            step = int(m.group(2))
    m = _EPOCH_RE.search(stem)
    if m:
        epoch = int(m.group(1))
    m = _STEP_RE.search(stem)
    if m:
        step = int(m.group(1))
    return epoch, step, tuple(int(x) for x in _NUM_RE.findall(stem))


# --------------------------------------------------------------------------------------
# entry point


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefix: str | Iterable[str] | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Open one checkpoint file (or Hugging Face model folder) without reading tensor data.

    ``key`` picks the state dict inside a torch checkpoint (dotted for nesting);
    ``strip_prefix`` removes a prefix from every tensor name that has it.
    """
    p = Path(path)
    if p.is_dir():
        from .discover import open_model_folder  # local import: folder layouts live there

        ckpt = open_model_folder(p, key=key, trust_pickle=trust_pickle)
    else:
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise CheckpointReadError(f"{p}: no such file") from None
        except OSError as e:
            raise CheckpointReadError(f"{p}: cannot access: {e.strerror}") from None
        if not os.access(p, os.R_OK):
            raise CheckpointReadError(f"{p}: permission denied")
        if size == 0:
            raise CheckpointReadError(f"{p}: empty file, not a checkpoint")
        f = _File(p, size)
        try:
            head = f.pread(0, min(size, 8))
            if p.name.lower().endswith(".safetensors") or _looks_like_safetensors(f, head):
                ckpt = _open_safetensors(f, key)
            elif head[:4] == b"PK\x03\x04":
                ckpt = _open_torch_zip(f, key, trust_pickle)
            elif head[:1] == b"\x80":  # a pickle: the legacy (pre-1.6) torch format
                ckpt = _open_torch_legacy(f, key, trust_pickle)
            else:
                raise CheckpointReadError(
                    f"{p}: not a checkpoint (neither a torch zip file, a legacy torch file nor safetensors)"
                )
        except BaseException:
            f.close()
            raise
    if strip_prefix:
        _strip_prefixes(ckpt, strip_prefix)
    return ckpt


def _looks_like_safetensors(f: _File, head: bytes) -> bool:
    if len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > min(_MAX_ST_HEADER, f.size - 8):
        return False
    return f.pread(8, 1) == b"{"


def _strip_prefixes(ckpt: Checkpoint, prefixes: str | Iterable[str]) -> None:
    plist = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    out: dict[str, TensorRef] = {}
    for name, ref in ckpt.tensors.items():
        new = name
        for p in plist:
            if p and new.startswith(p):
                new = new[len(p) :]
        if new in out:
            raise CheckpointReadError(
                f"{ckpt.path}: removing prefix {plist!r} makes two tensors named {new!r}"
            )
        ref.name = new
        out[new] = ref
    ckpt.tensors = out


# --------------------------------------------------------------------------------------
# safetensors


def _open_safetensors(f: _File, key: str | None) -> Checkpoint:
    p = f.path
    if key:
        raise OptionError(f"{p}: --key applies to torch checkpoints; a .safetensors file is one flat state dict")
    if f.size < 8:
        raise CheckpointReadError(f"{p}: too short for a safetensors file ({f.size} bytes)")
    (n,) = struct.unpack("<Q", f.pread(0, 8))
    if n > f.size - 8:
        raise CheckpointReadError(
            f"{p}: corrupt safetensors header: header length {n} is beyond the file size {f.size} (truncated?)"
        )
    if n > _MAX_ST_HEADER:
        raise CheckpointReadError(f"{p}: corrupt safetensors header: header length {n} exceeds 100 MB")
    raw = f.pread(8, n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointReadError(f"{p}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{p}: corrupt safetensors header: not a JSON object")
    data_start = 8 + n
    data_len = f.size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointReadError(f"{p}: corrupt safetensors header: __metadata__ must map strings to strings")
    refs: list[tuple[int, int, TensorRef]] = []
    for name, info in header.items():
        where = f"{p}: corrupt safetensors header: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointReadError(f"{where}: entry is not an object")
        dt = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if dt not in SAFETENSORS_DTYPES:
            raise CheckpointReadError(f"{where}: unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise CheckpointReadError(f"{where}: invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int and o >= 0 for o in offs)
            or offs[0] > offs[1]
        ):
            raise CheckpointReadError(f"{where}: invalid data_offsets {offs!r}")
        dtype = SAFETENSORS_DTYPES[dt]
        begin, end = offs
        if end > data_len:
            raise CheckpointReadError(
                f"{where}: data_offsets {offs} run past the end of the file "
                f"({data_len} data bytes; truncated?)"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointReadError(
                f"{where}: data_offsets span {end - begin} bytes but dtype {dt} and shape {shape} need {nbytes}"
            )
        ref = TensorRef(name=name, dtype=dtype, shape=tuple(shape), file=f, offset=data_start + begin)
        refs.append((begin, end, ref))
    # Validate layout: no overlap (two tensors on the same bytes) and no gap.
    pos = 0
    for begin, end, ref in sorted(refs, key=lambda r: (r[0], r[1])):
        if begin < pos:
            raise CheckpointReadError(
                f"{p}: corrupt safetensors header: tensor {ref.name!r} overlaps the previous tensor's bytes"
            )
        if begin > pos:
            raise CheckpointReadError(
                f"{p}: corrupt safetensors header: {begin - pos} unaccounted bytes before tensor {ref.name!r}"
            )
        pos = end
    if pos != data_len:
        raise CheckpointReadError(
            f"{p}: corrupt safetensors file: header describes {pos} data bytes but the file holds {data_len}"
        )
    refs.sort(key=lambda r: r[0])  # file order
    meta = CheckpointMeta()
    if metadata:
        _meta_from_mapping(meta, metadata, parse_str=True)
    ckpt = Checkpoint(
        path=p,
        format="safetensors",
        tensors={r.name: r for _, _, r in refs},
        meta=meta,
        size=f.size,
        files=[f],
        st_metadata=dict(metadata) if metadata else {},
    )
    _apply_name_metadata(ckpt)
    return ckpt


# --------------------------------------------------------------------------------------
# torch zip


class _ZipIndex:
    """Locates the records of a torch zip archive (all stored uncompressed)."""

    def __init__(self, f: _File) -> None:
        self.f = f
        try:
            with open(f.path, "rb") as fh:
                zf = zipfile.ZipFile(fh)
                self.infos = {i.filename: i for i in zf.infolist()}
        except Exception as e:  # zipfile raises many types on damaged directories
            raise CheckpointReadError(
                f"{f.path}: damaged or truncated torch checkpoint (its zip directory is unreadable: {_short(e)})"
            ) from None
        pkls = [n for n in self.infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            if any(n.endswith("constants.pkl") for n in self.infos):
                raise CheckpointReadError(f"{f.path}: a TorchScript archive, not a checkpoint of weights")
            raise CheckpointReadError(f"{f.path}: a zip file without data.pkl, not a torch checkpoint")
        self.prefix = pkls[0][: -len("data.pkl")]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.infos

    def data_offset(self, name: str) -> tuple[int, int]:
        """(absolute offset, size) of a stored record's bytes, validated against the file."""
        info = self.infos.get(self.prefix + name)
        if info is None:
            raise CheckpointReadError(f"{self.f.path}: damaged torch checkpoint: record {name!r} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointReadError(
                f"{self.f.path}: record {name!r} is compressed; torch checkpoints store tensors uncompressed"
            )
        h = info.header_offset
        if h + 30 > self.f.size:
            raise CheckpointReadError(f"{self.f.path}: damaged torch checkpoint: record {name!r} is past the end")
        local = self.f.pread(h, 30)
        if local[:4] != b"PK\x03\x04":
            raise CheckpointReadError(f"{self.f.path}: damaged torch checkpoint: bad header for record {name!r}")
        nlen, elen = struct.unpack("<HH", local[26:30])
        # the local header must name the same record as the directory (else offsets are damaged)
        if h + 30 + nlen > self.f.size or self.f.pread(h + 30, nlen) != info.orig_filename.encode("utf-8"):
            raise CheckpointReadError(
                f"{self.f.path}: damaged torch checkpoint: the zip directory and the header of record {name!r} disagree"
            )
        start = h + 30 + nlen + elen
        if start + info.file_size > self.f.size:
            raise CheckpointReadError(
                f"{self.f.path}: file ended early (truncated?): record {name!r} needs bytes up to "
                f"{start + info.file_size}, file has {self.f.size}"
            )
        return start, info.file_size

    def read(self, name: str, limit: int = _MAX_PICKLE) -> bytes:
        """A small record's bytes, checked against the CRC-32 the zip directory records."""
        start, size = self.data_offset(name)
        if size > limit:
            raise CheckpointReadError(f"{self.f.path}: record {name!r} is implausibly large ({size} bytes)")
        data = self.f.pread(start, size)
        info = self.infos[self.prefix + name]
        if info.CRC != 0 and zlib.crc32(data) != info.CRC:
            raise CheckpointReadError(f"{self.f.path}: damaged torch checkpoint: record {name!r} fails its CRC check")
        return data


_GLOBAL_RES = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|$)"),
    re.compile(r"new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got (.+)$"),
)


def _unsafe_global(msg: str) -> str | None:
    for rx in _GLOBAL_RES:
        m = rx.search(msg)
        if m:
            return m.group(1).strip()
    return None


class _FullUnpickler(pickle.Unpickler):
    """Full unpickling, for ``trust_pickle=True`` only (may run code from the file)."""

    def find_class(self, module: str, name: str) -> Any:
        if isinstance(name, str) and "Storage" in name:
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        if module == "torch.tensor":
            module = "torch._tensor"
        return super().find_class(module, name)


def _unpickle_meta(f: _File, data: bytes, trust_pickle: bool) -> tuple[Any, dict[int, str], dict[str, int]]:
    """Run the checkpoint's pickle with every storage on the meta device.

    Returns the object tree, a map from storage identity to record key, and each
    record's byte size as the pickle declares it.
    """
    from torch import _weights_only_unpickler as wou

    cdata_to_key: dict[int, str] = {}
    declared: dict[str, int] = {}
    loaded: dict[str, Any] = {}

    def persistent_load(saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        typename, storage_type, key, _location, numel = saved_id
        if isinstance(typename, bytes):
            typename = typename.decode("ascii")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if typename != "storage" or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        if key in loaded:
            return loaded[key]
        nbytes = numel * dtype.itemsize
        if nbytes > f.size:
            raise pickle.UnpicklingError(f"storage {key} claims {nbytes} bytes, more than the file holds")
        us = torch.UntypedStorage(nbytes, device="meta")
        cdata_to_key[us._cdata] = key
        declared[key] = nbytes
        ts = torch.storage.TypedStorage(wrap_storage=us, dtype=dtype, _internal=True)
        loaded[key] = ts
        return ts

    if trust_pickle:
        up: Any = _FullUnpickler(io.BytesIO(data), encoding="utf-8")
    else:
        up = wou.Unpickler(io.BytesIO(data), encoding="utf-8")
    up.persistent_load = persistent_load
    try:
        obj = up.load()
    except pickle.UnpicklingError as e:
        bad = _unsafe_global(str(e))
        if bad is not None and not trust_pickle:
            raise UnsafePickleError(
                f"{f.path}: refusing to load: the pickle needs {bad}, which weights_only loading does not allow "
                f"(it could run code); pass --trust-pickle (trust_pickle=True) only if you trust this file"
            ) from None
        raise CheckpointReadError(f"{f.path}: not a valid torch checkpoint (bad pickle: {e})") from None
    except (MemoryError, RecursionError) as e:
        raise CheckpointReadError(f"{f.path}: not a valid torch checkpoint ({type(e).__name__})") from None
    except Exception as e:  # a damaged pickle can fail in any way while being parsed
        raise CheckpointReadError(
            f"{f.path}: not a valid torch checkpoint (bad pickle: {type(e).__name__}: {e})"
        ) from None
    return obj, cdata_to_key, declared


def _open_torch_zip(f: _File, key: str | None, trust_pickle: bool) -> Checkpoint:
    z = _ZipIndex(f)
    data = z.read("data.pkl")
    byteswap = False
    if z.has("byteorder"):
        order = z.read("byteorder", limit=16)
        if order not in (b"little", b"big"):
            raise CheckpointReadError(f"{f.path}: damaged torch checkpoint: unknown byte order {order!r}")
        byteswap = order.decode() != sys.byteorder
    if trust_pickle:
        warnings.warn(
            CkptavgWarning(f"{f.path}: loading with full unpickling (--trust-pickle): code in this file can run"),
            stacklevel=3,
        )
    obj, cdata_to_key, declared = _unpickle_meta(f, data, trust_pickle)

    record_cache: dict[str, tuple[int, int]] = {}

    def locate(storage_key: str) -> tuple[int, int]:
        if storage_key not in record_cache:
            start, size = z.data_offset(f"data/{storage_key}")
            if size < declared.get(storage_key, 0):
                raise CheckpointReadError(
                    f"{f.path}: damaged torch checkpoint: storage {storage_key} holds {size} bytes, "
                    f"its tensors need {declared[storage_key]}"
                )
            record_cache[storage_key] = (start, size)
        return record_cache[storage_key]

    sources: dict[int, TensorRef] = {}

    def make_ref(t: torch.Tensor, name: str) -> TensorRef:
        if id(t) in sources:
            return sources[id(t)]
        if t.dtype in _QUANTIZED or t.is_quantized:
            raise CheckpointReadError(
                f"{f.path}: tensor {name!r} is quantized ({t.dtype}); dequantize the model before averaging"
            )
        if t.layout != torch.strided:
            raise CheckpointReadError(
                f"{f.path}: tensor {name!r} has layout {t.layout}; only dense tensors are supported"
            )
        skey = cdata_to_key.get(t.untyped_storage()._cdata)
        if skey is None:
            raise CheckpointReadError(f"{f.path}: tensor {name!r} has no stored data (unsupported tensor type)")
        start, _size = locate(skey)
        shape = tuple(t.shape)
        stride = tuple(t.stride())
        soff = t.storage_offset()
        contiguous = t.is_contiguous() or t.numel() <= 1
        ref = TensorRef(name=name, dtype=t.dtype, shape=shape, file=f, byteswap=byteswap)
        ref.alias_key = (skey, soff, shape, stride if not contiguous else None)
        if contiguous:
            ref.offset = start + soff * t.dtype.itemsize
        else:
            ref.strided = (start, _size, soff, stride)
        sources[id(t)] = ref
        return ref

    sd, wkey = _find_state_dict(obj, key, f.path)
    tensors: dict[str, TensorRef] = {}
    for name, t in sd.items():
        if isinstance(t, torch.Tensor):
            tensors[str(name)] = make_ref(t, str(name))
    ckpt = Checkpoint(
        path=f.path,
        format="torch",
        tensors=tensors,
        meta=CheckpointMeta(),
        weights_key=wkey,
        size=f.size,
        obj=obj,
        files=[f],
    )
    ckpt._tensor_source = sources
    # Tensors outside the state dict (metrics saved as tensors, optimizer state) get refs on demand.
    ckpt._make_ref = make_ref
    _meta_from_object(ckpt)
    _apply_name_metadata(ckpt)
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


def _open_torch_legacy(f: _File, key: str | None, trust_pickle: bool) -> Checkpoint:
    p = f.path
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        bad = _unsafe_global(str(e))
        if bad is not None and not trust_pickle:
            raise UnsafePickleError(
                f"{p}: refusing to load: the pickle needs {bad}, which weights_only loading does not allow "
                f"(it could run code); pass --trust-pickle (trust_pickle=True) only if you trust this file"
            ) from None
        raise CheckpointReadError(f"{p}: not a checkpoint ckptavg can read ({_short(e)})") from None
    except Exception as e:
        raise CheckpointReadError(f"{p}: not a checkpoint ckptavg can read ({_short(e)})") from None
    if not isinstance(obj, (Mapping, torch.nn.Module)):
        raise CheckpointReadError(f"{p}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    warnings.warn(
        CkptavgWarning(f"{p}: legacy (non-zip) torch format, loaded whole into memory: it cannot be streamed"),
        stacklevel=3,
    )
    sd, wkey = _find_state_dict(obj, key, p)
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
    srcs = {id(t): ref for ref in tensors.values() if (t := ref.tensor) is not None}

    def mk(t: torch.Tensor, path: str) -> None:
        if id(t) not in srcs:
            srcs[id(t)] = TensorRef(name=path, dtype=t.dtype, shape=tuple(t.shape), tensor=t)

    _walk_tensors(obj, mk)
    ckpt._tensor_source = srcs
    _meta_from_object(ckpt)
    _apply_name_metadata(ckpt)
    return ckpt


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return (s[:200] + "...") if len(s) > 200 else s


# --------------------------------------------------------------------------------------
# finding the state dict and the metadata


def _is_tensor_dict(d: Any) -> bool:
    return (
        isinstance(d, Mapping)
        and len(d) > 0
        and all(isinstance(k, str) for k in d)
        and all(isinstance(v, torch.Tensor) for v in d.values())
    )


def _candidate_keys(obj: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths of nested dicts that hold tensors (for error messages)."""
    out: list[str] = []
    if not isinstance(obj, Mapping) or depth > 3:
        return out
    for k, v in obj.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if any(isinstance(x, torch.Tensor) for x in v.values()):
                out.append(path)
            out.extend(_candidate_keys(v, path + ".", depth + 1))
    return out


def _find_state_dict(obj: Any, key: str | None, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    if key:
        cur = obj
        walked = []
        for part in key.split("."):
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
            elif isinstance(cur, (list, tuple)) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            else:
                here = ".".join(walked) or "the top level"
                keys = list(cur.keys()) if isinstance(cur, Mapping) else []
                raise CheckpointReadError(
                    f"{path}: key {key!r} not found: {here} has no {part!r}"
                    + (f" (it has: {', '.join(map(str, keys[:20]))})" if keys else "")
                )
            walked.append(part)
        if not isinstance(cur, Mapping) or not any(isinstance(v, torch.Tensor) for v in cur.values()):
            raise CheckpointReadError(f"{path}: key {key!r} does not hold a dict of tensors")
        return cur, key
    if _is_tensor_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for k in STATE_DICT_KEYS:
            if k in obj and _is_tensor_dict(obj[k]):
                return obj[k], k
        # tolerate a few non-tensor entries (e.g. _extra_state) in the usual places
        for k in STATE_DICT_KEYS:
            v = obj.get(k)
            if isinstance(v, Mapping) and v and sum(isinstance(x, torch.Tensor) for x in v.values()) >= 0.5 * len(v):
                return v, k
        cands = _candidate_keys(obj)
        if cands:
            raise CheckpointReadError(
                f"{path}: no state dict found under {', '.join(STATE_DICT_KEYS)}; "
                f"candidates: {', '.join(cands[:15])}; pick one with --key"
            )
        keys = ", ".join(map(str, list(obj.keys())[:20]))
        raise CheckpointReadError(f"{path}: no tensors found (top-level keys: {keys or 'none'})")
    raise CheckpointReadError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")


_STEP_KEYS = ("step", "global_step", "num_updates", "iteration")
_EPOCH_KEYS = ("epoch",)


def _scalar(ckpt: Checkpoint, v: Any) -> float | int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        try:
            if v.device.type == "meta":
                ref = ckpt.ref_for(v)
                t = ref.materialize()
                ref.release()
            else:
                t = v
            return t.reshape(()).item()
        except CheckpointReadError:
            return None
    return None


def _meta_from_mapping(meta: CheckpointMeta, d: Mapping[str, Any], parse_str: bool = False,
                       ckpt: Checkpoint | None = None) -> None:
    def val(v: Any) -> float | int | None:
        if parse_str and isinstance(v, str):
            try:
                return int(v)
            except ValueError:
                try:
                    return float(v)
                except ValueError:
                    return None
        if ckpt is not None:
            return _scalar(ckpt, v)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    for k in _STEP_KEYS:
        if k in d and meta.step is None:
            v = val(d[k])
            if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
                meta.step, meta.step_from = int(v), "recorded"
    for k in _EPOCH_KEYS:
        if k in d and meta.epoch is None:
            v = val(d[k])
            if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
                meta.epoch, meta.epoch_from = int(v), "recorded"
    for k, v in d.items():
        if not isinstance(k, str):
            continue
        x = val(v)
        if x is not None and k not in meta.metrics:
            meta.metrics[k] = x
        elif isinstance(v, Mapping) and k == "metrics":
            for mk, mv in v.items():
                mx = val(mv)
                if isinstance(mk, str) and mx is not None:
                    meta.metrics[mk] = mx
        elif parse_str and k == "metrics" and isinstance(v, str):
            try:
                parsed = json.loads(v)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                for mk, mv in parsed.items():
                    if isinstance(mv, (int, float)) and not isinstance(mv, bool):
                        meta.metrics[mk] = mv


def _meta_from_object(ckpt: Checkpoint) -> None:
    obj = ckpt.obj
    if not isinstance(obj, Mapping) or (ckpt.weights_key is None and _is_tensor_dict(obj)):
        return
    _meta_from_mapping(ckpt.meta, obj, ckpt=ckpt)
    # fairseq keeps the epoch under extra_state (and the update count in optimizer_history)
    extra = obj.get("extra_state")
    if isinstance(extra, Mapping):
        sub = CheckpointMeta()
        _meta_from_mapping(sub, extra, ckpt=ckpt)
        it = extra.get("train_iterator")
        if sub.epoch is None and isinstance(it, Mapping) and isinstance(it.get("epoch"), int):
            # The iterator records the epoch to resume at: after a finished epoch E it holds
            # E + 1 with iterations_in_epoch 0 (fairseq names that file checkpointE.pt).
            ep = it["epoch"]
            if it.get("iterations_in_epoch") == 0 and it.get("version", 1) >= 2 and ep > 1:
                ep -= 1
            sub.epoch, sub.epoch_from = ep, "recorded"
        if ckpt.meta.epoch is None and sub.epoch is not None:
            ckpt.meta.epoch, ckpt.meta.epoch_from = sub.epoch, "recorded"
        if ckpt.meta.step is None and sub.step is not None:
            ckpt.meta.step, ckpt.meta.step_from = sub.step, "recorded"
        for k, v in sub.metrics.items():
            ckpt.meta.metrics.setdefault(k, v)
    _lightning_monitored(ckpt, obj.get("callbacks"))
    hist = obj.get("optimizer_history")
    if ckpt.meta.step is None and isinstance(hist, list) and hist and isinstance(hist[-1], Mapping):
        nu = hist[-1].get("num_updates")
        if isinstance(nu, int):
            ckpt.meta.step, ckpt.meta.step_from = nu, "recorded"
    ckpt.meta.metrics.pop("epoch", None)
    for k in _STEP_KEYS:
        ckpt.meta.metrics.pop(k, None)


def _lightning_monitored(ckpt: Checkpoint, callbacks: Any) -> None:
    """Lightning's ModelCheckpoint state holds the monitored value of the checkpoint being
    saved (``current_score``, under ``monitor``): record it as a metric of that name."""
    if not isinstance(callbacks, Mapping):
        return
    for state in callbacks.values():
        if isinstance(state, Mapping) and isinstance(state.get("monitor"), str) and "current_score" in state:
            v = _scalar(ckpt, state["current_score"])
            if v is not None:
                ckpt.meta.metrics.setdefault(state["monitor"], v)


def _apply_name_metadata(ckpt: Checkpoint) -> None:
    epoch, step, nums = name_metadata(ckpt.path)
    m = ckpt.meta
    m.name_numbers = nums
    if m.epoch is None and epoch is not None:
        m.epoch, m.epoch_from = epoch, "name"
    if m.step is None and step is not None:
        m.step, m.step_from = step, "name"
    if ckpt.format == "safetensors":
        m.metrics.pop("epoch", None)
        for k in _STEP_KEYS:
            m.metrics.pop(k, None)

"""Builders of hostile checkpoint files: torch zips with hand-made pickles (valid CRCs, so the
pickle reaches the unpickler), raw legacy pickles and safetensors files with arbitrary headers.

``TensorSpec`` emits the ``torch._utils._rebuild_tensor_v2`` call torch.save writes, with any
geometry; ``Global`` emits a call of any global (``os.system``...); ``Build`` sets attributes
on an object (BUILD); ``Deep`` a nesting of lists
``depth`` levels deep, emitted with raw opcodes (no recursion on either side of the pickle).
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

_STORAGE_CLASS = {
    torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.uint8: "ByteStorage", torch.bool: "BoolStorage", torch.int8: "CharStorage",
}


@dataclass
class TensorSpec:
    """A tensor as the pickle describes it: storage ``key`` holding ``numel`` elements of
    ``dtype`` (its record holds ``record_bytes`` bytes, default exactly that), viewed with
    ``offset``, ``size`` and ``stride``."""

    key: str = "0"
    dtype: torch.dtype = torch.float32
    numel: int = 4
    offset: int = 0
    size: tuple[int, ...] = (4,)
    stride: tuple[int, ...] = (1,)
    record_bytes: int | None = None
    #: attributes set on the tensor by ``torch._tensor._rebuild_from_type_v2`` (``{"stride": 5}``)
    state: dict[str, Any] | None = None

    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize if self.record_bytes is None else self.record_bytes


@dataclass
class Global:
    """``module.name(*args)`` in the pickle (the GLOBAL opcode, then REDUCE)."""

    module: str
    name: str
    args: tuple[Any, ...] = ()


@dataclass
class Deep:
    """``depth`` nested lists, innermost holding ``leaf``."""

    depth: int
    leaf: Any = None


@dataclass
class Build:
    """``obj`` then BUILD with ``state`` (sets attributes on it: ``{"items": 5}`` shadows a method)."""

    obj: Any
    state: Any


@dataclass
class Raw:
    """Opcodes pasted as they are (they must push exactly one object)."""

    data: bytes = field(default=b"N")


def _emit(obj: Any, out: io.BytesIO, storages: dict[str, TensorSpec]) -> None:
    """Protocol-2 opcodes for ``obj`` (a small tree of plain values, TensorSpec, Global, Deep, Raw)."""
    if isinstance(obj, TensorSpec):
        storages.setdefault(obj.key, obj)
        if obj.state is not None:
            out.write(b"ctorch._tensor\n_rebuild_from_type_v2\n(ctorch._utils\n_rebuild_tensor_v2\nctorch\nTensor\n")
        else:
            out.write(b"ctorch._utils\n_rebuild_tensor_v2\n")
        out.write(b"(")
        # persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
        out.write(b"(")
        _emit("storage", out, storages)
        out.write(f"ctorch\n{_STORAGE_CLASS[obj.dtype]}\n".encode())
        _emit(obj.key, out, storages)
        _emit("cpu", out, storages)
        _emit(obj.numel, out, storages)
        out.write(b"tQ")
        _emit(obj.offset, out, storages)
        _emit(tuple(obj.size), out, storages)
        _emit(tuple(obj.stride), out, storages)
        out.write(b"\x89ccollections\nOrderedDict\n)R")
        out.write(b"t" if obj.state is not None else b"tR")
        if obj.state is not None:
            _emit(obj.state, out, storages)
            out.write(b"tR")
    elif isinstance(obj, Global):
        out.write(f"c{obj.module}\n{obj.name}\n".encode())
        _emit(tuple(obj.args), out, storages)
        out.write(b"R")
    elif isinstance(obj, Deep):
        out.write(b"]" * obj.depth)
        _emit(obj.leaf, out, storages)
        out.write(b"a" * obj.depth)
    elif isinstance(obj, Build):
        _emit(obj.obj, out, storages)
        _emit(obj.state, out, storages)
        out.write(b"b")
    elif isinstance(obj, Raw):
        out.write(obj.data)
    elif obj is None:
        out.write(b"N")
    elif obj is True or obj is False:
        out.write(b"\x88" if obj else b"\x89")
    elif isinstance(obj, int):
        if -(1 << 31) <= obj < (1 << 31):
            out.write(b"J" + struct.pack("<i", obj))
        else:
            b = pickle.encode_long(obj)
            out.write(b"\x8a" + bytes([len(b)]) + b if len(b) < 256 else b"\x8b" + struct.pack("<i", len(b)) + b)
    elif isinstance(obj, float):
        out.write(b"G" + struct.pack(">d", obj))
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        out.write(b"X" + struct.pack("<I", len(b)) + b)
    elif isinstance(obj, tuple):
        out.write(b"(")
        for v in obj:
            _emit(v, out, storages)
        out.write(b"t")
    elif isinstance(obj, list):
        out.write(b"](")
        for v in obj:
            _emit(v, out, storages)
        out.write(b"e")
    elif isinstance(obj, collections.OrderedDict):
        out.write(b"ccollections\nOrderedDict\n)R(")
        for k, v in obj.items():
            _emit(k, out, storages)
            _emit(v, out, storages)
        out.write(b"u")
    elif isinstance(obj, dict):
        out.write(b"}(")
        for k, v in obj.items():
            _emit(k, out, storages)
            _emit(v, out, storages)
        out.write(b"u")
    else:
        raise TypeError(type(obj))


def pickle_bytes(obj: Any) -> tuple[bytes, dict[str, TensorSpec]]:
    """The pickle of ``obj`` and the storages it names."""
    out = io.BytesIO()
    out.write(b"\x80\x02")
    storages: dict[str, TensorSpec] = {}
    _emit(obj, out, storages)
    out.write(b".")
    return out.getvalue(), storages


def storage_bytes(spec: TensorSpec) -> bytes:
    n = spec.nbytes()
    return bytes((i * 37 + 11) % 251 for i in range(n))


def torch_zip(obj: Any, *, prefix: str = "archive", extra: dict[str, bytes] | None = None,
              storages: dict[str, bytes] | None = None) -> bytes:
    """A torch.save-style zip whose data.pkl is the pickle of ``obj`` (records stored, CRCs right)."""
    pkl, specs = pickle_bytes(obj)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, spec in specs.items():
            data = storages[key] if storages and key in storages else storage_bytes(spec)
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def legacy_pickle(obj: Any) -> bytes:
    """A raw pickle (what the legacy reader is given); no storages (their data would follow)."""
    return pickle_bytes(obj)[0]


def safetensors_raw(header_json: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json + data


def safetensors_bytes(header: Any, data: bytes = b"") -> bytes:
    return safetensors_raw(json.dumps(header).encode(), data)

"""Reader for ``.safetensors`` files, validated by the safetensors library itself.

``safetensors.safe_open`` parses and checks the header (JSON structure and nesting, dtype
names, shapes against byte counts, offsets that cover the data exactly with no overlap or
gap, the header length against the file) before ckptavg looks at it. It does not expose
each tensor's byte offset, which streaming needs, so the (already validated) JSON header is
then read once more here for ``data_offsets`` only; tensor bytes are read with positioned
reads at those offsets (``safe_open``'s own slices map the file, which would count every
touched page against the process's memory).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointReadError, OptionError
from .checkpoint import Checkpoint, CheckpointMeta, TensorRef
from .dtypes import SAFETENSORS_DTYPES
from .files import InputFile
from .metadata import apply_name_metadata, meta_from_strings
from .urls import is_remote

__all__ = ["open_safetensors", "looks_like_safetensors"]

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def looks_like_safetensors(f: InputFile, head: bytes) -> bool:
    """A plausible header length followed by ``{``."""
    if len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > min(_MAX_HEADER, f.size - 8):
        return False
    return f.pread(8, 1) == b"{"


def open_safetensors(f: InputFile, key: str | None) -> Checkpoint:
    """Describe a ``.safetensors`` file (no tensor data read)."""
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
    if is_remote(p):  # safetensors' own check maps a local file: the same rules, on the header's bytes
        header, metadata = _check_without_mapping(f, n)
    else:
        header, metadata = _check_with_safetensors(f, n)
    header.pop("__metadata__", None)
    data_start = 8 + n
    refs: list[tuple[int, TensorRef]] = []
    for name, info in header.items():
        dt = SAFETENSORS_DTYPES.get(info["dtype"])
        if dt is None:
            raise CheckpointReadError(
                f"{p}: tensor {name!r} has dtype {info['dtype']}, which ckptavg cannot average (no torch dtype)"
            )
        begin = info["data_offsets"][0]
        refs.append((begin, TensorRef(name=name, dtype=dt, shape=tuple(info["shape"]), file=f,
                                      offset=data_start + begin)))
    refs.sort(key=lambda r: r[0])  # file order
    ckpt = Checkpoint(path=p, format="safetensors", tensors={r.name: r for _, r in refs}, meta=CheckpointMeta(),
                      size=f.size, files=[f], st_metadata=dict(metadata) if metadata else {})
    if metadata:
        meta_from_strings(ckpt, metadata)
    apply_name_metadata(ckpt)
    return ckpt


def _check_with_safetensors(f: InputFile, n: int) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The header and metadata of a local file, checked by safetensors itself."""
    p = f.path
    try:
        with safe_open(str(p), framework="pt") as sf:
            metadata = sf.metadata()
        header = json.loads(f.pread(8, n))  # validated by safe_open above
    except SafetensorError as e:
        raise CheckpointReadError(f"{p}: corrupt safetensors header: {_explain(f, n, str(e))}") from None
    except (OSError, RuntimeError) as e:
        # safe_open maps the whole file; where the address space is limited (a container, a
        # 40 GB file) the mapping fails although nothing would be read. Then the header is
        # checked here, by the same rules, without mapping anything.
        if "mmap" not in str(e) and not isinstance(e, MemoryError):
            raise CheckpointReadError(f"{p}: cannot read: {e}") from None
        header, metadata = _check_without_mapping(f, n)
    return header, metadata


def _check_without_mapping(f: InputFile, n: int) -> tuple[dict[str, Any], dict[str, str] | None]:
    p = f.path
    try:
        header = json.loads(f.pread(8, n))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointReadError(f"{p}: corrupt safetensors header: not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{p}: corrupt safetensors header: not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointReadError(f"{p}: corrupt safetensors header: __metadata__ must map strings to strings")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list) and all(type(x) is int and x >= 0 for x in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(type(x) is int and x >= 0 for x in info["data_offsets"])
              and info["data_offsets"][0] <= info["data_offsets"][1])
        if not ok:
            raise CheckpointReadError(f"{p}: corrupt safetensors header: tensor {name!r}: invalid entry")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointReadError(
                f"{p}: corrupt safetensors header: tensor {name!r}: unknown dtype {info['dtype']!r}"
            )
    problem = _explain(f, n, "")
    if problem:
        raise CheckpointReadError(f"{p}: corrupt safetensors header: {problem}")
    return header, metadata


def _explain(f: InputFile, n: int, message: str) -> str:
    """safetensors' reason, made specific (which tensor, how many bytes) where its message is
    not; with an empty ``message``, the layout problem found, or ``""`` if there is none.

    It reads the JSON only when safetensors found it well-formed, or after
    :func:`_check_without_mapping` checked its types; it never allocates from the header's claims.
    """
    reason = message.split("header:", 1)[-1].strip()
    if "invalid JSON" in message or "header too large" in message or n > _MAX_HEADER:
        return reason
    try:
        header: Any = json.loads(f.pread(8, n))
        header.pop("__metadata__", None)
        spans = []
        data_len = f.size - 8 - n
        for name, info in header.items():
            dt = SAFETENSORS_DTYPES.get(info["dtype"])
            begin, end = info["data_offsets"]
            if end > data_len:
                return (f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the file "
                        f"({data_len} data bytes; truncated?)")
            need = math.prod(info["shape"]) * (dt.itemsize if dt is not None else 1)
            if dt is not None and end - begin != need:
                return (f"tensor {name!r}: data_offsets span {end - begin} bytes but dtype {info['dtype']} and "
                        f"shape {info['shape']} need {need}")
            spans.append((begin, end, name))
        pos = 0
        for begin, end, name in sorted(spans):
            if begin < pos:
                return f"tensor {name!r} overlaps the previous tensor's bytes"
            if begin > pos:
                return f"{begin - pos} unaccounted bytes before tensor {name!r}"
            pos = end
        if pos != data_len:
            return f"the header describes {pos} data bytes but the file holds {data_len}"
    except Exception:  # the explanation is best effort; safetensors' reason stands
        pass
    return reason

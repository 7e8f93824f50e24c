"""The one dtype table: safetensors' dtype names <-> torch dtypes, and dtype kinds."""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS", "dtype_kind", "dtype_name"]

# Every dtype the safetensors format names, with the torch dtype it stands for. Sub-byte
# formats (F4, F6_*) have no torch dtype of one element per value and are left out: a file
# holding them is refused with the dtype named.
_NAMES = {
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
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}
#: safetensors dtype string -> torch dtype (those this torch build knows)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _NAMES.items() if hasattr(torch, v)}
#: torch dtype -> safetensors dtype string
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_kind(dt: torch.dtype) -> str:
    """``"float"``, ``"complex"``, ``"bool"`` or ``"integer"``: what may be averaged with what."""
    if dt.is_complex:
        return "complex"
    if dt.is_floating_point:
        return "float"
    if dt == torch.bool:
        return "bool"
    return "integer"


def dtype_name(dt: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dt).removeprefix("torch.")

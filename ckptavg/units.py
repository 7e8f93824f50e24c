"""Sizes and durations: the one parser of sizes (``--shard-size``, ``--max-memory``) and the
formatting of bytes, seconds, epochs and table values for people."""

from __future__ import annotations

import re
from typing import Any

from .errors import OptionError

__all__ = ["DEFAULT_SHARD_SIZE", "parse_size", "human_bytes", "human_seconds", "fmt_value", "fmt_epoch"]

#: default largest shard of a folder output (bytes of tensor data), as ``save_pretrained``'s "5GB"
DEFAULT_SHARD_SIZE = 5 * 10**9

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str | None, option: str = "--shard-size") -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MB"``, ``"100KB"``, ``"2GiB"``, ``1024`` (bytes).

    KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB powers of 1024, as in
    ``save_pretrained(max_shard_size=...)``. ``None`` gives the default (5GB).
    """
    if value is None:
        return DEFAULT_SHARD_SIZE
    if isinstance(value, bool):
        raise OptionError(f"{option} must be a size such as 5GB, 500MB or 100KB; got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise OptionError(f"{option} must be a size such as 5GB, 500MB or 100KB; got {value!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise OptionError(f"{option} must be positive; got {value!r}")
    return n


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_epoch(v: int | float | None) -> str:
    """Epochs as recorded: ``12``, ``2.5``, ``100.25`` (fractional ones to 4 decimals at most)."""
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".")
    return fmt_value(v)


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def human_seconds(t: float) -> str:
    """``0.0123`` -> ``"12 ms"``, ``3.456`` -> ``"3.5 s"``, ``125`` -> ``"2 min 05 s"``."""
    if t < 1:
        return f"{t * 1000:.0f} ms"
    if t < 60:
        return f"{t:.1f} s"
    m, sec = divmod(round(t), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"



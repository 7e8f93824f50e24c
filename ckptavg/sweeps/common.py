"""What sweeps and soups share: their fixed options, option lists, number formats, the selection
(headers only), the memory check, the output (checked before, written through the merge driver
after) and the progress bar."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import OptionError
from ..io.urls import as_path

if TYPE_CHECKING:
    from ..io.kinds import OutputKind

PathLike = str | os.PathLike[str]

__all__ = ["PathLike", "DEFAULT_MAX_MEMORY", "READ", "NUMERICS", "SWEEP_OPTIONS", "SOUP_OPTIONS", "fixed_options",
           "as_list", "pos_int", "fmt_num", "fmt_score", "describe_inputs", "Source", "plan_sources", "check_memory",
           "check_output", "write_output", "progress_bar"]

#: One copy of the model larger than this is refused (``max_memory`` / ``--max-memory``).
DEFAULT_MAX_MEMORY = "8GB"

READ = ("key", "strip_prefix", "trust_pickle", "allow_nonfinite")
NUMERICS = ("accumulate", "buffers", "dtype")
#: merge options a sweep takes as fixed values (the same for every candidate)
SWEEP_OPTIONS = ("order", "every", *READ, *NUMERICS)
#: merge options a soup takes: the selection of the ingredients, reading, numerics
SOUP_OPTIONS = ("order", "epochs", "steps", "last", "every", "best", "metric", "lower_is_better", *READ, *NUMERICS)


def fixed_options(options: dict[str, Any], allowed: Sequence[str], where: str) -> dict[str, Any]:
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TypeError(f"{where}() got an unexpected keyword argument {bad[0]!r}")
    return {k: v for k, v in options.items() if v is not None}


def as_list(value: Any, option: str, convert: Callable[[str], Any]) -> list[Any]:
    """``"2,4,8"`` or ``[2, 4, 8]`` or ``4`` -> a list of converted values (None -> [])."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if text == "":
            continue
        try:
            out.append(convert(text))
        except (TypeError, ValueError):
            raise OptionError(f"{option}: bad value {text!r} in {value!r}") from None
    if not out:
        raise OptionError(f"{option}: no values in {value!r}")
    return out


def pos_int(text: Any) -> int:
    n = int(text)
    if n < 1 or isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(text)
    return n


def fmt_num(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def describe_inputs(epochs: Sequence[Any], steps: Sequence[Any], paths: Sequence[str]) -> str:
    """``epoch 30``, ``epochs 23-30 (8)``, ``steps 100-800 (8)`` or ``3 checkpoints``."""
    n = len(paths)
    for name, values in (("epoch", epochs), ("step", steps)):
        if values and all(v is not None for v in values):
            if n == 1:
                return f"{name} {fmt_num(values[0])}"
            return f"{name}s {fmt_num(values[0])}-{fmt_num(values[-1])} ({n})"
    return _short_name(paths[0]) if n == 1 else f"{n} checkpoints"


def _short_name(path: str) -> str:
    """A checkpoint's name for a table: ``checkpoint-500/unet`` for a component folder whose own name
    has no number, else the last part of the path."""
    p = as_path(path)
    if not any(c.isdigit() for c in p.name) and any(c.isdigit() for c in p.parent.name):
        return f"{p.parent.name}/{p.name}"
    return p.name


@dataclass
class Source:
    """One checkpoint of the selection (training order)."""

    path: str
    epoch: Any
    step: Any


def plan_sources(inputs: Any, opts: dict[str, Any]) -> tuple[list[Source], int, Any]:
    """The selected checkpoints (headers only), the bytes of one output copy and the plan's provenance."""
    from ..api import plan

    p = plan(inputs, **opts)
    try:
        sources = [Source(os.fspath(i.path), i.epoch, i.step) for i in p.inputs]
        return sources, p.output_bytes, p
    finally:
        for i in p.inputs:
            i.checkpoint.close()


def check_memory(nbytes: int, max_memory: int | str | None) -> None:
    from ..units import human_bytes, parse_size

    limit = parse_size(max_memory if max_memory is not None else DEFAULT_MAX_MEMORY, "--max-memory")
    if nbytes > limit:
        raise OptionError(
            f"one copy of the model is {human_bytes(nbytes)}, over --max-memory {human_bytes(limit)}: sweeps and soups "
            "average in memory and hold up to four copies; raise --max-memory if this machine has the memory, or "
            "use ckptavg merge (streaming) for single averages"
        )


def check_output(output: PathLike | None, paths: Sequence[str]) -> tuple[Path | None, OutputKind | None]:
    if output is None:
        return None, None
    from ..io import kind_of
    from ..io.files import check_not_input

    out = as_path(output)
    kind = kind_of(output)
    check_not_input(out, [as_path(p) for p in paths])
    kind.check_destination(out)
    return out, kind


def write_output(out: Path, kind: OutputKind, state_dict: dict[str, torch.Tensor], sources: Any, opts: dict[str, Any],
           bn: tuple[str, Path] | None, name: str, table: dict[str, Any]) -> int:
    """Write the chosen model with the provenance of its plan (``sources`` averaged with ``opts``;
    ``bn``: the recalibration mode and spec, when it was recalibrated) and the table (metadata
    string, or a JSON sidecar ``OUTPUT.ckptavg.json`` for kinds without metadata: torch files,
    whose plain state dict has no place for it)."""
    from ..io.kinds import OutputSetup
    from ..pipeline import write_state

    _, _, p = plan_sources(sources, opts)
    provenance = p.provenance()
    if bn is not None:
        provenance["ckptavg_bn"] = json.dumps({"mode": bn[0], "spec": os.fspath(bn[1])})
    text = json.dumps(table, separators=(",", ":"), default=str)
    setup = OutputSetup(sources=[(i.path, i.format) for i in p.inputs])  # a folder output's config files
    _writer, written = write_state(state_dict, out, {**provenance, name: text}, setup=setup)
    if not kind.stores_metadata:  # atomically too: a crash never leaves half a sidecar beside the model
        from ..io.files import AtomicFile
        from ..io.urls import is_remote

        blob = (json.dumps({**provenance, name: table}, indent=2, default=str) + "\n").encode()
        if is_remote(out):  # one small object: a single upload, atomic in object stores
            out.fs.pipe_file(out.key + ".ckptavg.json", blob)  # type: ignore[attr-defined]
            return written
        sidecar = AtomicFile(out.with_name(out.name + ".ckptavg.json"))
        try:
            sidecar.write(blob)
        except BaseException:
            sidecar.abort()
            raise
        sidecar.commit()
    return written


def progress_bar(total: int, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="model", file=sys.stderr, disable=not progress, leave=False)



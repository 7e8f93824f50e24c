"""``ckptavg inspect``: what each checkpoint holds and how the checkpoints differ, from headers only.

For every checkpoint (files, globs, folders, as ``merge`` takes them): its format and the
framework that wrote it, where the weights were found (and which other weight sets it
holds, e.g. timm's ``state_dict_ema``), its epoch, step and stored metrics, tensor count,
parameter count, dtypes and size; then the differences between the checkpoints: tensor
names missing from some, and shape or dtype differences.

Only headers are read (the safetensors header, the pickle of a torch checkpoint with
every tensor on the meta device, index files): no tensor data, except one-element
tensors that hold metrics. Inspecting a 100 GB checkpoint takes as long as a small one.

A checkpoint that cannot be opened is reported as a row with its error (and makes the
command exit with status 1) rather than hiding the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .discover import discover
from .errors import CkptavgError
from .io import Checkpoint, open_checkpoint
from .io.snapshot_names import apply_indexed_profiles
from .order import order_checkpoints
from .units import fmt_epoch, human_bytes

__all__ = ["CheckpointInfo", "InspectReport", "inspect"]

PathLike = str | os.PathLike[str]

_MAX_LISTED = 10


@dataclass
class CheckpointInfo:
    """One checkpoint as ``inspect`` describes it (``error`` set if it could not be opened)."""

    path: Path
    format: str | None = None  # torch | torch-legacy | safetensors | hf-folder
    framework: str | None = None  # lightning | timm | fairseq | hf-trainer | None
    weights_key: str | None = None  # where the state dict was found (None: top level)
    other_weight_sets: list[str] = field(default_factory=list)  # e.g. ["state_dict_ema"]
    training_state: list[str] = field(default_factory=list)  # e.g. ["optimizer_states", "lr_schedulers"]
    epoch: int | float | None = None  # Hugging Face Trainer records fractional epochs
    epoch_from: str | None = None
    step: int | None = None
    step_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: int = 0
    tied: int = 0  # names that share another name's tensor
    parameters: int = 0  # elements of floating-point tensors, tied ones counted once
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> number of tensors
    size: int = 0  # bytes on disk
    shards: int = 1
    prefix: str | None = None  # a first name component every tensor name shares ("module.", "model.")
    sigma_rel: float | None = None  # power-EMA snapshot profile (relative width), when recorded
    gamma: float | None = None  # ... its exponent
    error: str | None = None
    names: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (without the per-tensor listing)."""
        return {
            "path": os.fspath(self.path), "format": self.format, "framework": self.framework,
            "weights_key": self.weights_key, "other_weight_sets": self.other_weight_sets,
            "training_state": self.training_state, "epoch": self.epoch, "epoch_from": self.epoch_from,
            "step": self.step, "step_from": self.step_from, "metrics": self.metrics, "tensors": self.tensors,
            "tied": self.tied, "parameters": self.parameters, "dtypes": self.dtypes, "bytes": self.size,
            "shards": self.shards, "prefix": self.prefix, "sigma_rel": self.sigma_rel, "gamma": self.gamma,
            "error": self.error,
        }


@dataclass
class InspectReport:
    """The result of :func:`inspect`: one :class:`CheckpointInfo` per checkpoint and the differences.

    ``missing`` lists ``{"name", "missing_from": [paths]}``; ``shapes`` and ``dtypes``
    list ``{"name", "values": {path: shape or dtype}}`` for names whose shape or dtype
    is not the same in every checkpoint that has them.
    """

    checkpoints: list[CheckpointInfo]
    order: str
    missing: list[dict[str, Any]] = field(default_factory=list)
    shapes: list[dict[str, Any]] = field(default_factory=list)
    dtypes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[CheckpointInfo]:
        return [c for c in self.checkpoints if c.error]

    @property
    def consistent(self) -> bool:
        """True when every checkpoint opened and all have the same names, shapes and dtypes."""
        return not (self.errors or self.missing or self.shapes or self.dtypes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``ckptavg inspect --json``)."""
        return {
            "order": self.order,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "differences": {"missing": self.missing, "shapes": self.shapes, "dtypes": self.dtypes},
            "consistent": self.consistent,
            "notes": self.notes,
        }

    def format(self) -> str:
        """The human-readable table and differences printed by ``ckptavg inspect``."""
        rows = [["#", "file", "format", "weights", "epoch", "step", "tensors", "params", "dtypes", "size",
                 "metrics"]]
        for k, c in enumerate(self.checkpoints, 1):
            if c.error:
                msg = c.error.removeprefix(f"{c.path}: ")
                rows.append([str(k), str(c.path), "error", msg, "", "", "", "", "", "", ""])
                continue
            fmt = c.format or "-"
            if c.framework:
                fmt += f" ({c.framework})"
            if c.shards > 1:
                fmt += f", {c.shards} shards"
            if c.sigma_rel is not None:
                fmt += f", power-EMA sigma_rel {c.sigma_rel:g}"
            weights = c.weights_key or ("(top level)" if c.format in ("torch", "torch-legacy") else "-")
            if c.other_weight_sets:
                weights += " +" + ",".join(c.other_weight_sets)
            tensors = str(c.tensors) + (f" ({c.tied} tied)" if c.tied else "")
            dts = ", ".join(f"{d}" if len(c.dtypes) == 1 else f"{d}:{n}" for d, n in c.dtypes.items())
            metrics = " ".join(f"{m}={_num(v)}" for m, v in c.metrics.items())
            rows.append([str(k), str(c.path), fmt, weights, fmt_epoch(c.epoch), _opt(c.step), tensors,
                         _count(c.parameters), dts, human_bytes(c.size), metrics])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {0, 4, 5, 7, 9}
        lines = []
        for r in rows:
            cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(r))]
            if r[2] == "error":
                cells = cells[:3] + [r[3]]
            lines.append("  ".join(cells).rstrip())
        lines.extend(self._format_notes())
        lines.append("")
        ok = [c for c in self.checkpoints if not c.error]
        if len(ok) < 2:
            lines.append("differences: (needs two or more checkpoints)")
        elif not (self.missing or self.shapes or self.dtypes):
            lines.append(f"differences: none ({len(ok)} checkpoints, same {ok[0].tensors} tensor names, shapes and "
                         "dtypes)")
        else:
            lines.append("differences:")
            lines.extend(self._format_missing(ok))
            kinds: list[tuple[str, list[dict[str, Any]], Callable[[Any], str]]] = [
                ("shape", self.shapes, _shape), ("dtype", self.dtypes, str)]
            for label, items, show in kinds:
                for d in items[:_MAX_LISTED]:
                    groups: dict[str, list[str]] = {}
                    for p, v in d["values"].items():
                        groups.setdefault(show(v), []).append(p)
                    desc = "; ".join(f"{v} in {_files(ps)}" for v, ps in groups.items())
                    lines.append(f"  {label} of {d['name']!r}: {desc}")
                if len(items) > _MAX_LISTED:
                    lines.append(f"  ... and {len(items) - _MAX_LISTED} more {label} differences (see --json)")
        return "\n".join(lines)

    def _format_notes(self) -> list[str]:
        ok = [c for c in self.checkpoints if not c.error]
        groups: dict[str, list[str]] = {}
        prefixes = {c.prefix for c in ok}
        for c in ok:
            if c.training_state:
                groups.setdefault(f"also hold{{s}} {', '.join(c.training_state)}", []).append(os.fspath(c.path))
            # a prefix is worth a note when it is a wrapper's (DDP, torch.compile) or not shared by all
            if c.prefix and (c.prefix in ("module.", "_orig_mod.") or len(prefixes) > 1):
                groups.setdefault(f"ha{{ve}} every tensor name starting with {c.prefix!r} (see --strip-prefix)",
                                  []).append(os.fspath(c.path))
        out = []
        for text, paths in groups.items():
            if len(paths) == len(ok) and len(ok) > 1:
                out.append("note: all checkpoints " + text.format(s="", ve="ve"))
            else:
                out.append(f"note: {_files(paths)} " + text.format(s="s" if len(paths) == 1 else "",
                                                                   ve="s" if len(paths) == 1 else "ve"))
        out.extend(f"note: {n}" for n in self.notes)
        return out

    def _format_missing(self, ok: list[CheckpointInfo]) -> list[str]:
        allp = [os.fspath(c.path) for c in ok]
        groups: dict[tuple[str, ...], list[str]] = {}
        for d in self.missing:
            groups.setdefault(tuple(d["missing_from"]), []).append(d["name"])
        out = []
        for absent, names in groups.items():
            present = [p for p in allp if p not in absent]
            shown = ", ".join(repr(n) for n in names[:5]) + (f", ... (+{len(names) - 5})" if len(names) > 5 else "")
            if len(absent) <= len(present):
                out.append(f"  {len(names)} tensor(s) missing from {_files(list(absent))}: {shown}")
            else:
                out.append(f"  {len(names)} tensor(s) only in {_files(present)}: {shown}")
        return out


def _files(paths: Sequence[str]) -> str:
    if len(paths) > 4:
        return ", ".join(paths[:3]) + f" and {len(paths) - 3} more"
    return ", ".join(paths)


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


def _num(v: float) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _shape(s: Any) -> str:
    return str(list(s))


def _count(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _framework(c: Checkpoint) -> str | None:
    obj = c.obj
    if c.format in ("hf-folder", "diffusers"):
        return "hf-trainer" if (c.path / "trainer_state.json").is_file() else None
    if not isinstance(obj, Mapping):
        return None
    if "pytorch-lightning_version" in obj or ("state_dict" in obj and "loops" in obj and "global_step" in obj):
        return "lightning"
    if "extra_state" in obj and ("optimizer_history" in obj or "model" in obj):
        return "fairseq"
    if "state_dict" in obj and ("state_dict_ema" in obj or "arch" in obj or ("metric" in obj and "epoch" in obj)):
        return "timm"
    return None


def _describe(c: Checkpoint) -> CheckpointInfo:
    from .structure import TRAINING_STATE_KEYS, WEIGHT_SET_KEYS, get_dotted, is_weight_set

    info = CheckpointInfo(path=c.path, format=c.format, framework=_framework(c), weights_key=c.weights_key,
                          epoch=c.meta.epoch, epoch_from=c.meta.epoch_from, step=c.meta.step,
                          step_from=c.meta.step_from, metrics=dict(c.meta.metrics), size=c.size,
                          shards=len(c.files) if c.format in ("hf-folder", "diffusers") else 1)
    if c.meta.sigma_rel is not None or c.meta.gamma is not None:
        from .methods import profile_gamma
        from .weights import gamma_to_sigma_rel

        gamma = profile_gamma(c)
        info.sigma_rel = c.meta.sigma_rel if c.meta.sigma_rel is not None else gamma_to_sigma_rel(gamma)
        info.gamma = gamma
    if isinstance(c.obj, Mapping) and c.weights_key is not None:
        info.other_weight_sets = [k for k in WEIGHT_SET_KEYS
                                  if k != c.weights_key and is_weight_set(get_dotted(c.obj, k))]
        info.training_state = [k for k in TRAINING_STATE_KEYS if k in c.obj]
    seen: set[tuple] = set()
    dts: dict[str, int] = {}
    for name, ref in c.tensors.items():
        dt = str(ref.dtype).removeprefix("torch.")
        info.names[name] = (ref.shape, dt)
        dts[dt] = dts.get(dt, 0) + 1
        key = (ref.alias_key, ref.dtype) if ref.alias_key is not None and ref.numel > 0 else None
        if key is not None and key in seen:
            info.tied += 1
            continue
        if key is not None:
            seen.add(key)
        if ref.dtype.is_floating_point or ref.dtype.is_complex:
            info.parameters += ref.numel
    info.dtypes = dict(sorted(dts.items(), key=lambda kv: -kv[1]))
    info.tensors = len(c.tensors)
    firsts = {n.split(".", 1)[0] for n in c.tensors if "." in n}
    if len(firsts) == 1 and all("." in n for n in c.tensors) and len(c.tensors) > 1:
        info.prefix = firsts.pop() + "."
    return info


def inspect(
    paths: PathLike | Sequence[PathLike],
    *,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    trust_pickle: bool = False,
    order: str = "auto",
) -> InspectReport:
    """Describe checkpoints and their differences, reading headers only.

    ``paths`` are files, globs or folders as for :func:`ckptavg.merge` (a Hugging Face
    model folder is one checkpoint); ``key``, ``strip_prefix`` and ``trust_pickle`` open
    them as ``merge`` would; rows come in ``order`` (``"auto"``: the training order
    ``merge`` uses; ``"given"``). A checkpoint that cannot be opened becomes a row with
    its ``error`` set instead of raising.

    Example::

        import ckptavg
        report = ckptavg.inspect("runs/")
        for c in report.checkpoints:
            print(c.path, c.format, c.weights_key, c.epoch, c.step, c.metrics, c.parameters)
        if not report.consistent:
            print(report.format())  # the table, then missing names and shape/dtype differences
    """
    found, notes = discover(paths)  # type: ignore[arg-type]
    opened: list[Checkpoint] = []
    failed: list[CheckpointInfo] = []
    try:
        for p in found:
            try:
                opened.append(open_checkpoint(p, key=key, strip_prefix=strip_prefix, trust_pickle=trust_pickle))
            except CkptavgError as e:
                failed.append(CheckpointInfo(path=p, error=str(e)))
        # ema-pytorch snapshots (<index>.<step>.pt): their step, and their profile from the folder's sidecar
        notes = [*notes, *apply_indexed_profiles(opened, None, "uniform", key)]
        ordered, rule = order_checkpoints(opened, order)
        infos = [_describe(c) for c in ordered]
    finally:
        for c in opened:
            c.close()
    report = InspectReport(checkpoints=infos + failed, order=rule, notes=list(notes))
    _differences(report, infos)
    return report


def _differences(report: InspectReport, infos: list[CheckpointInfo]) -> None:
    if len(infos) < 2:
        return
    union: dict[str, None] = {}
    for c in infos:
        for n in c.names:
            union.setdefault(n, None)
    for name in union:
        have = [c for c in infos if name in c.names]
        if len(have) < len(infos):
            report.missing.append({"name": name,
                                   "missing_from": [os.fspath(c.path) for c in infos if name not in c.names]})
        shapes = {os.fspath(c.path): list(c.names[name][0]) for c in have}
        if len({tuple(s) for s in shapes.values()}) > 1:
            report.shapes.append({"name": name, "values": shapes})
        dts = {os.fspath(c.path): c.names[name][1] for c in have}
        if len(set(dts.values())) > 1:
            report.dtypes.append({"name": name, "values": dts})

"""The merge plan: what will be read, with which weight, and what will be written.

The plan is built and validated before any tensor data is read: the files in order with
their epoch/step and weight, and per output tensor its shape, output dtype and whether it
is averaged (floating tensors) or copied from the last selected checkpoint (integer and
bool tensors). Inputs that disagree on names, shapes or dtype kinds fail here, naming
the file and the tensor. ``--dry-run`` prints :meth:`MergePlan.format`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .discover import discover_with_origin
from .errors import MismatchError, OptionError, SelectionError
from .io import Checkpoint, Entry, TensorRef, kind_of, open_checkpoint, strip_prefixes
from .io.dtypes import dtype_kind, dtype_name
from .io.files import check_not_input
from .options import MergeOptions
from .order import Selection, order_checkpoints, parse_range, same_time, select_with_notes
from .weights import (
    METHODS,
    Weights,
    ema,
    ema_per_step,
    explicit,
    posthoc_ema,
    power_ema,
    sigma_rel_to_gamma,
    uniform,
)

__all__ = ["MergePlan", "PlannedInput", "PlannedTensor", "build_plan", "parse_dtype", "plan_tensors", "human_bytes",
           "human_seconds", "selection_of", "weights_for", "WRAPPER_PREFIXES"]

# Prefixes that training wrappers put before every tensor name: DistributedDataParallel/DataParallel
# ("module.") and torch.compile ("_orig_mod."). Inputs that differ only by these are matched
# automatically (and the plan says so).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, option: str = "--dtype") -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16`` (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = _DTYPE_NAMES.get(str(value).lower().removeprefix("torch."))
    if dt is None:
        raise OptionError(f"{option} must be one of float32, float16, bfloat16, float64; got {value!r}")
    return dt


def selection_of(opts: MergeOptions) -> Selection:
    """The selection options as a :class:`~ckptavg.order.Selection`."""
    return Selection(
        epochs=parse_range(opts.epochs, "--epochs"),
        steps=parse_range(opts.steps, "--steps"),
        last=opts.last,
        every=opts.every,
        best=opts.best,
        metric=opts.metric,
        lower_is_better=opts.lower_is_better,
    )


@dataclass
class PlannedInput:
    """One selected checkpoint and its weight."""

    path: Path
    format: str
    weight: float
    epoch: int | float | None  # Hugging Face Trainer records fractional epochs (2.5)
    step: int | None
    metrics: dict[str, float]
    weights_key: str | None
    size: int
    checkpoint: Checkpoint = field(repr=False)
    sigma_rel: float | None = None  # power-EMA snapshot profile, when the checkpoint records one

    @property
    def gamma(self) -> float | None:
        return self.checkpoint.meta.gamma


@dataclass
class PlannedTensor:
    """One output tensor: averaged over the inputs, or copied from the last one."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str  # "average" | "copy"
    refs: list[TensorRef] = field(repr=False)
    acc_dtype: torch.dtype | None = None
    alias_of: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Everything a merge will do, decided before any tensor data is read."""

    inputs: list[PlannedInput]
    tensors: list[PlannedTensor]
    weights: Weights
    order_rule: str
    selection: str
    candidates: int
    options: MergeOptions
    notes: list[str] = field(default_factory=list)
    output: Path | None = None
    output_format: str | None = None
    #: several outputs from one pass: one weight vector over ``inputs`` per output (``weights`` is the first)
    variants: list[Weights] | None = None
    variant_labels: list[dict[str, str]] | None = None

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.inputs]

    @property
    def method(self) -> str:
        return self.weights.description

    @property
    def read_bytes(self) -> int:
        """Tensor bytes the merge reads (inputs with weight 0 are not read)."""
        total = 0
        for t in self.tensors:
            if t.alias_of is not None:
                continue
            if t.kind == "copy":
                total += t.refs[-1].nbytes
            else:
                total += sum(r.nbytes for r, c in zip(t.refs, self.weights.coeffs) if c != 0)
        return total

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((max(r.nbytes for r in t.refs) for t in self.tensors), default=0)

    def entries(self) -> list[Entry]:
        """The output tensors as a writer's plan (names, output dtypes, shapes, tied aliases)."""
        return [Entry(t.name, t.out_dtype, t.shape, t.alias_of) for t in self.tensors]

    def provenance(self) -> dict[str, str]:
        """String metadata recorded in the output (safetensors ``__metadata__``)."""
        files = [
            {"file": os.fspath(i.path), "weight": w, "epoch": i.epoch, "step": i.step}
            for i, w in zip(self.inputs, self.weights.values)
        ]
        meta = {
            "format": "pt",
            "ckptavg_version": __version__,
            "ckptavg_method": self.weights.description,
            "ckptavg_inputs": json.dumps(files, separators=(",", ":")),
        }
        last = self.inputs[-1]
        if last.step is not None:
            meta["step"] = str(last.step)
        if last.epoch is not None:
            meta["epoch"] = str(last.epoch)
        return meta

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the plan."""
        return {
            "method": self.weights.description,
            "order": self.order_rule,
            "selection": self.selection,
            "candidates": self.candidates,
            "inputs": [
                {"path": os.fspath(i.path), "format": i.format, "weights_key": i.weights_key, "epoch": i.epoch,
                 "step": i.step, "weight": i.weight, "metrics": i.metrics, "bytes": i.size,
                 "sigma_rel": i.sigma_rel}
                for i in self.inputs
            ],
            "tensors": len(self.tensors),
            "averaged": sum(t.kind == "average" for t in self.tensors),
            "copied_from_last": sum(t.kind == "copy" for t in self.tensors),
            "tied": sum(t.alias_of is not None for t in self.tensors),
            "output": os.fspath(self.output) if self.output else None,
            "output_bytes": self.output_bytes,
            "read_bytes": self.read_bytes,
            "notes": self.notes,
        }

    def format(self) -> str:
        """The human-readable plan printed by ``--dry-run``."""
        many = self.variants or []
        if len(many) > 1:
            labels = self.variant_labels or [{} for _ in many]
            lines = [f"outputs:   {len(many)} from one pass"] + [
                f"  w{m + 1}: {' '.join(f'{k}={v}' for k, v in lab.items())}: {w.description}"
                for m, (lab, w) in enumerate(zip(labels, many))]
        else:
            lines = [f"method:    {self.weights.description}"]
        lines += [
            f"order:     {self.order_rule}",
            f"selection: {self.selection} -> {len(self.inputs)} of {self.candidates} checkpoints",
        ]
        metric = self.options.metric
        snaps = any(i.sigma_rel is not None for i in self.inputs)
        wcols = "".join(f"  {'w' + str(m + 1):>10}" for m in range(len(many))) if len(many) > 1 else f"  {'weight':>10}"
        head = f"  {'#':>3}  {'epoch':>6}  {'step':>9}{wcols}"
        if snaps:
            head += f"  {'sigma_rel':>9}"
        if metric:
            head += f"  {metric:>10}"
        lines.append(head + "  file")
        for k, i in enumerate(self.inputs, 1):
            ws = "".join(f"  {v.values[k - 1]:>10.6f}" for v in many) if len(many) > 1 else f"  {i.weight:>10.6f}"
            row = f"  {k:>3}  {_fmt_epoch(i.epoch):>6}  {_fmt(i.step):>9}{ws}"
            if snaps:
                row += f"  {_fmt(i.sigma_rel):>9}"
            if metric:
                row += f"  {_fmt(i.metrics.get(metric)):>10}"
            where = f" [{i.weights_key}]" if i.weights_key else ""
            lines.append(row + f"  {i.path}{where}")
        n_avg = sum(t.kind == "average" for t in self.tensors)
        n_copy = sum(t.kind == "copy" for t in self.tensors)
        n_tied = sum(t.alias_of is not None for t in self.tensors)
        dts = sorted({str(t.out_dtype).removeprefix("torch.") for t in self.tensors if t.kind == "average"})
        acc = sorted({str(t.acc_dtype).removeprefix("torch.") for t in self.tensors if t.acc_dtype})
        lines.append(
            f"tensors:   {len(self.tensors)} ({n_avg} averaged as {'/'.join(dts) or '-'} with "
            f"{'/'.join(acc) or '-'} accumulation, {n_copy} integer/bool copied from the last checkpoint"
            + (f", {n_tied} tied" if n_tied else "")
            + ")"
        )
        largest = human_bytes(self.largest_tensor_bytes)
        lines.append(f"reads:     {human_bytes(self.read_bytes)}; largest tensor {largest}")
        if self.output is not None:
            lines.append(f"output:    {self.output} ({self.output_format}, {human_bytes(self.output_bytes)})")
        for n in self.notes:
            lines.append(f"note:      {n}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_epoch(v: int | float | None) -> str:
    """Epochs as recorded: ``12``, ``2.5``, ``100.25`` (fractional ones to 4 decimals at most)."""
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".")
    return _fmt(v)


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


def _snapshot_sigma(c: Checkpoint) -> float | None:
    if c.meta.sigma_rel is not None:
        return c.meta.sigma_rel
    if c.meta.gamma is not None:
        from .weights import gamma_to_sigma_rel

        return gamma_to_sigma_rel(c.meta.gamma)
    return None


def weights_for(opts: MergeOptions, chosen: list[Checkpoint], time_notes: list[str] | None = None) -> Weights:
    """The weight vector of ``opts``'s method over the selected checkpoints (in order); notes about
    the time axis used (steps, or epochs when no step is recorded) are appended to ``time_notes``."""
    n = len(chosen)
    if time_notes is None:
        time_notes = []
    method = opts.method.lower().replace("_", "-")
    if method not in METHODS:
        raise OptionError(f"--method must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if opts.weights is not None:
        if method != "uniform" or opts.decay is not None or opts.decay_per_step is not None:
            raise OptionError("--weights cannot be combined with --method ema/power-ema or a decay")
        ws = opts.weights
        if isinstance(ws, str):
            try:
                ws = [float(x) for x in ws.replace(" ", "").split(",") if x != ""]
            except ValueError:
                raise OptionError(f"--weights must be comma-separated numbers, got {opts.weights!r}") from None
        return explicit(list(ws), n)

    def steps() -> list[int]:
        missing = [c for c in chosen if c.meta.step is None]
        if missing and method == "power-ema" and all(c.meta.epoch is not None for c in chosen):
            # no step recorded: the epochs are the time axis (the profile is in relative time t/T)
            time_notes.append("power-ema: no step recorded, so the epochs are the time axis")
            return [c.meta.epoch for c in chosen]  # type: ignore[misc]
        if missing:
            raise OptionError(
                f"{missing[0].path}: records no step (and its file name has none); "
                f"{'--decay-per-step needs' if method == 'ema' else 'power-ema needs the epoch or'} "
                "the step of every checkpoint"
            )
        return [int(c.meta.step) for c in chosen]  # type: ignore[arg-type]

    if opts.at is not None and method != "power-ema":
        raise OptionError("--at applies to --method power-ema (post-hoc EMA from snapshots)")
    if method == "uniform":
        if opts.decay is not None or opts.decay_per_step is not None:
            raise OptionError("--decay/--decay-per-step need --method ema")
        return uniform(n)
    if method == "ema":
        if (opts.decay is None) == (opts.decay_per_step is None):
            raise OptionError("--method ema needs exactly one of --decay D (per checkpoint) or --decay-per-step d")
        if opts.decay is not None:
            return ema(n, float(opts.decay))
        return ema_per_step(steps(), float(opts.decay_per_step))  # type: ignore[arg-type]
    if opts.decay is not None or opts.decay_per_step is not None:
        raise OptionError("--decay/--decay-per-step belong to --method ema")
    snaps = [c for c in chosen if c.meta.sigma_rel is not None or c.meta.gamma is not None]
    if snaps:
        if len(snaps) != len(chosen):
            plain = next(c for c in chosen if c not in snaps)
            raise OptionError(
                f"{plain.path}: a plain checkpoint among power-EMA snapshots ({snaps[0].path} records its profile); "
                "select only snapshots (e.g. their folder) or only plain checkpoints"
            )
        # exact post-hoc EMA (EDM2) from snapshots of power-function EMAs
        profiles = [(s, c.meta.gamma if c.meta.gamma is not None else sigma_rel_to_gamma(c.meta.sigma_rel))
                    for s, c in zip(steps(), chosen)]
        return posthoc_ema(profiles, gamma=opts.gamma, sigma_rel=opts.sigma_rel, at=opts.at)
    if opts.at is not None:
        raise OptionError("--at picks the step of a post-hoc EMA from power-EMA snapshots; these checkpoints record "
                          "no power-EMA profile (sigma_rel or gamma)")
    return power_ema(steps(), gamma=opts.gamma, sigma_rel=opts.sigma_rel)


def _spread(w: Weights, picked: list[Checkpoint], chosen: list[Checkpoint]) -> Weights:
    """``w`` over ``picked``, as a weight vector over ``chosen`` (zero where not picked)."""
    at = {id(c): k for k, c in enumerate(picked)}
    values = [w.values[at[id(c)]] if id(c) in at else 0.0 for c in chosen]
    coeffs = [w.coeffs[at[id(c)]] if id(c) in at else 0.0 for c in chosen]
    return Weights(values, w.description, coeffs, w.divisor, w.fit_error)


def build_plan(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    options: MergeOptions,
    output: Path | None = None,
    output_format: str | None = None,
    variants: Sequence[tuple[dict[str, str], MergeOptions]] | None = None,
) -> MergePlan:
    """Discover, open (headers only), order, select, weight and validate.

    ``variants`` (from :func:`ckptavg.options.expand_variants`): several outputs from one pass;
    the plan then covers every checkpoint any variant selects, with one weight vector each.

    Example::

        plan = build_plan("runs/", MergeOptions(epochs="10:"), Path("swa.pt"), "torch")
        print(plan.format())
    """
    paths, notes, named = discover_with_origin(inputs)  # type: ignore[arg-type]
    sel = selection_of(options)
    sel.validate()
    accumulate = parse_dtype(options.accumulate, "--accumulate")
    if accumulate not in (torch.float32, torch.float64):
        raise OptionError("--accumulate must be float32 or float64")
    out_dtype = parse_dtype(options.dtype)
    if output is not None:
        check_not_input(output, paths)

    opened: list[Checkpoint] = []
    try:
        for p in paths:
            opened.append(open_checkpoint(p, key=options.key, strip_prefix=options.strip_prefix,
                                          trust_pickle=options.trust_pickle))
        candidates = len(opened)
        earlier = [c for c in opened if c.meta.ckptavg_output and c.path not in named]
        if earlier and len(earlier) < len(opened):
            notes.append(
                f"skipped {', '.join(str(c.path) for c in earlier)}: an earlier ckptavg output (its metadata records "
                f"ckptavg provenance), found through a folder or pattern; to average it on purpose, name it: "
                f"{earlier[0].path}"
            )
            opened = [c for c in opened if c not in earlier]
            for c in earlier:
                c.close()
        ordered, rule = order_checkpoints(opened, options.order)
        time_notes: list[str] = []
        if variants and len(variants) > 1:
            picks = []
            for _label, v in variants:
                vsel = selection_of(v)
                vsel.validate()
                pk, sel_notes = select_with_notes(ordered, vsel)
                notes.extend(n for n in sel_notes if n not in notes)
                picks.append(pk)
            chosen = [c for c in ordered if any(c in pk for pk in picks)]
            _refuse_same_time(chosen, rule)
            matrix = [_spread(weights_for(v, pk, time_notes), pk, chosen) for (_l, v), pk in zip(variants, picks)]
            weights = matrix[0]
        else:
            chosen, sel_notes = select_with_notes(ordered, sel)
            notes.extend(sel_notes)
            _refuse_same_time(chosen, rule)
            weights = weights_for(options, chosen, time_notes)
            matrix = None
        notes.extend(dict.fromkeys(time_notes))
        for c in opened:
            if c not in chosen:
                c.close()
        if not options.strip_prefix:
            stripped = _match_wrapper_prefixes(chosen)
            if stripped:
                notes.append(stripped)
        tensors = plan_tensors(chosen, out_dtype, accumulate, options.buffers)
    except BaseException:
        for c in opened:
            c.close()
        raise

    top = max(weights.values, key=abs)
    if len(chosen) > 1 and abs(top) > 0.9:
        k = weights.values.index(top)
        notes.append(f"{chosen[k].path} gets {top:.1%} of the weight; the average is close to that one checkpoint")
    if output is not None:
        notes.extend(kind_of(output).notes(output, [c.obj for c in chosen], options.keep_structure))
    planned = [
        PlannedInput(path=c.path, format=c.format, weight=w, epoch=c.meta.epoch, step=c.meta.step,
                     metrics=dict(c.meta.metrics), weights_key=c.weights_key, size=c.size, checkpoint=c,
                     sigma_rel=_snapshot_sigma(c))
        for c, w in zip(chosen, weights.values)
    ]
    if matrix is not None:
        sel_text = "; ".join(" ".join(f"{k}={v}" for k, v in label.items()) for label, _v in variants or [])
        notes.append(f"{len(matrix)} outputs from one pass ({sel_text})")
    return MergePlan(inputs=planned, tensors=tensors, weights=weights, order_rule=rule, variants=matrix,
                     variant_labels=[label for label, _v in variants] if matrix is not None and variants else None,
                     selection=sel.describe(), candidates=candidates, options=options, notes=notes,
                     output=output, output_format=output_format)


def _refuse_same_time(chosen: Sequence[Checkpoint], rule: str) -> None:
    """Two selected checkpoints at one step (or one epoch, when ordered by epoch) are almost always
    one checkpoint saved twice; averaging both would count it twice."""
    attr = "step" if rule.startswith("by step") else "epoch" if rule.startswith("by epoch") else None
    pair = same_time(chosen, attr) if attr else None
    if pair is None:
        return
    a, b = pair
    raise SelectionError(
        f"{a.path} and {b.path} both record {attr} {getattr(a.meta, attr)}: probably one checkpoint saved twice "
        f"(fairseq writes checkpointE.pt and checkpoint_E_U.pt), which would count twice; select one kind "
        f"(e.g. a pattern like 'checkpoint[0-9]*.pt', or name the files), or --order given to average both on purpose"
    )


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for pre in WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre):], True
    return name


def _wrapper_chain(names: Sequence[str]) -> str:
    """The wrapper prefixes (``module.``, ``_orig_mod.``, nested) that every name starts with."""
    if not names:
        return ""
    first = names[0]
    chain = first[: len(first) - len(_strip_wrappers(first))]
    while chain and not all(n.startswith(chain) for n in names):
        chain = chain[: chain[:-1].rfind(".") + 1]
    return chain


def _match_wrapper_prefixes(chosen: Sequence[Checkpoint]) -> str | None:
    """When the inputs' tensor names differ only by wrapper prefixes that cover every name of a
    checkpoint (DDP's ``module.``, torch.compile's ``_orig_mod.``), strip them; returns a note."""
    sets = [set(c.tensors) for c in chosen]
    if all(s == sets[0] for s in sets):
        return None
    chains = [_wrapper_chain(list(c.tensors)) for c in chosen]
    if not any(chains):
        return None
    stripped = [{n[len(ch):] for n in c.tensors} for c, ch in zip(chosen, chains)]
    if not all(s == stripped[0] for s in stripped):
        return None
    done = []
    for c, ch in zip(chosen, chains):
        if ch:
            strip_prefixes(c, ch)
            done.append(f"{ch!r} from {c.path}")
    return (f"tensor names differed only by wrapper prefixes (DDP 'module.', torch.compile '_orig_mod.'): removed "
            f"{'; '.join(done)} so that every input agrees (give --strip-prefix to choose yourself)")


def _prefix_hint(a: Sequence[str], b: Sequence[str]) -> str:
    """A ``--strip-prefix`` that would make name lists ``a`` and ``b`` agree, as an error hint."""
    sa, sb = set(a), set(b)
    for x, y in ((sa, sb), (sb, sa)):
        for n in sorted(x - y)[:1]:
            for m in y:
                pre = n[: len(n) - len(m)]
                if len(n) > len(m) and n.endswith(m) and pre.endswith("."):
                    if {k[len(pre):] if k.startswith(pre) else k for k in x} == y:
                        return f"; --strip-prefix {pre} would make the names agree"
    return ""


_NORM_BUFFERS = (".running_mean", ".running_var")


def plan_tensors(chosen: list[Checkpoint], out_dtype: torch.dtype | None,
                 accumulate: torch.dtype, buffers: str = "average") -> list[PlannedTensor]:
    """One :class:`PlannedTensor` per name, validated across ``chosen`` (same names, shapes and
    dtype kinds). ``buffers="last"`` copies normalisation statistics (names ending in
    ``running_mean``/``running_var``) from the last checkpoint instead of averaging them."""
    if buffers not in ("average", "last"):
        raise OptionError(f"--buffers must be average or last, got {buffers!r}")
    ref_ckpt = chosen[-1]
    names = list(ref_ckpt.tensors)
    name_set = set(names)
    for c in chosen[:-1]:
        if set(c.tensors) != name_set:
            missing = [n for n in names if n not in c.tensors]
            extra = [n for n in c.tensors if n not in name_set]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise MismatchError(f"{c.path}: tensor {missing[0]!r}{more} missing (present in {ref_ckpt.path})"
                                    + _prefix_hint(list(c.tensors), names))
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise MismatchError(f"{c.path}: has tensor {extra[0]!r}{more} that {ref_ckpt.path} lacks"
                                + _prefix_hint(list(c.tensors), names))
    planned: list[PlannedTensor] = []
    alias_index: dict[tuple, int] = {}
    for name in names:
        refs = [c.tensors[name] for c in chosen]
        last = refs[-1]
        for c, r in zip(chosen, refs):
            if r.shape != last.shape:
                raise MismatchError(
                    f"{c.path}: tensor {name!r} has shape {list(r.shape)} but {ref_ckpt.path} has {list(last.shape)}"
                )
            if dtype_kind(r.dtype) != dtype_kind(last.dtype):
                raise MismatchError(
                    f"{c.path}: tensor {name!r} is {dtype_name(r.dtype)} but {ref_ckpt.path} "
                    f"has {dtype_name(last.dtype)} (a different kind of number)"
                )
        kind = dtype_kind(last.dtype)
        if buffers == "last" and name.endswith(_NORM_BUFFERS):
            kind = "buffer"
        if kind in ("float", "complex"):
            if kind == "float":
                odt = out_dtype or last.dtype
                # float64 also for 16-bit inputs: their sums are then exact (the engine's choice)
                acc = torch.float64 if (accumulate == torch.float64 or any(r.dtype == torch.float64 for r in refs)
                                        or all(r.dtype in (torch.float16, torch.bfloat16) for r in refs)
                                        ) else torch.float32
            else:
                odt = last.dtype
                acc = torch.complex128 if (accumulate == torch.float64 or
                                           any(r.dtype == torch.complex128 for r in refs)) else torch.complex64
            pt = PlannedTensor(name, last.shape, odt, "average", refs, acc)
        else:
            pt = PlannedTensor(name, last.shape, last.dtype, "copy", refs)
        keys = tuple(r.alias_key for r in refs)
        if all(k is not None for k in keys) and pt.numel > 0:
            akey = (keys, pt.out_dtype)
            if akey in alias_index:
                pt.alias_of = alias_index[akey]
            else:
                alias_index[akey] = len(planned)
        planned.append(pt)
    return planned

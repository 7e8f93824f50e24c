"""The merge plan: what will be read, with which weight, and what will be written.

The plan is built and validated before any tensor data is read: the files in order with
their epoch/step and weight, and per output tensor its shape, output dtype and whether it
is averaged (floating tensors) or copied from the last selected checkpoint (integer and
bool tensors). Inputs that disagree on names, shapes or dtype kinds fail here, naming
the file and the tensor. ``--dry-run`` prints :meth:`MergePlan.format`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .discover import discover_with_origin
from .errors import MismatchError, OptionError, SelectionError
from .guards import check_averageable, is_lora_factor, lora_averaged_exactly
from .io import Checkpoint, TensorRef, kind_of, open_checkpoint, strip_prefixes
from .io.dtypes import dtype_kind, dtype_name
from .io.files import check_not_input
from .io.metadata import LIVE_WEIGHTS_KEY
from .io.snapshot_names import apply_indexed_profiles
from .methods import snapshot_sigma, spread, weights_for
from .options import MergeOptions
from .order import Selection, order_checkpoints, parse_range, same_time, select_with_notes
from .plans import MergePlan, PlannedInput, PlannedTensor

__all__ = ["build_plan", "parse_dtype", "plan_tensors", "accumulator_for", "selection_of", "WRAPPER_PREFIXES"]

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
        notes.extend(apply_indexed_profiles(opened, options.snapshot_sigma_rels, options.method, options.key))
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
            matrix = [spread(weights_for(v, pk, time_notes), pk, chosen) for (_l, v), pk in zip(variants, picks)]
            weights = matrix[0]
        else:
            chosen, sel_notes = select_with_notes(ordered, sel)
            notes.extend(sel_notes)
            _refuse_same_time(chosen, rule)
            weights = weights_for(options, chosen, time_notes)
            matrix = None
        notes.extend(dict.fromkeys(time_notes))
        notes.extend(dict.fromkeys(n for c in chosen for n in c.notes))  # how inputs were read (one of 2 models)
        if any(c.weights_key == LIVE_WEIGHTS_KEY for c in chosen):
            notes.append("averaging the live weights (current_model_state) of checkpoints written with Lightning's "
                         "WeightAveraging/EMAWeightAveraging; the callback's own running average is under state_dict: "
                         "--key state_dict averages those instead")
        for c in opened:
            if c not in chosen:
                c.close()
        if not options.strip_prefix:
            stripped = _match_wrapper_prefixes(chosen)
            if stripped:
                notes.append(stripped)
        check_averageable([c for c, w in zip(chosen, weights.values) if w != 0] if matrix is None else chosen,
                          options.lora_factors)
        exact_lora = not options.lora_factors and lora_averaged_exactly([c.format for c in chosen])
        tensors = plan_tensors(chosen, out_dtype, accumulate, options.buffers, exact_lora)
    except BaseException:
        for c in opened:
            c.close()
        raise

    top = max(weights.values, key=abs)
    # a share of the weight means something only when no weight is negative (least-squares weights
    # of a post-hoc EMA are signed: "-3003.8 % of the weight" says nothing; its amplification does)
    if len(chosen) > 1 and min(weights.values) >= 0 and top > 0.9:
        k = weights.values.index(top)
        notes.append(f"{chosen[k].path} gets {top:.1%} of the weight; the average is close to that one checkpoint")
    if output is not None:
        kind = kind_of(output, options.format, [c.format for c in chosen])  # Megatron inputs: a Megatron root
        output_format = kind.name
        notes.extend(kind.notes(output, [c.obj for c in chosen], options.keep_structure))
    planned = [
        PlannedInput(path=c.path, format=c.format, weight=w, epoch=c.meta.epoch, step=c.meta.step,
                     metrics=dict(c.meta.metrics), weights_key=c.weights_key, size=c.size, checkpoint=c,
                     sigma_rel=snapshot_sigma(c))
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
    if pair is None or attr is None:
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
                 accumulate: torch.dtype, buffers: str = "average", lora_ranks: bool = False) -> list[PlannedTensor]:
    """One :class:`PlannedTensor` per name, validated across ``chosen`` (same names, shapes and
    dtype kinds). ``buffers="last"`` copies normalisation statistics (names ending in
    ``running_mean``/``running_var``) from the last checkpoint instead of averaging them.
    ``lora_ranks``: LoRA adapters averaged exactly (their factors are concatenated, so their ranks
    may differ)."""
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
            if r.shape != last.shape and not (lora_ranks and is_lora_factor(name)):
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
            odt = (out_dtype or last.dtype) if kind == "float" else last.dtype
            pt = PlannedTensor(name, last.shape, odt, "average", refs, accumulator_for(refs, accumulate))
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



def accumulator_for(refs: Sequence[TensorRef], accumulate: torch.dtype) -> torch.dtype:
    """The one rule for the dtype a tensor is summed in: float64 when asked (``--accumulate
    float64``), when an input is float64, and when every input is a 16-bit float (float64 holds
    their weighted sums exactly in all practical cases, so a uniform mean is correctly rounded
    even under cancellation); else float32. Complex tensors: complex128 or complex64 likewise.

    Example::

        accumulator_for(plan.tensors[0].refs, torch.float32)  # torch.float64 for bf16 inputs
    """
    if any(r.dtype.is_complex for r in refs):
        wide = accumulate == torch.float64 or any(r.dtype == torch.complex128 for r in refs)
        return torch.complex128 if wide else torch.complex64
    wide = (accumulate == torch.float64 or any(r.dtype == torch.float64 for r in refs)
            or all(r.dtype in (torch.float16, torch.bfloat16) for r in refs))
    return torch.float64 if wide else torch.float32

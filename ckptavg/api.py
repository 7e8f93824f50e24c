"""The Python API: :func:`merge`, :func:`average`, :func:`plan` and :func:`recalibrate_file`.

One path for every merge: build the plan -> make the writer for the output -> run the
engine into it -> (recalibrate BatchNorm) -> commit. A dry run stops after the plan; BatchNorm
recalibration and every output kind (a file, a Hugging Face folder, ``keep_structure``, memory)
are variations of that path. The options are declared once, in :mod:`ckptavg.options`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .devices import resolve_device
from .engine import run
from .errors import OptionError
from .io import kind_of, output_kind
from .io.memory_out import MemoryWriter
from .io.urls import as_path
from .options import MergeOptions, api_signature, collect, expand_variants, option_fields
from .outputs import MergeReport
from .pipeline import OneProcess, bn_provenance, close_inputs, merge_into, write_state
from .planner import build_plan
from .plans import MergePlan

__all__ = ["merge", "average", "plan", "recalibrate_file", "MergeReport", "BNFileReport"]

PathLike = str | os.PathLike[str]
Inputs = PathLike | Sequence[PathLike]


def merge(inputs: Inputs, output: PathLike, **options: Any) -> MergeReport:
    """Average checkpoints into one model file, streaming tensor by tensor.

    ``inputs`` are checkpoint files, globs or folders (one or a list); ``output`` ends in
    ``.safetensors`` or ``.pt``/``.pth``/``.bin``/``.ckpt``, or is a folder (ending in
    ``/``, an existing folder, or a name without a file extension): a Hugging Face model
    folder of safetensors shards with ``model.safetensors.index.json`` and the last input
    model folder's config and tokenizer files. The output appears atomically and only when
    complete.

    Keyword options are those of ``ckptavg merge``, one to one (declared in
    :class:`ckptavg.options.MergeOptions`; ``help(ckptavg.merge)`` lists them with types and
    defaults): the method (``method``, ``decay``, ``decay_per_step``, ``weights``, ``gamma``,
    ``sigma_rel``), the selection (``epochs``, ``steps``, ``last``, ``every``, ``best``,
    ``metric``, ``lower_is_better``, ``order``), reading (``key``, ``strip_prefix``,
    ``trust_pickle``), numerics (``dtype``, ``accumulate``, ``buffers``, ``allow_nonfinite``,
    ``device``) and the output (``bn_spec``, ``bn_mode``, ``keep_structure``,
    ``keep_optimizer``, ``shard_size``, ``dry_run``, ``progress``).

    Returns a :class:`MergeReport` (files, weights, output, bytes, seconds). Raises
    :class:`~ckptavg.CkptavgError` for anything a user can cause.

    Example::

        import ckptavg
        report = ckptavg.merge("runs/", "swa.safetensors", epochs="12:20")
        report = ckptavg.merge(["a.pt", "b.pt"], "ema.pt", method="ema", decay=0.9)
        report = ckptavg.merge(["ft1/", "ft2/", "ft3/"], "soup/", shard_size="2GB")
        report = ckptavg.merge("lightning_logs/", "swa.ckpt", epochs="10:", keep_structure=True)
        print(report.summary(), report.weights)
    """
    opts = collect(options, option_fields(), "merge")
    if distributed.active(opts.distributed):  # torchrun / an initialised process group: split across ranks
        return distributed.merge(inputs, output, opts)
    return merge_into(inputs, output, opts, OneProcess())


def plan(inputs: Inputs, output: PathLike | None = None, **options: Any) -> MergePlan:
    """Build and validate a merge plan without reading tensor data.

    Returns a :class:`~ckptavg.MergePlan`: the selected files in training order with their
    epoch, step and weight, and every output tensor. Takes the options of :func:`merge`.

    Example::

        p = ckptavg.plan("runs/", epochs="10:", method="ema", decay=0.9)
        print(p.format())
        for item in p.inputs:
            print(item.path, item.epoch, item.weight)
    """
    variants = expand_variants(collect(options, option_fields(), "plan"))
    out, kind = (as_path(output), output_kind(output)) if output is not None else (None, None)
    return build_plan(inputs, variants[0][1], out, kind, variants)


def average(inputs: Inputs, **options: Any) -> dict[str, torch.Tensor]:
    """Average checkpoints and return the result as an in-memory state dict (CPU tensors).

    Takes the averaging options of :func:`merge` (method, selection, reading, numerics) and
    ``progress``; meant for models that fit in memory. Tied tensors come back as one tensor
    under each of their names.

    Example::

        sd = ckptavg.average(["ep8.pt", "ep9.pt", "ep10.pt"])
        sd = ckptavg.average("runs/", last=5, method="ema", decay=0.9)
        model.load_state_dict(sd)
    """
    allowed = option_fields("plan") + [f for f in option_fields("output") if f.name == "progress"]
    variants = expand_variants(collect(options, allowed, "average"))
    if len(variants) > 1:
        raise OptionError(f"average returns one state dict: give one value for {', '.join(variants[0][0])} "
                          "(merge writes several outputs from one pass)")
    opts = variants[0][1]
    resolve_device(opts.device)
    p = build_plan(inputs, opts)
    try:
        from .adapters import average_adapter_plan, is_adapter_plan

        if is_adapter_plan(p) and not opts.lora_factors:  # PEFT adapters: the exact average of their updates
            return average_adapter_plan(p, opts.lora_rank)[0]
        if opts.lora_rank is not None:
            raise OptionError("lora_rank applies to PEFT adapter folders (adapter_config.json beside the weights)")
        writer = MemoryWriter(p.entries())
        run(p, writer, device=opts.device, progress=opts.progress, allow_nonfinite=opts.allow_nonfinite)
        writer.commit()
    finally:
        close_inputs(p)
    return writer.result


merge.__signature__ = api_signature(merge, option_fields())  # type: ignore[attr-defined]
plan.__signature__ = api_signature(plan, option_fields())  # type: ignore[attr-defined]
average.__signature__ = api_signature(  # type: ignore[attr-defined]
    average, option_fields("plan") + [f for f in option_fields("output") if f.name == "progress"])


@dataclass
class BNFileReport:
    """What :func:`recalibrate_file` did."""

    input: Path
    output: Path
    bn: Any
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        return f"wrote {self.output}: {self.bn.summary()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``ckptavg bn --json``): the files, the recalibration and the cost."""
        bn = self.bn
        return {"input": os.fspath(self.input), "output": os.fspath(self.output), "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 3),
                "bn": {"mode": bn.mode, "layers": list(bn.layers), "batches": bn.batches, "samples": bn.samples,
                       "skipped": bn.skipped, "unused": list(bn.unused), "seconds": round(bn.seconds, 3)}}


def recalibrate_file(
    model_file: PathLike,
    spec: PathLike,
    output: PathLike,
    *,
    mode: str = "precise",
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
    progress: bool = False,
) -> BNFileReport:
    """Recalibrate the BatchNorm statistics of a model file and write the result.

    ``spec`` is a BN spec (TOML) naming the model factory and the data. Key names are
    kept and only BN statistics change; the output format follows ``output``'s extension.
    ``key`` picks the weights inside a torch checkpoint, as in :func:`merge`.

    Example::

        report = ckptavg.recalibrate_file("swa.pt", "bn.toml", "swa_bn.pt", mode="precise")
        print(report.summary())
    """
    from .bn import load_spec, recalibrate_state_dict
    from .io import open_checkpoint

    t0 = time.perf_counter()
    out = as_path(output)
    kind = kind_of(output)
    if not kind.single_file:
        raise OptionError(f"{output}: the output must end in .safetensors or .pt/.pth/.bin/.ckpt")
    src = as_path(model_file)
    try:
        if str(out) == str(src) or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise OptionError(f"{out}: the output is also the input; choose another output path")
    except OSError:
        pass
    loaded_spec = load_spec(spec)
    ckpt = open_checkpoint(src, key=key, trust_pickle=trust_pickle)
    if ckpt.format == "torch" and ckpt.weights_key is not None and "keep_structure" in kind.options:
        # A structured checkpoint (Lightning, timm, fairseq): keep its structure, as --keep-structure
        # does, with everything but the BatchNorm statistics unchanged (optimizer state included).
        ckpt.close()
        opts = MergeOptions(key=key, trust_pickle=trust_pickle, bn_spec=os.fspath(spec), bn_mode=mode,
                            keep_structure=True, keep_optimizer=True, progress=progress)
        rep = merge_into([src], out, opts, OneProcess(), {"device": device, "max_batches": max_batches})
        return BNFileReport(input=src, output=out, bn=rep.bn, bytes_written=rep.bytes_written,
                            seconds=time.perf_counter() - t0)
    try:
        shared: dict[tuple, torch.Tensor] = {}
        sd: dict[str, torch.Tensor] = {}
        for name, ref in ckpt.tensors.items():
            if ref.alias_key is not None and ref.alias_key in shared:
                sd[name] = shared[ref.alias_key]  # tied weights stay one tensor
                continue
            t = ref.materialize()
            ref.release()
            sd[name] = t
            if ref.alias_key is not None:
                shared[ref.alias_key] = t
        metadata = dict(ckpt.st_metadata or {})
    finally:
        ckpt.close()
    new_sd, bn_report = recalibrate_state_dict(sd, loaded_spec, mode=mode, device=device, progress=progress,
                                               max_batches=max_batches)
    metadata["ckptavg_bn"] = bn_provenance(bn_report)
    metadata.setdefault("format", "pt")
    _writer, written = write_state(new_sd, out, metadata)
    return BNFileReport(input=src, output=out, bn=bn_report, bytes_written=written,
                        seconds=time.perf_counter() - t0)

"""The Python API: :func:`merge`, :func:`average`, :func:`plan` and :func:`recalibrate_file`.

One path for every merge: build the plan -> make the writer for the output -> run the
engine into it -> (recalibrate BatchNorm) -> commit. A dry run stops after the plan; BatchNorm
recalibration and every output kind (a file, a Hugging Face folder, ``keep_structure``, memory)
are variations of that path. The options are declared once, in :mod:`ckptavg.options`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .engine import EngineStats, resolve_device, run
from .errors import OptionError
from .io import Writer, feed, open_writer, output_kind, write_state_dict
from .io.memory_out import MemoryWriter
from .options import MergeOptions, api_signature, collect, expand_variants, option_fields
from .outputs import MergeReport, check_output_options
from .planner import MergePlan, build_plan, parse_dtype

__all__ = ["merge", "average", "plan", "recalibrate_file", "MergeReport", "BNFileReport"]

PathLike = str | os.PathLike[str]
Inputs = PathLike | Sequence[PathLike]


def _make_writer(p: MergePlan, out: Path, kind: str, opts: MergeOptions, shard_size: int,
                 structured: Any) -> Writer:
    if structured is not None:
        return structured.writer(out)
    extra: dict[str, Any] = {}
    if kind == "hf-folder":
        source = next((i.path for i in reversed(p.inputs) if i.format == "hf-folder"), None)
        extra = {"shard_size": shard_size, "copy_source": source, "config_dtype": parse_dtype(opts.dtype)}
    return open_writer(kind, out, p.entries(), p.provenance(), **extra)


def _execute(p: MergePlan, writers: list[Writer], opts: MergeOptions, n_main: int,
             bn_overrides: dict[str, Any] | None = None, weights: list[Any] | None = None
             ) -> tuple[EngineStats, Any]:
    """Run the engine into ``writers`` (one per weight vector of ``weights``; one pass over the
    inputs) or, with a BatchNorm spec, into one writer through the recalibration; then commit every
    writer. On any failure every one is aborted, so nothing is left at any destination.
    ``bn_overrides``: the ``device``/``max_batches`` given to ``ckptavg bn`` over the spec's own."""
    bn_report = None
    try:
        if opts.bn_spec is None:
            stats = run(p, writers, weights=weights, device=opts.device, progress=opts.progress,
                        allow_nonfinite=opts.allow_nonfinite)
        else:
            (writer,) = writers  # recalibration runs the model: one output at a time
            from .bn import load_spec, recalibrate_state_dict

            spec = load_spec(opts.bn_spec)
            entries = p.entries()
            mem = MemoryWriter(entries)
            stats = run(p, mem, device=opts.device, progress=opts.progress, allow_nonfinite=opts.allow_nonfinite)
            mem.commit()
            # the model's own weights are the first n_main entries (keep-structure appends other weight sets)
            main = {e.name: mem.result[e.name] for e in entries[:n_main]}
            over = {"device": None, **(bn_overrides or {})}
            new, bn_report = recalibrate_state_dict(main, spec, mode=opts.bn_mode, progress=opts.progress, **over)
            result = {**mem.result, **new}
            feed(writer, [result[e.name] for e in entries if e.alias_of is None])
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return stats, bn_report


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
        variants = expand_variants(opts)
        if len(variants) > 1:
            raise OptionError("several outputs from one pass are not supported across ranks yet; run one merge per "
                              "output under torchrun")
        return distributed.merge(inputs, output, variants[0][1])
    return _merge(inputs, output, opts)


def _output_names(output: PathLike, labels: list[dict[str, str]]) -> list[Path]:
    """One output path per variant, from an output-name template (``ema-{sigma_rel}.safetensors``)."""
    text = os.fspath(output)
    if len(labels) == 1:
        return [Path(text)]
    swept = ", ".join(labels[0])
    if "{" not in text:
        raise OptionError(
            f"{text}: {len(labels)} outputs ({swept} given several values) need an output name template, "
            f"e.g. -o 'avg-{{{next(iter(labels[0]))}}}.safetensors'"
        )
    try:
        names = [text.format(**label) for label in labels]
    except (KeyError, IndexError, ValueError) as e:
        raise OptionError(f"{text}: the output name template names {e}, which is not among the options given "
                          f"several values ({swept})") from None
    if len(set(names)) != len(names):
        raise OptionError(f"{text}: the template gives the same name to two outputs; name every option given "
                          f"several values ({swept}) in it")
    return [Path(n) for n in names]


def _merge(inputs: Inputs, output: PathLike, opts: MergeOptions,
           bn_overrides: dict[str, Any] | None = None) -> MergeReport:
    t0 = time.perf_counter()
    variants = expand_variants(opts)
    outs = _output_names(output, [label for label, _v in variants])
    opts = variants[0][1]
    kinds = [output_kind(o) for o in outs]
    if len(outs) > 1 and opts.keep_structure:
        raise OptionError("--keep-structure writes one checkpoint; give one value for "
                          f"{', '.join(variants[0][0])}, or write the several outputs without --keep-structure")
    shard_size = 0
    for o, k in zip(outs, kinds):
        shard_size = check_output_options(o, k, opts)
    resolve_device(opts.device)
    p = build_plan(inputs, opts, outs[0], kinds[0], variants)
    try:
        n_main = len(p.tensors)
        structured = None
        extra: dict[str, Any] = {}
        if opts.keep_structure:
            from .structure import prepare

            structured = prepare(p, keep_optimizer=opts.keep_optimizer)
            p = structured.plan
            extra = {"structure_of": os.fspath(structured.base), "averaged_weight_sets": structured.averaged,
                     "dropped": structured.dropped, "output_notes": structured.summary_notes()}
        for o, k in zip(outs, kinds):
            if k == "hf-folder":
                from .io.hf_folder_out import check_destination

                check_destination(o)  # refuse a folder of other files before reading any data
            elif k == "dcp":
                from .io.dcp_out import check_dcp_destination

                check_dcp_destination(o)
        if len(outs) > 1:
            extra["outputs"] = [os.fspath(o) for o in outs]
        if opts.dry_run:
            if structured is not None:
                p.notes.extend(structured.summary_notes())
            return MergeReport(plan=p, output=outs[0], dry_run=True, seconds=time.perf_counter() - t0, extra=extra)
        weights = p.variants or [p.weights]
        if len(outs) > 1 and opts.bn_spec is not None:
            # BatchNorm runs the model per output: one pass each (the averages themselves are cheap)
            written, bn_report, stats = 0, [], EngineStats()
            for o, k, w in zip(outs, kinds, weights):
                pw = replace(p, weights=w, variants=None)
                writer = _make_writer(pw, o, k, opts, shard_size, structured)
                st, rep = _execute(pw, [writer], opts, n_main, bn_overrides)
                written += writer.bytes_written
                stats.bytes_read += st.bytes_read
                bn_report.append(rep)
        else:
            writers = [_make_writer(replace(p, weights=w), o, k, opts, shard_size, structured)
                       for o, k, w in zip(outs, kinds, weights)]
            stats, bn_report = _execute(p, writers, opts, n_main, bn_overrides, weights)
            written = sum(w.bytes_written for w in writers)
            if len(writers) == 1 and hasattr(writers[0], "report"):
                extra.update(writers[0].report())
        return MergeReport(plan=p, output=outs[0], bytes_written=written, bytes_read=stats.bytes_read,
                           seconds=time.perf_counter() - t0, bn=bn_report, extra=extra)
    finally:
        for i in p.inputs:
            i.checkpoint.close()


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
    out, kind = (Path(output), output_kind(output)) if output is not None else (None, None)
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
        writer = MemoryWriter(p.entries())
        _execute(p, [writer], opts, len(p.tensors))
    finally:
        for i in p.inputs:
            i.checkpoint.close()
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
    out = Path(output)
    if output_kind(output) not in ("torch", "safetensors"):
        raise OptionError(f"{output}: the output must end in .safetensors or .pt/.pth/.bin/.ckpt")
    src = Path(model_file)
    try:
        if out.exists() and src.exists() and os.path.samefile(out, src):
            raise OptionError(f"{out}: the output is also the input; choose another output path")
    except OSError:
        pass
    loaded_spec = load_spec(spec)
    ckpt = open_checkpoint(src, key=key, trust_pickle=trust_pickle)
    if ckpt.format == "torch" and ckpt.weights_key is not None and output_kind(out) == "torch":
        # A structured checkpoint (Lightning, timm, fairseq): keep its structure, as --keep-structure
        # does, with everything but the BatchNorm statistics unchanged (optimizer state included).
        ckpt.close()
        opts = MergeOptions(key=key, trust_pickle=trust_pickle, bn_spec=os.fspath(spec), bn_mode=mode,
                            keep_structure=True, keep_optimizer=True, progress=progress)
        rep = _merge([src], out, opts, {"device": device, "max_batches": max_batches})
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
    metadata["ckptavg_bn"] = json.dumps({"mode": mode, "layers": len(bn_report.layers),
                                         "batches": bn_report.batches, "samples": bn_report.samples})
    metadata.setdefault("format", "pt")
    written = write_state_dict(new_sd, out, metadata)
    return BNFileReport(input=src, output=out, bn=bn_report, bytes_written=written,
                        seconds=time.perf_counter() - t0)

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .engine import EngineStats, resolve_device, run
from .errors import OptionError
from .io import Writer, open_writer, output_kind, write_state_dict
from .io.memory_out import MemoryWriter
from .io.writer import feed
from .options import MergeOptions, api_signature, collect, option_fields
from .planner import MergePlan, build_plan, parse_dtype

__all__ = ["merge", "average", "plan", "recalibrate_file", "MergeReport", "BNFileReport"]

PathLike = str | os.PathLike[str]
Inputs = PathLike | Sequence[PathLike]


@dataclass
class MergeReport:
    """What a merge did: the plan (files, weights), the output and the cost.

    ``files`` and ``weights`` list the selected checkpoints in training order.
    """

    plan: MergePlan
    output: Path | None
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    bn: Any = None  # BN recalibration report, when a spec was given
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return self.plan.paths

    @property
    def weights(self) -> list[float]:
        return [i.weight for i in self.plan.inputs]

    @property
    def method(self) -> str:
        return self.plan.method

    def summary(self) -> str:
        """One line for the end of a run."""
        n = len(self.plan.inputs)
        what = f"{n} checkpoint{'s' if n != 1 else ''} ({self.plan.method})"
        if self.dry_run:
            return f"dry run: would average {what} into {self.output}; no tensor data read"
        mb = self.bytes_written / 1e6
        line = f"wrote {self.output}: {what}, {len(self.plan.tensors)} tensors, {mb:.1f} MB in {self.seconds:.1f} s"
        if self.bn is not None:
            line += f"; {self.bn.summary()}"
        for note in self.extra.get("output_notes", []):
            line += f"; {note}"
        return line

    def to_dict(self) -> dict[str, Any]:
        d = self.plan.to_dict()
        d.update(bytes_written=self.bytes_written, bytes_read=self.bytes_read, seconds=round(self.seconds, 3),
                 dry_run=self.dry_run)
        d.update(self.extra)  # folder output / keep-structure details
        return d


def _check_output_options(out: Path, kind: str, opts: MergeOptions) -> int:
    """Validate the output options together (before anything is read); returns the shard size."""
    from .io.hf_folder_out import parse_size

    if opts.keep_optimizer and not opts.keep_structure:
        raise OptionError("--keep-optimizer only applies with --keep-structure")
    if opts.keep_structure and kind != "torch":
        raise OptionError(
            f"{out}: --keep-structure writes a torch checkpoint like its inputs: give an output ending in "
            ".ckpt/.pt/.pth/.bin"
        )
    if opts.shard_size is not None and kind != "hf-folder":
        raise OptionError(f"{out}: --shard-size applies to folder output (-o DIR/), not to a single file")
    if opts.bn_mode not in ("precise", "torch"):
        raise OptionError(f"--bn-mode must be precise or torch, got {opts.bn_mode!r}")
    return parse_size(opts.shard_size)


def _make_writer(p: MergePlan, out: Path, kind: str, opts: MergeOptions, shard_size: int,
                 structured: Any) -> Writer:
    if structured is not None:
        return structured.writer(out)
    extra: dict[str, Any] = {}
    if kind == "hf-folder":
        source = next((i.path for i in reversed(p.inputs) if i.format == "hf-folder"), None)
        extra = {"shard_size": shard_size, "copy_source": source, "config_dtype": parse_dtype(opts.dtype)}
    return open_writer(kind, out, p.entries(), p.provenance(), **extra)


def _execute(p: MergePlan, writer: Writer, opts: MergeOptions, n_main: int) -> tuple[EngineStats, Any]:
    """Run the engine into ``writer`` (through BatchNorm recalibration when asked) and commit;
    on any failure abort it, so nothing is left at the destination."""
    bn_report = None
    try:
        if opts.bn_spec is None:
            stats = run(p, writer, device=opts.device, progress=opts.progress, allow_nonfinite=opts.allow_nonfinite)
        else:
            from .bn import load_spec, recalibrate_state_dict

            spec = load_spec(opts.bn_spec)
            entries = p.entries()
            mem = MemoryWriter(entries)
            stats = run(p, mem, device=opts.device, progress=opts.progress, allow_nonfinite=opts.allow_nonfinite)
            mem.commit()
            # the model's own weights are the first n_main entries (keep-structure appends other weight sets)
            main = {e.name: mem.result[e.name] for e in entries[:n_main]}
            new, bn_report = recalibrate_state_dict(main, spec, mode=opts.bn_mode, device=None,
                                                    progress=opts.progress)
            result = {**mem.result, **new}
            feed(writer, [result[e.name] for e in entries if e.alias_of is None])
        writer.commit()
    except BaseException:
        writer.abort()
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
    t0 = time.perf_counter()
    opts = collect(options, option_fields(), "merge")
    if distributed.active(opts.distributed):  # torchrun / an initialised process group: split across ranks
        return distributed.merge(inputs, output, opts)
    out = Path(output)
    kind = output_kind(output)
    shard_size = _check_output_options(out, kind, opts)
    resolve_device(opts.device)
    p = build_plan(inputs, opts, out, kind)
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
        if kind == "hf-folder":
            from .io.hf_folder_out import check_destination

            check_destination(out)  # refuse a folder of other files before reading any data
        if opts.dry_run:
            if structured is not None:
                p.notes.extend(structured.summary_notes())
            return MergeReport(plan=p, output=out, dry_run=True, seconds=time.perf_counter() - t0, extra=extra)
        writer = _make_writer(p, out, kind, opts, shard_size, structured)
        stats, bn_report = _execute(p, writer, opts, n_main)
        if hasattr(writer, "report"):
            extra.update(writer.report())
        return MergeReport(plan=p, output=out, bytes_written=writer.bytes_written, bytes_read=stats.bytes_read,
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
    opts = collect(options, option_fields(), "plan")
    out, kind = (Path(output), output_kind(output)) if output is not None else (None, None)
    return build_plan(inputs, opts, out, kind)


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
    opts = collect(options, allowed, "average")
    resolve_device(opts.device)
    p = build_plan(inputs, opts)
    try:
        writer = MemoryWriter(p.entries())
        _execute(p, writer, opts, len(p.tensors))
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

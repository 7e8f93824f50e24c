"""The Python API: :func:`merge`, :func:`average`, :func:`plan` and :func:`recalibrate_file`.

Each averaging function takes the inputs (paths, globs, folders) and the same typed
keyword options as the ``ckptavg merge`` command.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .engine import EngineStats, resolve_device, run
from .errors import OptionError
from .plan import MergeOptions, MergePlan, build_plan
from .writers import MemoryWriter, open_writer, save_state_dict

__all__ = ["merge", "average", "plan", "recalibrate_file", "MergeReport", "BNFileReport"]

PathLike = str | os.PathLike[str]
Inputs = PathLike | Sequence[PathLike]
#: an inclusive range: "12:20", "150:", ":20", "7", (lo, hi) or a range
RangeLike = str | tuple[int | None, int | None] | range | None

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".tar")


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


def _collect(values: dict[str, Any]) -> MergeOptions:
    """The :class:`MergeOptions` among a public function's arguments."""
    return MergeOptions(**{f.name: values[f.name] for f in fields(MergeOptions)})


def _output_path(output: PathLike) -> tuple[Path, str]:
    p = Path(output)
    name = os.fspath(output).lower()
    if name.endswith(".safetensors"):
        return p, "safetensors"
    if any(name.endswith(s) for s in _TORCH_SUFFIXES):
        return p, "torch"
    raise OptionError(
        f"{output}: the output must end in .safetensors or .pt/.pth/.bin/.ckpt (the extension picks the format)"
    )


def _merge_output_path(output: PathLike) -> tuple[Path, str]:
    """Like :func:`_output_path`, plus folders (Hugging Face sharded safetensors output)."""
    from .hf import is_folder_output

    if is_folder_output(output):
        return Path(output), "hf-folder"
    try:
        return _output_path(output)
    except OptionError as e:
        raise OptionError(f"{e}, or name a folder (ending in /) for Hugging Face sharded safetensors") from None


def _check_output_options(out: Path, fmt: str, keep_structure: bool, keep_optimizer: bool,
                          shard_size: int | str | None, bn_spec: PathLike | None) -> int:
    """Validate the output options together (before anything is read); returns the shard size."""
    from .hf import parse_size

    if keep_optimizer and not keep_structure:
        raise OptionError("--keep-optimizer only applies with --keep-structure")
    if keep_structure and fmt != "torch":
        raise OptionError(
            f"{out}: --keep-structure writes a torch checkpoint like its inputs: give an output ending in "
            ".ckpt/.pt/.pth/.bin"
        )
    if shard_size is not None and fmt != "hf-folder":
        raise OptionError(f"{out}: --shard-size applies to folder output (-o DIR/), not to a single file")
    if bn_spec is not None and (keep_structure or fmt == "hf-folder"):
        raise OptionError(
            "--bn-spec cannot be combined with --keep-structure or folder output yet; merge to a .pt/.safetensors "
            "file with --bn-spec instead"
        )
    return parse_size(shard_size)


def _merge_special(p: MergePlan, out: Path, opts: MergeOptions, t0: float, *, dry_run: bool, progress: bool,
                   keep_structure: bool, keep_optimizer: bool, shard_size: int) -> MergeReport:
    """Folder output (:mod:`ckptavg.hf`) and ``keep_structure`` (:mod:`ckptavg.structure`)."""
    if keep_structure:
        from . import structure

        so = structure.prepare(p, keep_optimizer=keep_optimizer)
        extra: dict[str, Any] = {"structure_of": os.fspath(so.base), "averaged_weight_sets": so.averaged,
                                 "dropped": so.dropped, "output_notes": so.summary_notes()}
        if dry_run:
            so.plan.notes.extend(so.summary_notes())
            return MergeReport(plan=so.plan, output=out, dry_run=True, seconds=time.perf_counter() - t0, extra=extra)
        written, stats = structure.write(so, out, device=opts.device, progress=progress,
                                         allow_nonfinite=opts.allow_nonfinite)
        return MergeReport(plan=so.plan, output=out, bytes_written=written, bytes_read=stats.bytes_read,
                           seconds=time.perf_counter() - t0, extra=extra)
    from . import hf

    hf.check_destination(out)  # refuse a folder of other files before reading any data
    if dry_run:
        return MergeReport(plan=p, output=out, dry_run=True, seconds=time.perf_counter() - t0)
    writer = hf.folder_writer(p, out, shard_size)
    stats = _run_and_commit(p, writer, opts, progress)
    return MergeReport(plan=p, output=out, bytes_written=writer.bytes_written, bytes_read=stats.bytes_read,
                       seconds=time.perf_counter() - t0, extra=writer.report())


def plan(
    inputs: Inputs,
    output: PathLike | None = None,
    *,
    method: str = "uniform",
    decay: float | None = None,
    decay_per_step: float | None = None,
    weights: Sequence[float] | str | None = None,
    gamma: float | None = None,
    sigma_rel: float | None = None,
    epochs: RangeLike = None,
    steps: RangeLike = None,
    last: int | None = None,
    every: int | None = None,
    best: int | None = None,
    metric: str | None = None,
    lower_is_better: bool = False,
    order: str = "auto",
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str = "float32",
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> MergePlan:
    """Build and validate a merge plan without reading tensor data.

    Returns a :class:`~ckptavg.MergePlan`: the selected files in training order with their
    epoch, step and weight, and every output tensor. Takes the options of :func:`merge`.

    Example::

        p = ckptavg.plan("runs/", epochs="10:", method="ema", decay=0.9)
        print(p.format())
        for item in p.inputs:
            print(item.path, item.epoch, item.weight)
    """
    opts = _collect(locals())
    out, fmt = _merge_output_path(output) if output is not None else (None, None)
    return build_plan(inputs, opts, out, fmt)


def merge(
    inputs: Inputs,
    output: PathLike,
    *,
    method: str = "uniform",
    decay: float | None = None,
    decay_per_step: float | None = None,
    weights: Sequence[float] | str | None = None,
    gamma: float | None = None,
    sigma_rel: float | None = None,
    epochs: RangeLike = None,
    steps: RangeLike = None,
    last: int | None = None,
    every: int | None = None,
    best: int | None = None,
    metric: str | None = None,
    lower_is_better: bool = False,
    order: str = "auto",
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str = "float32",
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    bn_spec: PathLike | None = None,
    bn_mode: str = "precise",
    keep_structure: bool = False,
    keep_optimizer: bool = False,
    shard_size: int | str | None = None,
) -> MergeReport:
    """Average checkpoints into one model file, streaming tensor by tensor.

    ``inputs`` are checkpoint files, globs or folders (one or a list); ``output`` ends in
    ``.safetensors`` or ``.pt``/``.pth``/``.bin``/``.ckpt``, or is a folder (ending in
    ``/``, an existing folder, or a name without a file extension): a Hugging Face model
    folder of safetensors shards of at most ``shard_size`` (default ``"5GB"``; KB/MB/GB)
    with ``model.safetensors.index.json`` and the last input model folder's config and
    tokenizer files. The output appears atomically and only when complete.

    Options shared by :func:`merge`, :func:`average` and :func:`plan` (all keyword-only,
    each the ``ckptavg merge`` flag of the same name):

    * ``method``: ``"uniform"`` (SWA), ``"ema"`` or ``"power-ema"``; ``decay`` (EMA decay
      per checkpoint) or ``decay_per_step`` (per training step, using recorded steps);
      ``gamma`` or ``sigma_rel`` for power-ema; ``weights``: explicit weights in checkpoint
      order (a sequence or ``"0.5,0.3,0.2"``), normalised to sum 1.
    * selection: ``epochs``/``steps`` (``"12:20"``, ``"150:"``, ``(lo, hi)`` or a ``range``;
      inclusive), ``last``, ``every``, ``best`` with ``metric`` and ``lower_is_better``.
    * ``order``: ``"auto"``, ``"given"``, ``"step"``, ``"epoch"`` or ``"name"``.
    * ``key``: where the weights are in a torch checkpoint (dotted); ``strip_prefix``: prefix(es)
      removed from tensor names.
    * ``dtype``: output dtype of floating tensors; ``accumulate``: ``"float32"`` or ``"float64"``;
      ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    * ``trust_pickle``: allow full unpickling (runs code from the file); ``allow_nonfinite``:
      average inputs holding NaN/Inf instead of failing.

    Merge-only options: ``dry_run`` (build the plan, read no tensor data); ``progress``
    (tqdm bar on stderr); ``bn_spec``/``bn_mode``: recalibrate BatchNorm statistics with a
    spec before writing (``"precise"`` or ``"torch"``); ``keep_structure``: write the last
    selected checkpoint with its weights replaced by the average (Lightning, timm and
    fairseq load it as their own), dropping optimizer/scheduler states unless
    ``keep_optimizer``.

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
    opts = _collect(locals())
    out, fmt = _merge_output_path(output)
    shard = _check_output_options(out, fmt, keep_structure, keep_optimizer, shard_size, bn_spec)
    resolve_device(opts.device)
    p = build_plan(inputs, opts, out, fmt)
    try:
        if keep_structure or fmt == "hf-folder":
            return _merge_special(p, out, opts, t0, dry_run=dry_run, progress=progress,
                                  keep_structure=keep_structure, keep_optimizer=keep_optimizer, shard_size=shard)
        if dry_run:
            return MergeReport(plan=p, output=out, dry_run=True, seconds=time.perf_counter() - t0)
        if bn_spec is not None:
            return _merge_with_bn(p, out, bn_spec, bn_mode, progress, opts, t0)
        writer = open_writer(out, p.entries(), p.provenance(), fmt)
        stats = _run_and_commit(p, writer, opts, progress)
        return MergeReport(plan=p, output=out, bytes_written=writer.bytes_written, bytes_read=stats.bytes_read,
                           seconds=time.perf_counter() - t0)
    finally:
        for i in p.inputs:
            i.checkpoint.close()


def _merge_with_bn(p: MergePlan, out: Path, bn_spec: PathLike, bn_mode: str, progress: bool,
                   opts: MergeOptions, t0: float) -> MergeReport:
    from .bn import load_spec, recalibrate_state_dict

    spec = load_spec(bn_spec)
    sd, stats = _average_plan(p, opts, progress)
    new_sd, bn_report = recalibrate_state_dict(sd, spec, mode=bn_mode, device=None, progress=progress)
    written = save_state_dict(new_sd, out, p.provenance())
    return MergeReport(plan=p, output=out, bytes_written=written, bytes_read=stats.bytes_read,
                       seconds=time.perf_counter() - t0, bn=bn_report)


def _run_and_commit(p: MergePlan, writer: Any, opts: MergeOptions, progress: bool) -> EngineStats:
    """Stream the plan into ``writer`` and commit it; on any failure abort it (nothing is left)."""
    try:
        stats = run(p, writer, device=opts.device, progress=progress, allow_nonfinite=opts.allow_nonfinite)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return stats


def _average_plan(p: MergePlan, opts: MergeOptions, progress: bool) -> tuple[dict[str, torch.Tensor], EngineStats]:
    writer = MemoryWriter(p.entries())
    stats = _run_and_commit(p, writer, opts, progress)
    return writer.result, stats


def average(
    inputs: Inputs,
    *,
    method: str = "uniform",
    decay: float | None = None,
    decay_per_step: float | None = None,
    weights: Sequence[float] | str | None = None,
    gamma: float | None = None,
    sigma_rel: float | None = None,
    epochs: RangeLike = None,
    steps: RangeLike = None,
    last: int | None = None,
    every: int | None = None,
    best: int | None = None,
    metric: str | None = None,
    lower_is_better: bool = False,
    order: str = "auto",
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str = "float32",
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Average checkpoints and return the result as an in-memory state dict (CPU tensors).

    Takes the options of :func:`merge` (see there); meant for models that fit in memory.
    Tied tensors come back as one tensor under each of their names.

    Example::

        sd = ckptavg.average(["ep8.pt", "ep9.pt", "ep10.pt"])
        sd = ckptavg.average("runs/", last=5, method="ema", decay=0.9)
        model.load_state_dict(sd)
    """
    opts = _collect(locals())
    resolve_device(opts.device)
    p = build_plan(inputs, opts)
    try:
        sd, _ = _average_plan(p, opts, progress)
    finally:
        for i in p.inputs:
            i.checkpoint.close()
    return sd


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
    from .readers import open_checkpoint

    t0 = time.perf_counter()
    out, _fmt = _output_path(output)
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
    written = save_state_dict(new_sd, out, metadata)
    return BNFileReport(input=src, output=out, bn=bn_report, bytes_written=written,
                        seconds=time.perf_counter() - t0)

"""The one merge driver: plan -> writers -> engine -> (BatchNorm) -> agree -> commit.

Every merge goes through :func:`merge_into`, whatever runs it: one process, or the ranks of
``torch.distributed`` under torchrun. The difference is a :class:`Group`: :class:`OneProcess`
(a group of one) or :class:`ckptavg.distributed.Ranks`. The group opens the writers (the
whole output, or this rank's part of it), says which tensors this process averages, agrees
with the other members on success after each phase, and publishes (or removes) what was
written. :func:`write_state` is the same driver for a model already in memory (the winner of
a sweep, a soup, a recalibrated file): writers -> agree -> commit.

Example::

    from ckptavg.pipeline import OneProcess, merge_into
    report = merge_into("runs/", "swa.safetensors", MergeOptions(last=5), OneProcess())
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from .devices import resolve_device
from .engine import EngineStats, run
from .errors import CheckpointReadError, OptionError
from .io import Writer, feed, kind_of, state_dict_entries
from .io.files import check_not_input
from .io.kinds import OutputKind, OutputSetup
from .io.memory_out import MemoryWriter
from .io.writer import Entry
from .options import MergeOptions, expand_variants, single_values
from .outputs import MergeReport, check_output_options, output_names
from .planner import build_plan, parse_dtype
from .plans import MergePlan

__all__ = ["Group", "OneProcess", "Target", "merge_into", "write_state", "close_inputs", "bn_provenance",
           "check_unchanged"]


@dataclass
class Target:
    """One output of a merge: where, which kind, and how it will be published (``mode``, from the
    kind's destination check)."""

    dest: Path
    kind: OutputKind
    mode: str = "new"


class Group(Protocol):
    """The processes that run one merge together (see the module docstring)."""

    rank: int
    world: int

    def check(self, opts: MergeOptions, targets: Sequence[Target]) -> None:
        """Refuse what this group cannot do, before anything is read."""

    def device(self, device: str) -> str:
        """The device this member accumulates on."""

    def prepare(self, targets: Sequence[Target], err: BaseException | None, plan: MergePlan | None) -> None:
        """Agree that every member planned (raising if one failed) the same merge (``plan``) and
        make the temporary folders."""

    def share(self, plan: MergePlan) -> tuple[list[int], int | None]:
        """The tensors (plan indices) this member averages and writes, and the chunk size (None: the engine's own)."""

    def open(self, target: Target, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> Writer:
        """The writer of this member's output (or its part of it)."""

    def agree(self, err: BaseException | None, payload: Any = None, lost: str = "nothing was published",
              left: str = "nothing was published") -> list[Any]:
        """Exchange ``payload`` with every member; raise if any failed."""

    def publish(self, writers: Sequence[Writer], err: BaseException | None, read: int) -> tuple[int, int]:
        """Agree on success and publish every writer's output; returns (bytes read, bytes written) of all members."""

    def abandon(self, writers: Sequence[Writer]) -> None:
        """After a failure: remove everything written, so nothing is left at any destination."""

    def report(self, writers: Sequence[Writer]) -> dict[str, Any]:
        """What the report adds about the outputs (shards, ranks...)."""

    def stopping(self) -> bool:
        """Whether this member was asked to stop (a watcher's stop): the engine then cancels the
        run, which fails like any error and is abandoned through :meth:`publish`."""


class OneProcess:
    """A group of one: the whole plan, each writer writes and publishes its whole output."""

    rank = 0
    world = 1

    def check(self, opts: MergeOptions, targets: Sequence[Target]) -> None:
        """Nothing to refuse: one process writes every output kind."""

    def device(self, device: str) -> str:
        """The device as given."""
        return device

    def prepare(self, targets: Sequence[Target], err: BaseException | None, plan: MergePlan | None) -> None:
        """Raise the planning error, if any (each writer makes its own temporary file or folder)."""
        if err is not None:
            raise err

    def share(self, plan: MergePlan) -> tuple[list[int], int | None]:
        """Every tensor, in the engine's own chunk size."""
        return list(range(len(plan.tensors))), None

    def open(self, target: Target, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> Writer:
        """The kind's writer of the whole output."""
        return target.kind.open(target.dest, entries, metadata, setup)

    def agree(self, err: BaseException | None, payload: Any = None, lost: str = "", left: str = "") -> list[Any]:
        """Raise ``err``, or return ``[payload]``."""
        if err is not None:
            raise err
        return [payload]

    def publish(self, writers: Sequence[Writer], err: BaseException | None, read: int) -> tuple[int, int]:
        """Commit every writer (each publishes atomically)."""
        if err is not None:
            raise err
        for w in writers:
            w.commit()
        return read, sum(w.bytes_written for w in writers)

    def abandon(self, writers: Sequence[Writer]) -> None:
        """Abort every writer."""
        for w in writers:
            w.abort()

    def report(self, writers: Sequence[Writer]) -> dict[str, Any]:
        """The writer's own details, for a single output."""
        return dict(writers[0].report()) if len(writers) == 1 else {}

    def stopping(self) -> bool:
        """Never: a plain merge runs to its end (Ctrl-C and SIGTERM interrupt it as exceptions)."""
        return False


def close_inputs(plan: MergePlan | None) -> None:
    """Close every input file of a plan."""
    if plan is not None:
        for i in plan.inputs:
            i.checkpoint.close()


def _setup(plan: MergePlan, opts: MergeOptions, shard_size: int | None) -> OutputSetup:
    used = [i for i, w in zip(plan.inputs, plan.weights.values) if w != 0] or plan.inputs
    return OutputSetup(sources=[(i.path, i.format) for i in plan.inputs], dtype=parse_dtype(opts.dtype),
                       shard_size=shard_size, checkpoints=[i.checkpoint for i in plan.inputs],
                       step=used[-1].step if used else None, options=opts)


def _plan(inputs: Any, output: Any, opts: MergeOptions, group: Group
          ) -> tuple[MergePlan, list[Target], Any, MergeOptions, int | None, int]:
    """Phase 1, before any tensor data is read: the outputs, their options, the plan, the
    destinations. Returns the plan, the targets, the ``--keep-structure`` output (or None), the
    options of the first variant, the shard size and the number of the model's own tensors."""
    variants = expand_variants(opts)
    outs = output_names(output, [label for label, _v in variants], single_values(opts))
    first = variants[0][1]
    targets = [Target(o, kind_of(o, first.format)) for o in outs]
    group.check(first, targets)
    if len(outs) > 1 and first.keep_structure:
        raise OptionError("--keep-structure writes one checkpoint; give one value for "
                          f"{', '.join(variants[0][0])}, or write the several outputs without --keep-structure")
    resolve_device(group.device(first.device))
    p = build_plan(inputs, first, targets[0].dest, targets[0].kind.name, variants)
    try:
        formats = [i.format for i in p.inputs]
        targets = [Target(t.dest, kind_of(t.dest, first.format, formats)) for t in targets]  # Megatron inputs
        shard_size = None
        for t in targets:
            shard_size = check_output_options(t.dest, t.kind, first)
        n_main = len(p.tensors)
        structured = None
        if first.keep_structure and any(i.checkpoint.dequantized for i in p.inputs):
            raise OptionError("--keep-structure would keep the float8 scales beside weights averaged as float32 "
                              "(the inputs hold scaled float8 weights): write the averaged weights without it")
        if first.keep_structure:
            from .structure import prepare

            structured = prepare(p, keep_optimizer=first.keep_optimizer)
            p = structured.plan
        paths = [i.path for i in p.inputs] + [f.path for i in p.inputs for f in i.checkpoint.files]
        for t in targets:
            check_not_input(t.dest, paths)  # every output of a template, and every file of an input folder
            t.mode = t.kind.check_destination(t.dest)  # refuse a folder of other files before reading any data
            t.kind.check_entries(t.dest, p.entries())
    except BaseException:
        close_inputs(p)
        raise
    return p, targets, structured, first, shard_size, n_main


def merge_into(inputs: Any, output: Any, opts: MergeOptions, group: Group,
               bn_overrides: dict[str, Any] | None = None) -> MergeReport:
    """Average ``inputs`` into ``output`` (one path, or a template naming several outputs) with
    ``group``'s members; returns the :class:`~ckptavg.outputs.MergeReport`. ``bn_overrides``: the
    ``device``/``max_batches`` given to ``ckptavg bn`` over the spec's own.

    Example::

        report = merge_into(["a.pt", "b.pt"], "avg.pt", MergeOptions(), OneProcess())
    """
    t0 = time.perf_counter()
    p: MergePlan | None = None
    targets: list[Target] = []
    writers: list[Writer] = []
    try:
        err: BaseException | None = None
        spec = structured = shard_size = None
        n_main = 0
        try:
            p, targets, structured, opts, shard_size, n_main = _plan(inputs, output, opts, group)
            if opts.bn_spec is not None and not opts.dry_run:
                from .bn import load_spec

                spec = load_spec(opts.bn_spec)
        except Exception as e:
            err = e
        group.prepare([] if opts.dry_run else targets, err, p)
        assert p is not None
        extra: dict[str, Any] = {}
        if structured is not None:
            extra = {"structure_of": os.fspath(structured.base), "averaged_weight_sets": structured.averaged,
                     "dropped": structured.dropped, "output_notes": structured.summary_notes()}
        if len(targets) > 1:
            extra["outputs"] = [os.fspath(t.dest) for t in targets]
        if opts.dry_run:
            if structured is not None:
                p.notes.extend(structured.summary_notes())
            extra.update(group.report([]))
            return MergeReport(plan=p, output=targets[0].dest, dry_run=True, seconds=time.perf_counter() - t0,
                               extra=extra)
        from .adapters import is_adapter_plan, write_adapter_average

        if is_adapter_plan(p) and not opts.lora_factors:
            if group.world > 1 or len(targets) > 1 or spec is not None:
                raise OptionError("averaging PEFT adapters runs in one process, with one output and no --bn-spec")
            if p.inputs[0].format == "kohya":  # kohya LoRA files: one file of the same kind
                if opts.lora_merge_into is not None:
                    raise OptionError("--lora-merge-into applies to PEFT adapter folders, not kohya LoRA files")
                from .kohya import write_kohya_average

                extra.update(write_kohya_average(p, targets[0].dest, opts.lora_rank))
            elif opts.lora_merge_into is not None:  # full weights: the base plus the averaged update
                from .lora_merge import write_merged_base

                extra.update(write_merged_base(p, targets[0].dest, opts))
            else:
                extra.update(write_adapter_average(p, targets[0].dest, targets[0].kind, targets[0].mode,
                                                   opts.lora_rank))
            return MergeReport(plan=p, output=targets[0].dest, bytes_written=extra.pop("bytes_written"),
                               seconds=time.perf_counter() - t0, extra=extra)
        if opts.lora_rank is not None or opts.lora_merge_into is not None:
            raise OptionError(f"{'--lora-rank' if opts.lora_rank is not None else '--lora-merge-into'} applies to "
                              "PEFT adapter folders (adapter_config.json beside the weights)")
        setup = _setup(p, opts, shard_size)
        passes = list(zip(targets, p.variants or [p.weights]))
        # BatchNorm runs the model per output: one pass each (the averages themselves are cheap)
        rounds = [passes] if spec is None else [[x] for x in passes]
        read = written = 0
        bn_reports: list[Any] = []
        for round_ in rounds:
            def open_writers(round_: list[tuple[Target, Any]] = round_) -> list[Writer]:
                for t, w in round_:
                    writers.append(structured.writer(t.dest) if structured is not None else
                                   group.open(t, p.entries(), replace(p, weights=w).provenance(), setup))
                return writers[-len(round_):]

            r, w_, bn = _stream(p, open_writers, [w for _t, w in round_], opts, group, spec, bn_overrides, n_main)
            read += r
            written += w_
            bn_reports.append(bn)
        extra.update(group.report(writers))
        return MergeReport(plan=p, output=targets[0].dest, bytes_written=written, bytes_read=read,
                           seconds=time.perf_counter() - t0, bn=bn_reports if len(bn_reports) > 1 else bn_reports[0],
                           extra=extra)
    except BaseException:
        group.abandon(writers)
        raise
    finally:
        close_inputs(p)


def _stream(p: MergePlan, open_writers: Callable[[], list[Writer]], weights: list[Any], opts: MergeOptions,
            group: Group, spec: Any, bn_overrides: dict[str, Any] | None, n_main: int) -> tuple[int, int, Any]:
    """Phases 2 and 3 for one pass over the inputs: open the writers, average this member's share
    into them (through the BatchNorm recalibration when ``spec`` is given), then agree and publish."""
    writers: list[Writer] = []
    bn_report = None
    read = 0
    err: BaseException | None = None
    try:
        mine, chunk = group.share(p)
        writers = open_writers()
        if spec is None:
            sub = _restrict(p, mine) if len(mine) != len(p.tensors) else p
            stats = run(sub, writers, weights=weights if len(weights) > 1 else None, device=group.device(opts.device),
                        progress=opts.progress and group.rank == 0, allow_nonfinite=opts.allow_nonfinite,
                        chunk_elems=chunk, cancel=group.stopping)
        else:
            stats, bn_report = _recalibrated(p, writers[0], mine, opts, group, spec, bn_overrides, n_main, chunk)
        read = stats.bytes_read
        check_unchanged(p)
    except Exception as e:
        if getattr(e, "ckptavg_agreed", False):
            raise  # every member knows already (a collective inside the recalibration)
        err = e
    read, written = group.publish(writers, err, read)
    return read, written, bn_report


def check_unchanged(p: MergePlan) -> None:
    """Before anything is published: refuse when an input was rewritten or replaced since it was
    planned (training overwriting ``last.pt`` or re-saving a step mid-merge), since what was read
    may mix old and new bytes.

    Example::

        check_unchanged(plan)  # raises CheckpointReadError naming the file
    """
    for i in p.inputs:
        for f in i.checkpoint.files:
            if f.changed():
                raise CheckpointReadError(
                    f"{f.path}: changed while the merge read it (its size, times or identity differ from when the "
                    "merge was planned); nothing was written: run the merge again once the file is complete")


def _restrict(p: MergePlan, mine: Sequence[int]) -> MergePlan:
    """The plan of ``mine``'s tensors only, alias indices renumbered (an alias and its source are
    always in the same share)."""
    pos = {g: j for j, g in enumerate(mine)}
    sub = []
    for g in mine:
        src = p.tensors[g].alias_of
        sub.append(replace(p.tensors[g], alias_of=None if src is None else pos[src]))
    return replace(p, tensors=sub)


def _recalibrated(p: MergePlan, writer: Writer, mine: Sequence[int], opts: MergeOptions, group: Group, spec: Any,
                  bn_overrides: dict[str, Any] | None, n_main: int, chunk: int | None) -> tuple[EngineStats, Any]:
    """Average the whole model in memory, recalibrate its BatchNorm statistics (the data pass split
    across the group's members), and feed this member's share of the result to ``writer``."""
    from .bn import recalibrate_state_dict

    entries = p.entries()
    mem = MemoryWriter(entries)
    stats = run(p, mem, device=group.device(opts.device), progress=opts.progress and group.rank == 0,
                allow_nonfinite=opts.allow_nonfinite, chunk_elems=chunk, cancel=group.stopping)
    mem.commit()
    group.agree(None)  # every member has the model before the recalibration's collectives
    # the model's own weights are the first n_main entries (keep-structure appends other weight sets)
    main = {e.name: mem.result[e.name] for e in entries[:n_main]}
    over = {"device": None, **(bn_overrides or {})}
    new, bn_report = recalibrate_state_dict(main, spec, mode=opts.bn_mode, progress=opts.progress and group.rank == 0,
                                            ranks=group if group.world > 1 else None, **over)
    if hasattr(writer, "annotate"):
        writer.annotate({"ckptavg_bn": bn_provenance(bn_report)})
    result = {**mem.result, **new}
    feed(writer, [result[entries[g].name] for g in mine if entries[g].alias_of is None])
    return stats, bn_report


def write_state(state_dict: Mapping[str, torch.Tensor], dest: Path, metadata: Mapping[str, str],
                group: Group | None = None, setup: OutputSetup | None = None) -> tuple[Writer, int]:
    """Write a model already in memory through the same writers and commit (one process); returns
    the writer (for its report) and the bytes written. ``setup``: the inputs a folder output copies
    its config files from and takes its file names after.

    Example::

        write_state({"w": torch.ones(2)}, Path("soup.safetensors"), {"ckptavg_version": "2"})
    """
    group = group or OneProcess()
    target = Target(dest, kind_of(dest))
    target.mode = target.kind.check_destination(dest)
    entries, tensors = state_dict_entries(state_dict, dest)
    target.kind.check_entries(dest, entries)
    writer = group.open(target, entries, metadata, setup or OutputSetup())
    try:
        feed(writer, tensors)
        _read, written = group.publish([writer], None, 0)
    except BaseException:
        group.abandon([writer])
        raise
    return writer, written


def bn_provenance(report: Any) -> str:
    """What an output records of its BatchNorm recalibration (``ckptavg_bn`` metadata).

    Example::

        bn_provenance(report)  # '{"mode": "precise", "layers": 3, "batches": 10, "samples": 640}'
    """
    return json.dumps({"mode": report.mode, "layers": len(report.layers), "batches": report.batches,
                       "samples": report.samples})

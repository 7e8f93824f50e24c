"""What a merge writes and reports: the output names (one path, or a template naming several),
the checks of the output options against the output kind (before anything is read) and
:class:`MergeReport`. Used by the one merge driver (:mod:`ckptavg.pipeline`)."""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionError
from .io.kinds import OutputKind
from .io.urls import as_path
from .options import BN_MODES, MergeOptions
from .plans import MergePlan
from .units import human_bytes, human_seconds

__all__ = ["MergeReport", "check_output_options", "output_names"]


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

    @property
    def amplification(self) -> float:
        """``sum_i |w_i|`` of the (first) weight vector: 1 for non-negative weights; how much the inputs'
        rounding errors can be multiplied in the result (post-hoc EMA from similar profiles)."""
        return self.plan.weights.amplification

    def summary(self) -> str:
        """One line for the end of a run."""
        n = len(self.plan.inputs)
        if not self.plan.variants:  # the inputs given no weight (snapshots after --at's step) are not used
            n = sum(w != 0 for w in self.weights) or n
        what = f"{n} checkpoint{'s' if n != 1 else ''} ({self.plan.method})"
        if self.dry_run:
            return f"dry run: would average {what} into {self.output}; no tensor data read"
        size, took = human_bytes(self.bytes_written), human_seconds(self.seconds)
        outs = self.extra.get("outputs")
        where = f"{len(outs)} outputs ({', '.join(outs)})" if outs else str(self.output)
        line = f"wrote {where}: {what}, {len(self.plan.tensors)} tensors, {size} in {took}"
        for bn in self.bn if isinstance(self.bn, list) else [self.bn] if self.bn is not None else []:
            line += f"; {bn.summary()}"
        for note in self.extra.get("output_notes", []):
            line += f"; {note}"
        return line

    def to_dict(self) -> dict[str, Any]:
        d = self.plan.to_dict()
        d.update(bytes_written=self.bytes_written, bytes_read=self.bytes_read, seconds=round(self.seconds, 3),
                 dry_run=self.dry_run)
        d.update(self.extra)  # folder output / keep-structure details
        for v, out in zip(d.get("variants", []), d.get("outputs", [])):
            v["output"] = out  # which output each variant is
        return d


def check_output_options(out: Path, kind: OutputKind, opts: MergeOptions) -> int | None:
    """Validate the output options together (before anything is read); returns the shard size
    (None for kinds without shards)."""
    from .units import parse_size

    if opts.keep_optimizer and not opts.keep_structure:
        raise OptionError("--keep-optimizer only applies with --keep-structure")
    if opts.keep_structure and "keep_structure" not in kind.options:
        raise OptionError(
            f"{out}: --keep-structure writes a torch checkpoint like its inputs: give an output ending in "
            ".ckpt/.pt/.pth/.bin"
        )
    if opts.shard_size is not None and "shard_size" not in kind.options:
        raise OptionError(f"{out}: --shard-size applies to folder output (-o DIR/), not to a single file")
    for name, flag in (("extra_state_from", "--extra-state-from"), ("output_step", "--output-step")):
        if getattr(opts, name) is not None and name not in kind.options:
            raise OptionError(f"{out}: {flag} applies to a Megatron checkpoint output (Megatron inputs and -o DIR/, "
                              "or --format megatron)")
    if opts.bn_mode not in BN_MODES:
        raise OptionError(f"--bn-mode must be precise or torch, got {opts.bn_mode!r}")
    return parse_size(opts.shard_size) if "shard_size" in kind.options else None


def output_names(output: str | os.PathLike[str], labels: list[dict[str, str]],
                 given: dict[str, str] | None = None) -> list[Path]:
    """One output path per variant, from an output-name template (``ema-{sigma_rel}.safetensors``);
    ``given``: the options given one value, which a template may name too (``-o 'ema-{sigma_rel}.pt'``
    with one ``--sigma-rel`` names the file after it, never literally with braces).

    Example::

        output_names("e-{decay}.pt", [{"decay": "0.5"}, {"decay": "0.9"}])  # [Path('e-0.5.pt'), Path('e-0.9.pt')]
    """
    text = os.fspath(output)
    if len(labels) == 1:
        if "{" not in text and "}" not in text:
            return [as_path(text)]
        label = {**(given or {}), **labels[0]}
        return [as_path(_render(text, label, ", ".join(label) or "no option"))]
    swept = ", ".join(labels[0])
    if "{" not in text:
        raise OptionError(
            f"{text}: {len(labels)} outputs ({swept} given several values) need an output name template, "
            f"e.g. -o 'avg-{{{next(iter(labels[0]))}}}.safetensors'"
        )
    names = [_render(text, {**(given or {}), **label}, swept) for label in labels]
    if len(set(names)) != len(names):
        raise OptionError(f"{text}: the template gives the same name to two outputs; name every option given "
                          f"several values ({swept})")
    return [as_path(n) for n in names]


#: an output-name template field may have a format spec of at most this width (a file name's length limit)
MAX_TEMPLATE_WIDTH = 255
_SPEC_RE = re.compile(r"(?:.?[<>^=])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.\d+)?[bcdeEfFgGnosxX%]?")


def _render(text: str, label: dict[str, str], swept: str) -> str:
    """``text`` with each ``{name}`` (or ``{name:spec}``, width at most :data:`MAX_TEMPLATE_WIDTH`) replaced by
    ``label[name]``. Attribute and index lookups (``{last.x}``, ``{last[0]}``), conversions (``!r``), nested
    fields and huge widths are one-line :class:`OptionError` s, checked before any string is built."""
    def bad(why: str) -> OptionError:
        shown = text if len(text) <= 200 else text[:200] + "..."
        return OptionError(f"{shown}: invalid output name template: {why}")

    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:  # unmatched braces
        raise bad(f"{e} (write {{{{ and }}}} for literal braces)") from None
    out: list[str] = []
    for literal, field_name, raw_spec, conversion in parts:
        out.append(literal)
        if field_name is None:
            continue
        spec = raw_spec or ""
        shown = repr(field_name[:40])
        if field_name not in label:
            plain = field_name.isidentifier()
            raise bad(f"the field {shown} is not among the options given several values ({swept})"
                      + ("" if plain else "; fields are plain option names, without attributes or indexes"))
        if conversion is not None:
            raise bad(f"the field {shown} has a conversion (!{conversion}); write {{{field_name}}}")
        m = _SPEC_RE.fullmatch(spec)
        if m is None or (m.group(1) and (len(m.group(1)) > 4 or int(m.group(1)) > MAX_TEMPLATE_WIDTH)):
            raise bad(f"the field {shown} has the format spec {spec[:40]!r}; give a plain field or a width of at "
                      f"most {MAX_TEMPLATE_WIDTH}")
        try:
            out.append(format(label[field_name], spec))
        except ValueError as e:
            raise bad(f"the field {shown} cannot be formatted with {spec[:40]!r} ({e})") from None
    return "".join(out)

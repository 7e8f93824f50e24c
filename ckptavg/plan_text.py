"""The dry-run text of a plan (``ckptavg merge --dry-run``): method, order, selection, one row
per input with its weight(s), the tensors, the reads and the output."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .units import fmt_epoch, fmt_value, human_bytes

if TYPE_CHECKING:
    from .plans import MergePlan
    from .weights import Weights

__all__ = ["format_plan"]


def format_plan(plan: MergePlan) -> str:
    """The human-readable plan printed by ``--dry-run``.

    Example::

        print(format_plan(ckptavg.plan("runs/", last=3)))
    """
    many = plan.variants or []
    if len(many) > 1:
        labels = plan.variant_labels or [{} for _ in many]
        lines = [f"outputs:   {len(many)} from one pass"] + [
            f"  w{m + 1}: {' '.join(f'{k}={v}' for k, v in lab.items())}: {w.description}{_amplified(w)}"
            for m, (lab, w) in enumerate(zip(labels, many))]
    else:
        lines = [f"method:    {plan.weights.description}"]
        if _amplified(plan.weights):
            lines.append(f"amplification: {plan.weights.amplification:.4g} (sum of |weights|: the inputs' rounding "
                         "errors reach the result multiplied by up to this)")
    lines += [
        f"order:     {plan.order_rule}",
        f"selection: {plan.selection} -> {len(plan.inputs)} of {plan.candidates} checkpoints",
    ]
    metric = plan.options.metric
    snaps = any(i.sigma_rel is not None for i in plan.inputs)
    wcols = "".join(f"  {'w' + str(m + 1):>10}" for m in range(len(many))) if len(many) > 1 else f"  {'weight':>10}"
    head = f"  {'#':>3}  {'epoch':>6}  {'step':>9}{wcols}"
    if snaps:
        head += f"  {'sigma_rel':>9}"
    if metric:
        head += f"  {metric:>10}"
    lines.append(head + "  file")
    for k, i in enumerate(plan.inputs, 1):
        ws = "".join(f"  {v.values[k - 1]:>10.6f}" for v in many) if len(many) > 1 else f"  {i.weight:>10.6f}"
        row = f"  {k:>3}  {fmt_epoch(i.epoch):>6}  {fmt_value(i.step):>9}{ws}"
        if snaps:
            row += f"  {fmt_value(i.sigma_rel):>9}"
        if metric:
            row += f"  {fmt_value(i.metrics.get(metric)):>10}"
        where = f" [{i.weights_key}]" if i.weights_key else ""
        lines.append(row + f"  {i.path}{where}")
    n_avg = sum(t.kind == "average" for t in plan.tensors)
    n_copy = sum(t.kind == "copy" for t in plan.tensors)
    n_tied = sum(t.alias_of is not None for t in plan.tensors)
    dts = sorted({str(t.out_dtype).removeprefix("torch.") for t in plan.tensors if t.kind == "average"})
    acc = sorted({str(t.acc_dtype).removeprefix("torch.") for t in plan.tensors if t.acc_dtype})
    lines.append(
        f"tensors:   {len(plan.tensors)} ({n_avg} averaged as {'/'.join(dts) or '-'} with "
        f"{'/'.join(acc) or '-'} accumulation, {n_copy} integer/bool copied from the last checkpoint"
        + (f", {n_tied} tied" if n_tied else "")
        + ")"
    )
    largest = human_bytes(plan.largest_tensor_bytes)
    lines.append(f"reads:     {human_bytes(plan.read_bytes)}; largest tensor {largest}")
    if plan.output is not None:
        lines.append(f"output:    {plan.output} ({plan.output_format}, {human_bytes(plan.output_bytes)})")
    for n in plan.notes:
        lines.append(f"note:      {n}")
    return "\n".join(lines)


def _amplified(w: Weights) -> str:
    """`` (amplification A)`` for a post-hoc EMA fit or weights with negative values, else empty."""
    if w.fit_error is None and min(w.values, default=0.0) >= 0:
        return ""
    return f" (amplification {w.amplification:.4g})"

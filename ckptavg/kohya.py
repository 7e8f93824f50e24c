"""kohya-ss / musubi-tuner LoRA files, averaged exactly in the space of their updates.

A kohya LoRA file (``.safetensors``, as sd-scripts, musubi-tuner and OneTrainer write them) holds,
for each adapted module ``m``, ``m.lora_down.weight`` (``r x in``, or ``r x in x k x k`` for a
convolution), ``m.lora_up.weight`` (``out x r``, or ``out x r x 1 x 1``) and ``m.alpha`` (a
scalar; the update is ``alpha / r * up @ down``, ``alpha = r`` when absent). As for PEFT adapters
(:mod:`ckptavg.adapters`), the weighted mean of the updates is written exactly as one LoRA of rank
``sum_i r_i`` per module: ``down = [down_1; ...; down_N]``, ``up = [w_1 s_1 up_1, ..., w_N s_N
up_N]``, ``alpha = rank`` (scaling 1); ``--lora-rank R`` factors it to rank ``R`` by a truncated SVD.
A file whose every tensor is such a factor or alpha is one (format ``"kohya"``); DoRA
(``dora_scale``) and files adapting different modules are refused.

Example::

    ckptavg merge lora-epoch-*.safetensors -o lora-avg.safetensors
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from .errors import OptionError

__all__ = ["is_kohya_names", "average_kohya", "write_kohya_average"]

_KOHYA_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def is_kohya_names(names: Sequence[str]) -> bool:
    """Whether a file's tensor names are those of a kohya LoRA (factors and alphas only, a pair at least)."""
    parts = [_KOHYA_RE.match(n) for n in names]
    return bool(names) and all(parts) and any(m.group("part") == "lora_down.weight" for m in parts if m)


def _modules(sd: dict[str, torch.Tensor], where: Any) -> dict[str, dict[str, str]]:
    mods: dict[str, dict[str, str]] = {}
    for name in sd:
        m = _KOHYA_RE.match(name)
        if m is None:
            raise OptionError(f"{where}: tensor {name!r} is not a kohya LoRA factor or alpha")
        mods.setdefault(m.group("mod"), {})[m.group("part").split(".")[0]] = name
    for mod, parts in mods.items():
        if not {"lora_down", "lora_up"} <= set(parts):
            raise OptionError(f"{where}: LoRA module {mod!r} lacks its "
                              f"{'lora_up' if 'lora_down' in parts else 'lora_down'} factor")
    return mods


def _scale(sd: dict[str, torch.Tensor], parts: dict[str, str], rank: int) -> float:
    if "alpha" not in parts:
        return 1.0
    return float(sd[parts["alpha"]].reshape(-1)[0]) / rank


def average_kohya(state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], paths: Sequence[Any],
                  lora_rank: int | None = None) -> tuple[dict[str, torch.Tensor], float | None]:
    """The kohya LoRA whose update is ``sum_i weights[i] * update_i`` (see the module docstring) and,
    with ``lora_rank``, the largest relative error of the rank-``lora_rank`` factoring."""
    from .adapters import _truncate

    used = [(sd, w, p) for sd, w, p in zip(state_dicts, weights, paths) if w != 0]
    mods = _modules(used[0][0], used[0][2])
    for sd, _w, p in used[1:]:
        if sorted(_modules(sd, p)) != sorted(mods):
            raise OptionError(f"{p}: adapts other modules than {used[0][2]}; the exact average needs LoRAs of the "
                              "same modules")
    out: dict[str, torch.Tensor] = {}
    worst: float | None = None
    for mod, parts in mods.items():
        downs, ups = [], []
        for sd, w, _p in used:
            down, up = sd[parts["lora_down"]], sd[parts["lora_up"]]
            r = down.shape[0]
            downs.append(down.double().reshape(r, -1))
            ups.append(up.double().reshape(up.shape[0], r) * (w * _scale(sd, parts, r)))
        a, b = torch.cat(downs, 0), torch.cat(ups, 1)
        if lora_rank is not None and lora_rank < a.shape[0]:
            a, b, err = _truncate(a, b, lora_rank)
            worst = err if worst is None else max(worst, err)
        last = used[-1][0]
        down0, up0 = last[parts["lora_down"]], last[parts["lora_up"]]
        rank = a.shape[0]
        out[parts["lora_down"]] = a.reshape(rank, *down0.shape[1:]).to(down0.dtype).contiguous()
        out[parts["lora_up"]] = b.reshape(up0.shape[0], rank, *up0.shape[2:]).to(up0.dtype).contiguous()
        alpha_dtype = last[parts["alpha"]].dtype if "alpha" in parts else torch.float32
        out[f"{mod}.alpha"] = torch.tensor(float(rank), dtype=alpha_dtype)
    return out, worst


def write_kohya_average(plan: Any, dest: Any, lora_rank: int | None) -> dict[str, Any]:
    """Average the plan's kohya LoRA files exactly and write the result to ``dest`` (a file, usually
    ``.safetensors``); returns the report's extra fields, ``bytes_written`` among them."""
    from .adapters import average_adapter_plan
    from .pipeline import write_state

    out, _cfg, err = average_adapter_plan(plan, lora_rank)
    meta = dict(plan.provenance())
    if err is not None:
        meta["ckptavg_lora_rank_error"] = f"{err:.6g}"
    _w, written = write_state(out, dest, meta)
    ranks = sorted({int(t.shape[0]) for n, t in out.items() if n.endswith(".lora_down.weight")})
    note = (f"exact LoRA average: rank {', '.join(map(str, ranks))} (the inputs' factors concatenated)" if err is None
            else f"LoRA average factored to rank {lora_rank}: relative error up to {err:.3g}")
    extra: dict[str, Any] = {"output_notes": [note], "bytes_written": written, "lora_rank": ranks[-1] if ranks else 0}
    if err is not None:
        extra["lora_rank_error"] = err
    return extra

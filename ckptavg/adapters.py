"""PEFT LoRA adapters, averaged exactly in the space of their updates.

A PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) is one checkpoint.
Each adapted module ``m`` of adapter ``i`` adds the update ``D_i = s_i B_i A_i`` to its base
weight (``A_i``: ``r_i x in``, ``B_i``: ``out x r_i``, scaling ``s_i = lora_alpha / r`` or
``lora_alpha / sqrt(r)`` with ``use_rslora``). Averaging ``A`` and ``B`` separately gives
``mean(B) mean(A)``, which is not ``mean(B A)``. Here the weighted mean of the updates,
``D = sum_i w_i D_i``, is written exactly as one adapter of rank ``sum_i r_i`` by concatenating the
factors: ``A = [A_1; ...; A_N]`` and ``B = [w_1 s_1 B_1, ..., w_N s_N B_N]``, with
``lora_alpha = r`` (scaling 1), which PEFT loads as any adapter. ``lora_rank`` factors ``D`` back to
a rank of one's choice by a truncated SVD (computed from the factors through two QR
decompositions, in float64, never forming ``D``), and the report gives the largest relative
(Frobenius) error over the modules. Tensors that are not LoRA factors (``modules_to_save``, biases)
are averaged with the same weights.

Adapters are small (megabytes), so this runs in memory. Per-module ``rank_pattern``/``alpha_pattern``
are resolved as PEFT resolves them (each module's rank is its factors'); the output names the modules
whose rank differs from its ``r`` in its own patterns. DoRA magnitudes and inputs adapting different
modules are refused with a one-line error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointReadError, OptionError
from .guards import lora_averaged_exactly
from .io.files import read_small_json

__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILES", "is_adapter_folder", "adapter_config", "average_adapters",
           "open_adapter_folder", "is_adapter_plan", "average_adapter_plan", "write_adapter_average"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_FACTOR_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B|embedding_A|embedding_B)(?:\.(?P<adapter>[^.]+))?"
                        r"(?P<suffix>\.weight)?$")


def is_adapter_folder(path: Path) -> bool:
    """A folder holding a PEFT adapter: ``adapter_config.json`` and its weights."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and any((path / n).is_file() for n in ADAPTER_FILES)


def adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` (a LoRA one), checked for what the exact average needs."""
    f = folder / ADAPTER_CONFIG
    try:
        cfg = read_small_json(f, 1 << 20)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointReadError(f"{f}: invalid adapter config: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointReadError(f"{f}: invalid adapter config: not a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointReadError(f"{f}: a {cfg.get('peft_type')} adapter; ckptavg averages LoRA adapters")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)) and alpha > 0):
        raise CheckpointReadError(f"{f}: invalid adapter config: r and lora_alpha must be positive numbers")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in pat.values()):
            raise CheckpointReadError(f"{f}: invalid adapter config: {key} must map module patterns to positive "
                                      "numbers")
    if cfg.get("use_dora"):
        raise CheckpointReadError(f"{f}: DoRA adapters (use_dora) cannot be averaged exactly by concatenation")
    return cfg


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """A per-module value of ``rank_pattern``/``alpha_pattern`` as PEFT resolves it: the first key
    that matches the end of the module's name as a regular expression (``(.*\\.)?(KEY)$``)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def _module_name(mod: str) -> str:
    """The adapted module's name in the base model (PEFT saves it behind ``base_model.model.``)."""
    name = mod.split("#")[0]
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _scaling(cfg: dict[str, Any], mod: str, r: int) -> float:
    """The module's scaling, ``alpha / r`` (``alpha / sqrt(r)`` with rslora), ``alpha`` from ``alpha_pattern``
    and ``r`` the factors' own rank."""
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, _module_name(mod), cfg["lora_alpha"]))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _factors(sd: dict[str, torch.Tensor], where: Any) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The LoRA modules (module -> {"A": name, "B": name}) and the other tensors' names."""
    mods: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for name in sd:
        m = _FACTOR_RE.match(name)
        if m is None:
            other.append(name)
            continue
        ab = m.group("ab").replace("embedding_", "")
        mods.setdefault(m.group("mod") + ("#emb" if "embedding" in m.group("ab") else ""), {})[ab] = name
    for mod, fs in mods.items():
        if set(fs) != {"A", "B"}:
            raise CheckpointReadError(f"{where}: LoRA module {mod.split('#')[0]!r} lacks its "
                                      f"{'B' if 'A' in fs else 'A'} factor")
    return mods, other


def average_adapters(state_dicts: Sequence[dict[str, torch.Tensor]], configs: Sequence[dict[str, Any]],
                     weights: Sequence[float], paths: Sequence[Any], lora_rank: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], float | None]:
    """The adapter whose update is ``sum_i weights[i] * update_i`` (see the module docstring), its
    config, and with ``lora_rank`` the largest relative error of the rank-``lora_rank`` factoring.

    Example::

        sd, cfg, err = average_adapters([sd1, sd2], [cfg1, cfg2], [0.5, 0.5], ["a1", "a2"])
    """
    used = [(sd, cfg, w, p) for sd, cfg, w, p in zip(state_dicts, configs, weights, paths) if w != 0]
    layout = None
    for sd, _cfg, _w, p in used:
        mods, other = _factors(sd, p)
        here = (sorted(mods), sorted(other))
        if layout is None:
            layout = here
        elif here != layout:
            raise OptionError(f"{p}: adapts other modules (or holds other tensors) than {used[0][3]}; the exact "
                                 "average needs adapters of the same modules")
    assert layout is not None
    mod_names = _factors(used[0][0], used[0][3])[0]
    out: dict[str, torch.Tensor] = {}
    worst: float | None = None
    ranks: dict[str, int] = {}  # the output's rank per adapted module (its alpha is the same: scaling 1)
    for mod, names in mod_names.items():
        a_list = [sd[names["A"]].double() for sd, _c, _w, _p in used]
        b_list = [sd[names["B"]].double() * (w * _scaling(c, mod, sd[names["A"]].shape[0])) for sd, c, w, _p in used]
        # embeddings store A as (r x num_embeddings) and B as (dim x r), like linear layers
        a, b = torch.cat(a_list, 0), torch.cat(b_list, 1)
        if lora_rank is not None and lora_rank < a.shape[0]:
            a, b, err = _truncate(a, b, lora_rank)
            worst = err if worst is None else max(worst, err)
        dt = used[-1][0][names["A"]].dtype
        out[names["A"]], out[names["B"]] = a.to(dt).contiguous(), b.to(dt).contiguous()
        ranks[_module_name(mod)] = a.shape[0]
    for name in layout[1]:
        ref = used[-1][0][name]
        if ref.is_floating_point():
            out[name] = sum((sd[name].double() * w for sd, _c, w, _p in used), torch.zeros((), dtype=torch.float64)
                            ).to(ref.dtype)
        else:
            out[name] = ref.clone()
    rank = max(ranks.values(), default=sum(c["r"] for _sd, c, _w, _p in used))
    # modules of another rank are named in rank_pattern/alpha_pattern (escaped: PEFT reads the keys as patterns)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    cfg = dict(used[-1][1])
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    return out, cfg, worst


def _truncate(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``r`` factors of ``b @ a`` (scaling 1) and the relative Frobenius error."""
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float(torch.sum(s * s))
    err = math.sqrt(float(torch.sum(s[r:] * s[r:])) / total) if total > 0 else 0.0
    b_r = qb @ (u[:, :r] * s[:r])
    a_r = vh[:r] @ qa.T
    return a_r, b_r, err


def open_adapter_folder(folder: Path, *, key: str | None, trust_pickle: bool, open_file: Any) -> Any:
    """A PEFT adapter folder as one checkpoint (format ``"peft"``; its config in ``adapter``)."""
    if key:
        raise OptionError(f"{folder}: --key applies to single torch checkpoint files, not adapter folders")
    cfg = adapter_config(folder)
    weights = next(folder / n for n in ADAPTER_FILES if (folder / n).is_file())
    ckpt = open_file(weights, key=None, trust_pickle=trust_pickle)
    ckpt.path, ckpt.format, ckpt.adapter = folder, "peft", cfg
    return ckpt


def is_adapter_plan(plan: Any) -> bool:
    """Whether every input of a plan is a PEFT adapter folder (then :func:`write_adapter_average`), or
    every input a kohya LoRA file (:mod:`ckptavg.kohya`)."""
    return lora_averaged_exactly([i.format for i in plan.inputs])


def average_adapter_plan(plan: Any, lora_rank: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                     float | None]:
    """:func:`average_adapters` over the adapters of a plan (read whole: adapters are small)."""
    sds, cfgs = [], []
    for i in plan.inputs:
        sd = {}
        for name, ref in i.checkpoint.tensors.items():
            sd[name] = ref.materialize()
            ref.release()
        sds.append(sd)
        cfgs.append(i.checkpoint.adapter)
    if plan.inputs[0].format == "kohya":
        from .kohya import average_kohya

        out, err = average_kohya(sds, plan.weights.values, [i.path for i in plan.inputs], lora_rank)
        return out, {}, err
    return average_adapters(sds, cfgs, plan.weights.values, [i.path for i in plan.inputs], lora_rank)


def write_adapter_average(plan: Any, dest: Path, kind: Any, mode: str, lora_rank: int | None) -> dict[str, Any]:
    """Average the plan's adapters exactly and publish the adapter folder ``dest`` (its
    ``adapter_model.safetensors`` with ckptavg's provenance, and the updated ``adapter_config.json``);
    returns the report's extra fields."""
    import os
    import tempfile

    from safetensors.torch import save_file

    from .io.files import TMP_SUFFIX, make_parent, remove_created
    from .io.folders import FILES_KEY, publish_folder
    from .io.urls import is_remote

    if kind.single_file or is_remote(dest):
        raise OptionError(f"{dest}: averaging adapters writes an adapter folder: give -o DIR/ (a local folder)")
    out, cfg, err = average_adapter_plan(plan, lora_rank)
    meta = dict(plan.provenance())
    meta[FILES_KEY] = json.dumps(["adapter_model.safetensors", ADAPTER_CONFIG])
    if err is not None:
        meta["ckptavg_lora_rank_error"] = f"{err:.6g}"
    created = make_parent(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent))
    try:
        save_file(out, str(tmp / "adapter_model.safetensors"), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        publish_folder(tmp, dest, mode)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise
    size = sum(os.path.getsize(dest / n) for n in ("adapter_model.safetensors", ADAPTER_CONFIG))
    extra: dict[str, Any] = {"lora_rank": cfg["r"], "output_notes": [
        f"exact LoRA average: one adapter of rank {cfg['r']} (the inputs' factors concatenated)"
        if err is None else f"LoRA average factored to rank {cfg['r']}: relative error up to {err:.3g}"]}
    if err is not None:
        extra["lora_rank_error"] = err
    extra["bytes_written"] = size
    return extra

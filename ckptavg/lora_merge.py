"""Full weights from averaged PEFT adapters: ``--lora-merge-into BASE``.

The exact average of the adapters (:mod:`ckptavg.adapters`: one adapter of scaling 1 whose update
is the weighted mean of the inputs' updates) is added to the base model's weights:
``W = W_base + B A`` for each adapted linear layer (transposed for embeddings, whose ``A`` is
``r x num_embeddings``, and for ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``), computed in
float64 and stored in the base weight's dtype; the adapter's other tensors (``modules_to_save``)
replace the base's of the same name. The adapter's names are the base model's behind PEFT's
``base_model.model.`` prefix. The result is what ``PeftModel.merge_and_unload()`` gives for the
averaged adapter, written as any output (a file, or a folder that copies the base folder's config).

The base model is read whole into memory (its own dtype); a base whose tensors the adapter does
not match (a missing layer, another shape, convolution LoRA) is a one-line error naming both.

Example::

    ckptavg merge runs/checkpoint-*/ --lora-merge-into base/ -o merged/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import OptionError

__all__ = ["merge_into_base", "write_merged_base"]

_PEFT_PREFIX = "base_model.model."


def _base_name(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _read_base(base: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The base model's tensors, read whole, and its format."""
    from .io import open_checkpoint

    with open_checkpoint(base) as ckpt:
        out = {}
        for name, ref in ckpt.tensors.items():
            out[name] = ref.materialize()
            ref.release()
        return out, ckpt.format


def merge_into_base(adapter: dict[str, torch.Tensor], cfg: dict[str, Any], base: Path
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """The base model's state dict with the averaged adapter ``adapter`` (scaling 1, config ``cfg``)
    merged in (see the module docstring), and the base's format.

    Example::

        sd, fmt = merge_into_base(avg_adapter, avg_cfg, Path("base.safetensors"))
    """
    from .adapters import _factors

    sd, fmt = _read_base(base)
    mods, other = _factors(adapter, "the averaged adapter")
    for mod, names in mods.items():
        a, b = adapter[names["A"]].double(), adapter[names["B"]].double()
        key = _base_name(mod.split("#")[0]) + ".weight"
        if a.dim() != 2 or b.dim() != 2:
            raise OptionError(f"{base}: --lora-merge-into: the adapter's {key} is not a linear or embedding LoRA "
                              f"(factors of {a.dim()} dimensions)")
        delta = b @ a
        if mod.endswith("#emb") or cfg.get("fan_in_fan_out"):
            delta = delta.T
        w = sd.get(key)
        if w is None or tuple(w.shape) != tuple(delta.shape):
            found = "missing" if w is None else f"of shape {list(w.shape)}"
            raise OptionError(f"{base}: --lora-merge-into: the adapter changes {key} of shape {list(delta.shape)}, "
                              f"which the base model has {found}")
        sd[key] = (w.double() + delta).to(w.dtype)
    for name in other:
        key = _base_name(name)
        w = sd.get(key)
        if w is None or w.shape != adapter[name].shape:
            raise OptionError(f"{base}: --lora-merge-into: the adapter's tensor {name} has no counterpart of that "
                              "shape in the base model")
        sd[key] = adapter[name].to(w.dtype)
    return sd, fmt


def write_merged_base(plan: Any, dest: Path, opts: Any) -> dict[str, Any]:
    """Average the plan's adapters exactly, merge them into ``opts.lora_merge_into`` and write the full
    model to ``dest`` (any output kind; a folder copies the base folder's config files); returns the
    report's extra fields, ``bytes_written`` among them."""
    from .adapters import average_adapter_plan
    from .io import OutputSetup
    from .io.urls import as_path
    from .pipeline import write_state

    base = as_path(opts.lora_merge_into)
    adapter, cfg, err = average_adapter_plan(plan, opts.lora_rank)
    sd, fmt = merge_into_base(adapter, cfg, base)
    meta = {**plan.provenance(), "ckptavg_lora_merged_into": str(base)}
    _writer, written = write_state(sd, dest, meta, setup=OutputSetup(sources=[(base, fmt)]))
    notes = [f"LoRA average (rank {cfg['r']}) merged into {base}: full weights"]
    if err is not None:
        notes.append(f"factored to rank {cfg['r']} first: relative error up to {err:.3g}")
    return {"output_notes": notes, "bytes_written": written, "lora_merged_into": str(base)}

"""accelerate's checkpoint folders: ``Accelerator.save_state`` with several models, and with FSDP's
sharded state dict.

``save_state`` writes each prepared model as ``model.safetensors``, ``model_1.safetensors``...
(``pytorch_model.bin``, ``pytorch_model_1.bin`` without safetensors): such a folder is read as a
model folder, its first model, with a note naming the others (name ``CHECKPOINT/model_1.safetensors``
to average another; the number is the model's index, never a step).

``save_state`` under FSDP with ``SHARDED_STATE_DICT`` writes, into ``checkpoint-N/`` (or
``checkpoints/checkpoint_N/``), one DCP folder per model, ``pytorch_model_fsdp_0/`` (the model's
tensors under ``model.``), ``pytorch_model_fsdp_1/``..., beside ``optimizer_0/``, ``scheduler.bin``
and ``random_states_R.pkl``. Such a folder is one checkpoint: its first model, with a note when it
holds several (name ``checkpoint-N/pytorch_model_fsdp_1`` to average another: the step still comes
from ``checkpoint-N``).

Example::

    is_fsdp_checkpoint(Path("out/checkpoint-500"))  # True when out/checkpoint-500/pytorch_model_fsdp_0/.metadata exists
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import Checkpoint
from .dcp_in import is_dcp_folder, open_dcp

__all__ = ["is_fsdp_checkpoint", "open_fsdp_checkpoint", "several_models_note", "FSDP_MODEL"]

FSDP_MODEL = "pytorch_model_fsdp_{}"
_FSDP_RE = re.compile(r"^pytorch_model_fsdp_(\d+)$")
_SAVE_STATE_RE = re.compile(r"^(model|pytorch_model)_(\d+)\.(safetensors|bin)$")


def several_models_note(folder: Path, first: str) -> str | None:
    """The plan's note for a ``save_state`` folder holding more models than its first (``first``:
    the weight file read), else None."""
    try:
        others = sorted((int(m.group(2)), q.name) for q in folder.iterdir()
                        if (m := _SAVE_STATE_RE.match(q.name)) and first.startswith(m.group(1) + "."))
    except OSError:
        return None
    if not others:
        return None
    names = ", ".join(n for _k, n in others)
    return (f"accelerate checkpoints holding {len(others) + 1} models ({first}, {names}): averaging {first}; "
            f"name the file in each (CHECKPOINT/{others[0][1]}) to average another")


def is_fsdp_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is an accelerate checkpoint holding FSDP sharded model folders."""
    return not is_dcp_folder(folder) and is_dcp_folder(folder / FSDP_MODEL.format(0))


def open_fsdp_checkpoint(folder: Path, *, key: str | None, trust_pickle: bool) -> Checkpoint:
    """The first model of an accelerate FSDP checkpoint (see the module docstring)."""
    ckpt = open_dcp(folder / FSDP_MODEL.format(0), key=key, trust_pickle=trust_pickle)
    try:
        models = sorted(int(m.group(1)) for q in folder.iterdir() if (m := _FSDP_RE.match(q.name)))
    except OSError:
        models = [0]
    if len(models) > 1:
        names = ", ".join(FSDP_MODEL.format(k) for k in models)
        other = FSDP_MODEL.format(models[1])
        ckpt.notes.append(f"accelerate checkpoints holding {len(models)} models ({names}): averaging "
                          f"{FSDP_MODEL.format(0)}; name a sub-folder in each (CHECKPOINT/{other}) to average another")
    return ckpt

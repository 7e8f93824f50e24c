"""Folders that hold diffusers components: which component of them is the checkpoint.

diffusers' training scripts save each checkpoint (through accelerate's ``save_state`` hooks) as
``checkpoint-N/`` holding one folder per trained model, each a diffusers component folder
(``unet/``, ``transformer/``, ``controlnet/``..., with ``--use_ema`` also ``unet_ema/``), beside
the optimizer and RNG state; a saved pipeline (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``...) has the same shape. Such a folder is not a checkpoint itself: it *holds*
components, and one of them is the checkpoint.

Which one: the only component, else the only one that is not an EMA copy (``unet`` beside
``unet_ema``: the trained weights). Several candidates (``unet`` and ``text_encoder``) are an
error that lists them; a holder without the chosen component is an error naming it. The choice is
the same for every holder of one merge, so components are never mixed, and the plan says which
was taken. To average another one, name it: ``ckptavg merge 'out/checkpoint-*/unet_ema' ...``.

Example::

    paths, note = choose_component([Path("out/checkpoint-100"), Path("out/checkpoint-200")])
    # [out/checkpoint-100/unet, out/checkpoint-200/unet], 'averaging the unet/ folder of ...'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .errors import CheckpointReadError, OptionError
from .io import is_checkpoint_folder
from .io.hf_folder_in import is_diffusers_folder

__all__ = ["components", "is_component_holder", "choose_component"]

_EMA_RE = re.compile(r"(?:^|[_-])ema(?:$|[_-])", re.IGNORECASE)
_TRAILING_NUMBER_RE = re.compile(r"\d+$")


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted((q for q in folder.iterdir() if q.is_dir() and not q.name.startswith(".")),
                      key=lambda q: q.name)
    except OSError:
        return []


def components(folder: Path) -> list[str]:
    """The names of the sub-folders of ``folder`` that are checkpoints, when at least one of them is
    a diffusers component folder (else none): ``['unet', 'unet_ema']`` for a ``checkpoint-N/``."""
    subs = [q for q in _subfolders(folder) if is_checkpoint_folder(q)]
    return [q.name for q in subs] if any(is_diffusers_folder(q) for q in subs) else []


def is_component_holder(folder: Path) -> bool:
    """True if ``folder`` is not a checkpoint itself but holds diffusers component folders."""
    return folder.is_dir() and not is_checkpoint_folder(folder) and bool(components(folder))


def _pattern(holders: Sequence[Path]) -> str:
    """A glob naming the holders (``out/checkpoint-*``) for the hint of a message."""
    parents = {h.parent for h in holders}
    stems = {_TRAILING_NUMBER_RE.sub("*", h.name) for h in holders}
    if len(parents) == 1 and len(stems) == 1:
        return str(next(iter(parents)) / next(iter(stems)))
    return str(holders[0])


def choose_component(holders: Sequence[Path]) -> tuple[list[Path], str]:
    """The component folder of each holder that a merge averages (the same component in each),
    and a note for the plan saying which it is and how to take another. Raises
    :class:`~ckptavg.errors.OptionError` when the choice is ambiguous and
    :class:`~ckptavg.errors.CheckpointReadError` for a holder lacking the chosen component."""
    found = {h: components(h) for h in holders}
    names = sorted({n for ns in found.values() for n in ns})
    pattern = _pattern(holders)
    trained = [n for n in names if not _EMA_RE.search(n)]
    if len(names) == 1:
        chosen = names[0]
    elif len(trained) == 1:
        chosen = trained[0]
    else:
        raise OptionError(
            f"{pattern}: these folders hold several model components ({', '.join(names)}); "
            f"name the one to average, e.g. '{pattern}/{(trained or names)[0]}'"
        )
    for h, ns in found.items():
        if chosen not in ns:
            raise CheckpointReadError(
                f"{h}: holds no {chosen}/ component (it holds {', '.join(ns)}), unlike the other checkpoint folders; "
                f"name the component folders to average one by one"
            )
    others = [n for n in names if n != chosen]
    note = f"{pattern}: averaging the {chosen}/ component of each checkpoint folder"
    if others:
        note += f"; left out: {', '.join(others)} (to average it instead, name it: '{pattern}/{others[0]}')"
    return [h / chosen for h in holders], note

"""Discover: turn command-line paths, globs and folders into checkpoint sources.

A path argument is one of:

* a checkpoint file (any extension for torch files; ``.safetensors``);
* in a folder, EDM2's ``network-snapshot-<kimg>-<std>.pkl`` snapshots too (power-EMA snapshots);
* a glob pattern (``runs/*.pt``), expanded here when the shell did not;
* a **model folder** (Hugging Face layout: ``model.safetensors``, sharded
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``), which is *one* checkpoint;
* a **Megatron checkpoint root** (``latest_checkpointed_iteration.txt`` beside ``iter_*/``): its
  iteration folders, or ``release/`` when the marker says so (:mod:`ckptavg.io.megatron`);
* a **DeepSpeed checkpoint root** (``latest`` beside ``global_stepN/`` folders): its checkpoint
  folders in step order (:mod:`ckptavg.io.deepspeed_in`);
* a **folder of checkpoints**: every checkpoint file directly inside it, plus every
  sub-folder that is a model folder (e.g. ``checkpoint-500/`` of a Hugging Face
  Trainer run). Files named like aliases of another checkpoint (``last.ckpt``,
  ``checkpoint_last.pt``, ``checkpoint_best.pt``, ``model_best.pth.tar``) are skipped
  there and in glob matches (unless the pattern matches nothing else), since they
  duplicate a numbered checkpoint; the plan notes them; name them explicitly to use them.
  So are trainers' training-state files (``training_args.bin``, ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``).

A folder holding diffusers component folders (a diffusers training script's ``checkpoint-N/`` with
``unet/`` and maybe ``unet_ema/``, a saved pipeline) stands for *one* of its components, the same
for every such folder of a merge (:mod:`ckptavg.components`: the only one, else the only one that
is not an EMA copy; the plan says which). A folder of such folders (a training ``output_dir``) is a
folder of checkpoints: anything else in it (the final pipeline's own ``unet/``...) is left out with
a note. To average another component, name it: ``'out/checkpoint-*/unet_ema'``.

A model folder that also holds model sub-folders (a Hugging Face Trainer ``output_dir`` after
``save_model``: the final model beside its ``checkpoint-N/`` folders) is the folder of those
checkpoints: the final model, a copy of one of them, is left out with a note (name its weight
file to use it). Taking the whole folder for the final model alone made ``merge out/ --last 3``
write that one model as the "average".
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .components import choose_component, is_component_holder
from .errors import CheckpointReadError, OptionError
from .io import is_checkpoint_folder
from .io.deepspeed_in import checkpoints_of_deepspeed_root, is_deepspeed_root, single_tag
from .io.files import CHECKPOINT_SUFFIXES
from .io.megatron import checkpoints_of_root, is_megatron_root
from .io.snapshot_names import EDM2_NAME
from .io.urls import as_path, is_url

__all__ = ["discover", "discover_with_origin", "natural_key", "skipped_in_folders", "has_checkpoint_suffix"]

_ALIAS_RE = re.compile(r"^(?:checkpoint[_-]?|model[_-]?)?(?:last|best)(?:-v\d+)?$", re.IGNORECASE)
# training-state files that trainers (Hugging Face Trainer, accelerate) keep beside checkpoints
_TRAINING_STATE_RE = re.compile(
    r"^(?:training_args\.bin|optimizer(?:_\d+)?\.(?:pt|bin)|scheduler\.(?:pt|bin)|scaler\.(?:pt|bin)"
    r"|rng_state(?:_\d+)?\.pth|random_states_\d+\.pkl)$",
    re.IGNORECASE,
)


def _has_suffix(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in CHECKPOINT_SUFFIXES)


def _stem(name: str) -> str:
    low = name.lower()
    for s in CHECKPOINT_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def discover(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Expand ``inputs`` into checkpoint paths, in the order given.

    Returns the paths and notes about skipped files (for the plan). Raises
    :class:`~ckptavg.CkptavgError` for a path that does not exist, a pattern or folder
    that matches nothing, or the same file given twice.

    Example::

        paths, notes = discover(["runs/"])  # runs/epoch=1.ckpt ... (runs/last.ckpt skipped, noted)
    """
    paths, notes, _named = discover_with_origin(inputs)
    return paths, notes


def discover_with_origin(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str], set[Path]]:
    """:func:`discover`, plus the set of paths the user named one by one (not found through a
    folder or a glob): the planner skips files found through a folder or glob that turn out
    to be earlier ckptavg outputs, but keeps named ones.

    Example::

        paths, notes, named = discover_with_origin(["runs/*.pt", "extra.pt"])  # named == {Path("extra.pt")}
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    notes: list[str] = []
    named: set[Path] = set()
    if not inputs:
        raise OptionError("no input checkpoints given")
    for item in inputs:
        s = os.fspath(item)
        if s.lower().startswith("file://"):
            s = s[len("file://"):]  # a local path
        p = as_path(s)
        if is_url(s) and glob.has_magic(s):
            out.extend(_glob(s, notes))
        elif p.exists():
            if p.is_dir() and not is_checkpoint_folder(p) and is_megatron_root(p):
                out.extend(checkpoints_of_root(p))  # iter_* in iteration order (or release/), as Megatron sees them
            elif p.is_dir() and not is_checkpoint_folder(p) and is_deepspeed_root(p):
                out.extend(checkpoints_of_deepspeed_root(p))  # global_step* in step order, 'latest' checked
            elif p.is_dir() and not is_checkpoint_folder(p) and _holders_in(p, out, notes):
                pass  # a diffusers training output: its checkpoint-N/ folders (components chosen below)
            elif p.is_dir() and is_component_holder(p):
                out.append(p)  # one of its components: chosen below
                named.add(p)
            elif p.is_dir() and not is_checkpoint_folder(p):
                found, skipped = _scan_folder(p)
                if not found:
                    raise CheckpointReadError(
                        f"{p}: folder holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) "
                        "and is not a model folder"
                    )
                if skipped:
                    notes.append(_skipped_note(str(p), [p / n for n in skipped]))
                out.extend(found)
            else:
                subs = _model_subfolders(p) if p.is_dir() and single_tag(p) is None else []
                if subs:
                    # a Trainer's output_dir after save_model: the final model (a copy of one of its
                    # checkpoints) beside checkpoint-N/ folders: the run's checkpoints are what it holds
                    notes.append(
                        f"{p}: holds checkpoint folders ({', '.join(subs[:3])}{', ...' if len(subs) > 3 else ''}) "
                        "and a final model beside them: averaging the checkpoint folders; the final model is left "
                        "out (the Trainer saves a copy of a checkpoint there); to use it, name its weight file")
                    out.extend(p / s for s in subs)
                else:
                    out.append(p)
                    named.add(p)
        elif glob.has_magic(s):
            out.extend(_glob(s, notes))
        else:
            raise CheckpointReadError(f"{p}: no such file or folder")
    out = _resolve_holders(out, notes, named)
    _check_duplicates(out)
    return out, notes, named


def _holders_in(folder: Path, out: list[Path], notes: list[str]) -> bool:
    """A training output folder whose sub-folders hold diffusers components (``checkpoint-N/unet/``):
    add those sub-folders to ``out`` (their component is chosen later), leave out anything else in
    it with a note, and return True; False if it has no such sub-folder."""
    try:
        subs = sorted((q for q in folder.iterdir() if q.is_dir() and not q.name.startswith(".")),
                      key=lambda q: natural_key(q.name))
    except OSError:
        return False
    holders = [q for q in subs if is_component_holder(q)]
    if not holders:
        return False
    found, _skipped = _scan_folder(folder)
    if found:
        names = ", ".join(q.name for q in found[:3]) + (", ..." if len(found) > 3 else "")
        notes.append(f"{folder}: holds checkpoint folders with model components ({holders[0].name}, ...): averaging "
                     f"those; left out: {names} (a final model beside them); to use it, name it")
    out.extend(holders)
    return True


def _resolve_holders(paths: list[Path], notes: list[str], named: set[Path]) -> list[Path]:
    """Replace every folder that holds diffusers components by its chosen component folder."""
    holders = [q for q in paths if q.is_dir() and not is_checkpoint_folder(q)]
    if not holders:
        return paths
    chosen, note = choose_component(holders)
    notes.append(note)
    by_holder = dict(zip(holders, chosen))
    for h in holders:
        if h in named:
            named.discard(h)
            named.add(by_holder[h])
    return [by_holder.get(q, q) for q in paths]


def _glob(pattern: str, notes: list[str]) -> list[Path]:
    """The checkpoints a pattern matches (local, or a URL's objects and folders), in natural order."""
    if is_url(pattern):
        base = as_path(pattern.split("://", 1)[0] + "://")
        found: list[Path] = list(base.glob_url(pattern))  # type: ignore[attr-defined]
    else:
        found = [Path(m) for m in glob.glob(pattern)]
    matches = sorted(found, key=lambda q: natural_key(str(q)))
    matches = [m for m in matches if m.is_file() or is_checkpoint_folder(m) or is_component_holder(m)]
    if not matches:
        raise CheckpointReadError(f"{pattern}: no files match this pattern")
    # as in folders: aliases (last.ckpt...) and training-state files are skipped, unless
    # the pattern matches nothing else (then the user asked for exactly those)
    kept = [m for m in matches if not (m.is_file() and _skippable(m.name))]
    if kept and len(kept) < len(matches):
        notes.append(_skipped_note(pattern, [m for m in matches if m not in kept]))
        matches = kept
    return matches


def _skippable(name: str) -> bool:
    return bool(_ALIAS_RE.match(_stem(name)) or _TRAINING_STATE_RE.match(name))


def skipped_in_folders(name: str) -> bool:
    """Whether a file of this name found in a folder or glob is left out (an alias such as
    ``last.ckpt``, or a trainer's training-state file); ``ckptavg watch`` follows the same rule."""
    return _skippable(name)


def has_checkpoint_suffix(name: str) -> bool:
    """Whether a file name ends like a checkpoint file (what a folder scan picks up)."""
    return _has_suffix(name)


def _skipped_note(source: str, skipped: list[Path]) -> str:
    names = ", ".join(q.name for q in skipped)
    return (f"{source}: skipped {names} (aliases such as last.ckpt copy or link a numbered checkpoint, which "
            f"would then count twice; or training state); to include one on purpose, name it: {skipped[0]}")


def _scan_folder(folder: Path) -> tuple[list[Path], list[str]]:
    found: list[Path] = []
    skipped: list[str] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda q: natural_key(q.name))
    except OSError as e:
        raise CheckpointReadError(f"{folder}: cannot list folder: {e.strerror}") from None
    for q in entries:
        if q.name.startswith("."):
            continue
        if q.is_file() and (_has_suffix(q.name) or EDM2_NAME.match(q.name)):
            if _skippable(q.name):
                skipped.append(q.name)
            else:
                found.append(q)
        elif q.is_dir() and is_checkpoint_folder(q):
            found.append(q)
    return found, skipped


def _model_subfolders(folder: Path) -> list[str]:
    try:
        return sorted((q.name for q in folder.iterdir() if q.is_dir() and is_checkpoint_folder(q)), key=natural_key)
    except OSError:
        return []


def _check_duplicates(paths: Iterable[Path]) -> None:
    seen: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        k = (st.st_dev, st.st_ino)
        if k in seen:
            link = next((q for q in (p, seen[k]) if q.is_symlink()), None)
            hint = (f": {link} is a link to {link.resolve()}; leave it out (a folder or glob input skips alias "
                    "names such as last.ckpt)") if link is not None else ""
            raise OptionError(f"{p}: given twice (also as {seen[k]}); each checkpoint may appear once{hint}")
        seen[k] = p


_NUM_SPLIT = re.compile(r"(\d+)")


def natural_key(s: str) -> tuple:
    """Sort key that orders ``ckpt2`` before ``ckpt10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in _NUM_SPLIT.split(str(s)) if t)

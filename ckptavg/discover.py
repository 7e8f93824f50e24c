"""Discover: turn command-line paths, globs and folders into checkpoint sources.

A path argument is one of:

* a checkpoint file (any extension for torch files; ``.safetensors``);
* a glob pattern (``runs/*.pt``), expanded here when the shell did not;
* a **model folder** (Hugging Face layout: ``model.safetensors``, sharded
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``), which is *one* checkpoint;
* a **folder of checkpoints**: every checkpoint file directly inside it, plus every
  sub-folder that is a model folder (e.g. ``checkpoint-500/`` of a Hugging Face
  Trainer run). Files named like aliases of another checkpoint (``last.ckpt``,
  ``checkpoint_last.pt``, ``checkpoint_best.pt``, ``model_best.pth.tar``) are skipped
  there, since they duplicate a numbered checkpoint; name them explicitly to use them.
  So are trainers' training-state files (``training_args.bin``, ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``).

A folder that is a model folder is always one checkpoint, even if it also holds model
sub-folders (a Hugging Face Trainer ``output_dir`` after ``save_model`` holds the final
model and its ``checkpoint-N/`` folders): the plan then notes the sub-folders, and
``run/*/`` (or ``run/checkpoint-*``) averages those instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import CheckpointReadError, OptionError
from .readers import Checkpoint, CheckpointMeta, TensorRef, _apply_name_metadata, open_checkpoint

__all__ = ["discover", "is_model_folder", "open_model_folder", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pth.tar", ".tar")
_ALIAS_RE = re.compile(r"^(?:checkpoint[_-]?|model[_-]?)?(?:last|best)(?:-v\d+)?$", re.IGNORECASE)
# training-state files that trainers (Hugging Face Trainer, accelerate) keep beside checkpoints
_TRAINING_STATE_RE = re.compile(
    r"^(?:training_args\.bin|optimizer(?:_\d+)?\.(?:pt|bin)|scheduler\.(?:pt|bin)|scaler\.(?:pt|bin)"
    r"|rng_state(?:_\d+)?\.pth|random_states_\d+\.pkl)$",
    re.IGNORECASE,
)
_HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _has_suffix(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in CHECKPOINT_SUFFIXES)


def _stem(name: str) -> str:
    low = name.lower()
    for s in CHECKPOINT_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def is_model_folder(path: Path) -> bool:
    """True if ``path`` is a folder holding one model in the Hugging Face layout."""
    return path.is_dir() and any((path / n).is_file() for n in _HF_SINGLE + _HF_INDEX)


def discover(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Expand ``inputs`` into checkpoint paths, in the order given.

    Returns the paths and notes about skipped files (for the plan). Raises
    :class:`~ckptavg.CkptavgError` for a path that does not exist, a pattern or folder
    that matches nothing, or the same file given twice.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    notes: list[str] = []
    if not inputs:
        raise OptionError("no input checkpoints given")
    for item in inputs:
        s = os.fspath(item)
        p = Path(s)
        if p.exists():
            if p.is_dir() and not is_model_folder(p):
                found, skipped = _scan_folder(p)
                if not found:
                    raise CheckpointReadError(
                        f"{p}: folder holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) "
                        "and is not a model folder"
                    )
                if skipped:
                    notes.append(
                        f"{p}: skipped {', '.join(skipped)} (aliases of numbered checkpoints or training state; "
                        "name them to include)"
                    )
                out.extend(found)
            else:
                if p.is_dir():
                    subs = _model_subfolders(p)
                    if subs:
                        notes.append(
                            f"{p}: is a model folder, used as one checkpoint; it also holds model folders "
                            f"({', '.join(subs[:3])}{', ...' if len(subs) > 3 else ''}): to average those, pass "
                            f"{p / subs[0]} ... or a pattern such as {p / '*'}/"
                        )
                out.append(p)
        elif glob.has_magic(s):
            matches = sorted(glob.glob(s), key=natural_key)
            matches = [m for m in matches if Path(m).is_file() or is_model_folder(Path(m))]
            if not matches:
                raise CheckpointReadError(f"{s}: no files match this pattern")
            out.extend(Path(m) for m in matches)
        else:
            raise CheckpointReadError(f"{p}: no such file or folder")
    _check_duplicates(out)
    return out, notes


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
        if q.is_file() and _has_suffix(q.name):
            if _ALIAS_RE.match(_stem(q.name)) or _TRAINING_STATE_RE.match(q.name):
                skipped.append(q.name)
            else:
                found.append(q)
        elif q.is_dir() and is_model_folder(q):
            found.append(q)
    return found, skipped


def _model_subfolders(folder: Path) -> list[str]:
    try:
        return sorted((q.name for q in folder.iterdir() if q.is_dir() and is_model_folder(q)), key=natural_key)
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
            raise OptionError(f"{p}: given twice (also as {seen[k]}); each checkpoint may appear once")
        seen[k] = p


_NUM_SPLIT = re.compile(r"(\d+)")


def natural_key(s: str) -> tuple:
    """Sort key that orders ``ckpt2`` before ``ckpt10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in _NUM_SPLIT.split(str(s)) if t)


# --------------------------------------------------------------------------------------
# Hugging Face model folders


def open_model_folder(folder: Path, *, key: str | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Open a Hugging Face style model folder as one checkpoint (all shards)."""
    if not is_model_folder(folder):
        raise CheckpointReadError(
            f"{folder}: not a model folder (no {', '.join(_HF_SINGLE + _HF_INDEX)}); "
            "to average the checkpoints inside a folder, pass the folder as an input of merge"
        )
    if key:
        raise OptionError(f"{folder}: --key applies to single torch checkpoint files, not model folders")
    shard_names: list[str]
    fmt = "hf-folder"
    index_file = next((folder / n for n in _HF_INDEX if (folder / n).is_file()), None)
    if (folder / "model.safetensors").is_file():
        shard_names, index_file = ["model.safetensors"], None
    elif index_file is not None:
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            wmap = index["weight_map"]
            if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                raise ValueError("weight_map is not a name->file object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointReadError(f"{index_file}: invalid index file: {e}") from None
        shard_names = list(dict.fromkeys(wmap.values()))
        for s in shard_names:
            if "/" in s or "\\" in s or s.startswith("."):
                raise CheckpointReadError(f"{index_file}: shard name {s!r} points outside the folder")
    else:
        shard_names = ["pytorch_model.bin"]
    tensors: dict[str, TensorRef] = {}
    files = []
    size = 0
    st_meta: dict[str, str] = {}
    for s in shard_names:
        shard = open_checkpoint(folder / s, trust_pickle=trust_pickle)
        files.extend(shard.files)
        size += shard.size
        if shard.st_metadata:
            st_meta.update(shard.st_metadata)
        for name, ref in shard.tensors.items():
            if name in tensors:
                raise CheckpointReadError(f"{folder}: tensor {name!r} appears in two shards")
            if ref.alias_key is not None:
                # storage keys ("0", "1", ...) are per file: shards must not look tied to each other
                ref.alias_key = (s, *ref.alias_key)
            tensors[name] = ref
    if index_file is not None:
        missing = [n for n in wmap if n not in tensors]
        if missing:
            raise CheckpointReadError(
                f"{index_file}: lists {len(missing)} tensor(s) its shards lack, e.g. {missing[0]!r}"
            )
    meta = CheckpointMeta()
    _trainer_state(folder, meta)
    ckpt = Checkpoint(path=folder, format=fmt, tensors=tensors, meta=meta, size=size, files=files,
                      st_metadata=st_meta)
    _apply_name_metadata(ckpt)
    return ckpt


def _trainer_state(folder: Path, meta: CheckpointMeta) -> None:
    """Step, epoch and latest eval metrics from a Hugging Face Trainer's trainer_state.json."""
    f = folder / "trainer_state.json"
    if not f.is_file():
        return
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(state, dict):
        return
    gs = state.get("global_step")
    if isinstance(gs, int):
        meta.step, meta.step_from = gs, "recorded"
    ep = state.get("epoch")
    if isinstance(ep, (int, float)) and float(ep).is_integer():
        meta.epoch, meta.epoch_from = int(ep), "recorded"
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                if isinstance(k, str) and k.startswith("eval_") and isinstance(v, (int, float)):
                    meta.metrics[k] = v

"""Reader for Hugging Face model folders: one checkpoint made of one or more weight files.

``model.safetensors``, shards listed by ``model.safetensors.index.json``, or
``pytorch_model.bin`` / ``pytorch_model.bin.index.json``. Each shard is opened with the
file reader of its format; ``trainer_state.json`` (a Trainer's ``checkpoint-N/``) gives
step, epoch and eval metrics.

A diffusers component folder (``unet/``, ``transformer/``, ``vae/``... as ``save_pretrained``
writes it) is the same layout under another file name: ``diffusion_pytorch_model.safetensors``,
shards with ``diffusion_pytorch_model.safetensors.index.json``, or the ``.bin`` variants. It
is read the same way, with the format name ``"diffusers"`` (a folder output written from it
keeps the diffusers file names: :mod:`ckptavg.io.hf_folder_out`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointReadError, OptionError
from .accelerate_in import several_models_note
from .checkpoint import Checkpoint, CheckpointMeta, TensorRef
from .files import read_small_json
from .metadata import apply_name_metadata, trainer_state

__all__ = ["is_model_folder", "is_diffusers_folder", "open_model_folder", "folder_format", "weights_stem",
           "SINGLE_FILES", "INDEX_FILES", "DIFFUSERS_SINGLE_FILES", "DIFFUSERS_INDEX_FILES", "WEIGHT_STEMS"]

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DIFFUSERS_SINGLE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
#: the stem of the safetensors weight files a folder output of each folder format is written under
WEIGHT_STEMS = {"hf-folder": "model", "diffusers": "diffusion_pytorch_model"}
_MAX_INDEX = 64 << 20


def _has_any(path: Path, names: tuple[str, ...]) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in names)


def is_diffusers_folder(path: Path) -> bool:
    """True if ``path`` is a diffusers component folder (``diffusion_pytorch_model.safetensors``,
    its shards' index, or the ``.bin`` variants) and not a Hugging Face model folder too."""
    return _has_any(path, DIFFUSERS_SINGLE_FILES + DIFFUSERS_INDEX_FILES) and not _has_any(
        path, SINGLE_FILES + INDEX_FILES)


def is_model_folder(path: Path) -> bool:
    """True if ``path`` is a folder holding one model in the Hugging Face layout (a transformers
    model folder or a diffusers component folder)."""
    return _has_any(path, SINGLE_FILES + INDEX_FILES + DIFFUSERS_SINGLE_FILES + DIFFUSERS_INDEX_FILES)


def folder_format(path: Path) -> str:
    """``"diffusers"`` for a diffusers component folder, else ``"hf-folder"``."""
    return "diffusers" if is_diffusers_folder(path) else "hf-folder"


def weights_stem(fmt: str) -> str:
    """The stem of a folder output's weight files for an input folder format (``model`` unless
    the format is ``"diffusers"``)."""
    return WEIGHT_STEMS.get(fmt, "model")


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = read_small_json(index_file, _MAX_INDEX)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise ValueError("weight_map is not a name->file object")
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointReadError(f"{index_file}: invalid index file: {e}") from None
    if not wmap:
        raise CheckpointReadError(f"{index_file}: invalid index file: weight_map lists no tensors")
    for name, s in wmap.items():
        if not s or "/" in s or "\\" in s or s.startswith("."):
            raise CheckpointReadError(f"{index_file}: tensor {name!r}: shard name {s!r} is not a file in the folder")
    return wmap


def open_model_folder(folder: Path, *, key: str | None, trust_pickle: bool,
                      open_file: Callable[..., Checkpoint]) -> Checkpoint:
    """Open a Hugging Face style model folder as one checkpoint (all shards);
    ``open_file`` opens one weight file (the format registry's file opener)."""
    if not is_model_folder(folder):
        raise CheckpointReadError(
            f"{folder}: not a model folder (no {', '.join(SINGLE_FILES + INDEX_FILES)} "
            f"or diffusers' {DIFFUSERS_SINGLE_FILES[0]}); "
            "to average the checkpoints inside a folder, pass the folder as an input of merge"
        )
    if key:
        raise OptionError(f"{folder}: --key applies to single torch checkpoint files, not model folders")
    fmt = folder_format(folder)
    singles, indexes = (DIFFUSERS_SINGLE_FILES, DIFFUSERS_INDEX_FILES) if fmt == "diffusers" else (
        SINGLE_FILES, INDEX_FILES)
    index_file = next((folder / n for n in indexes if (folder / n).is_file()), None)
    wmap: dict[str, str] = {}
    if (folder / singles[0]).is_file():
        shard_names, index_file = [singles[0]], None
    elif index_file is not None:
        wmap = _read_index(index_file)
        shard_names = list(dict.fromkeys(wmap.values()))
    else:
        shard_names = [singles[1]]
    tensors: dict[str, TensorRef] = {}
    files = []
    size = 0
    st_meta: dict[str, str] = {}
    for s in shard_names:
        if not (folder / s).is_file():
            raise CheckpointReadError(f"{index_file or folder}: shard {s!r} is missing")
        shard = open_file(folder / s, key=None, trust_pickle=trust_pickle)
        files.extend(shard.files)
        size += shard.size
        if shard.st_metadata:
            st_meta.update(shard.st_metadata)
        for name, ref in shard.tensors.items():
            if name in tensors:
                raise CheckpointReadError(f"{folder}: tensor {name!r} appears in two shards")
            if ref.alias_key is not None:
                # storage offsets are per file: shards must not look tied to each other
                ref.alias_key = (s, *ref.alias_key)
            tensors[name] = ref
    if index_file is not None:
        missing = [n for n in wmap if n not in tensors]
        if missing:
            raise CheckpointReadError(
                f"{index_file}: lists {len(missing)} tensor(s) its shards lack, e.g. {missing[0]!r}"
            )
    meta = CheckpointMeta()
    trainer_state(folder, meta)
    ckpt = Checkpoint(path=folder, format=fmt, tensors=tensors, meta=meta, size=size, files=files,
                      st_metadata=st_meta)
    if st_meta and ("ckptavg_version" in st_meta or "ckptavg_method" in st_meta):
        meta.ckptavg_output = True
    note = several_models_note(folder, shard_names[0]) if index_file is None else None
    if note:
        ckpt.notes.append(note)  # accelerate's save_state with several models
    apply_name_metadata(ckpt)
    return ckpt

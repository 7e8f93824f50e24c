"""The format layer: one reader module per input format, one writer module per output kind.

Reading: :func:`open_checkpoint` describes any supported checkpoint (a file or a folder)
without reading tensor data, choosing the reader by content. To add an input format, write
``NAME_in.py`` returning a :class:`~ckptavg.io.checkpoint.Checkpoint` and register it in
:data:`FILE_READERS` (by file content) or :data:`FOLDER_READERS` (by folder layout).

Writing: :func:`open_writer` returns the :class:`~ckptavg.io.writer.Writer` for an output
kind. To add an output kind, write ``NAME_out.py`` with a class implementing the protocol
and register it in :data:`WRITERS` (and, if it is chosen by name, in :func:`output_kind`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import CheckpointReadError
from .checkpoint import Checkpoint, CheckpointMeta, TensorRef
from .dcp_in import is_dcp_folder, open_dcp
from .files import InputFile
from .hf_folder_in import is_model_folder, open_model_folder
from .safetensors_in import looks_like_safetensors, open_safetensors
from .torch_in import is_legacy_pickle, is_torch_zip, open_torch, open_torch_legacy
from .writer import Entry, Writer, open_writer, output_kind, write_state_dict

__all__ = ["open_checkpoint", "Checkpoint", "CheckpointMeta", "TensorRef", "Entry", "Writer", "open_writer",
           "output_kind", "write_state_dict", "is_checkpoint_folder", "FILE_READERS", "FOLDER_READERS"]

#: (name, does this file's head match, open it); tried in order
FILE_READERS: list[tuple[str, Callable[[InputFile, bytes], bool], Callable[..., Checkpoint]]] = [
    ("safetensors", lambda f, head: f.path.name.lower().endswith(".safetensors") or looks_like_safetensors(f, head),
     lambda f, key, trust_pickle: open_safetensors(f, key)),
    ("torch", lambda f, head: is_torch_zip(head), open_torch),
    ("torch-legacy", lambda f, head: is_legacy_pickle(head), open_torch_legacy),
]



#: (name, is this folder one checkpoint of the format, open it); tried in order
FOLDER_READERS: list[tuple[str, Callable[[Path], bool], Callable[..., Checkpoint]]] = [
    ("dcp", is_dcp_folder, lambda p, key, trust_pickle: open_dcp(p, key=key, trust_pickle=trust_pickle)),
    ("hf-folder", is_model_folder,
     lambda p, key, trust_pickle: open_model_folder(p, key=key, trust_pickle=trust_pickle, open_file=_open_file)),
]


def is_checkpoint_folder(path: Path) -> bool:
    """True if the folder is itself one checkpoint (a model folder, a DCP folder...)."""
    return path.is_dir() and any(match(path) for _n, match, _o in FOLDER_READERS)


def _open_file(p: Path, *, key: str | None, trust_pickle: bool) -> Checkpoint:
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise CheckpointReadError(f"{p}: no such file") from None
    except OSError as e:
        raise CheckpointReadError(f"{p}: cannot access: {e.strerror}") from None
    if not os.access(p, os.R_OK):
        raise CheckpointReadError(f"{p}: permission denied")
    if size == 0:
        raise CheckpointReadError(f"{p}: empty file, not a checkpoint")
    f = InputFile(p, size)
    try:
        head = f.pread(0, min(size, 8))
        for _name, match, opener in FILE_READERS:
            if match(f, head):
                return opener(f, key, trust_pickle)
        raise CheckpointReadError(
            f"{p}: not a checkpoint (neither a torch zip file, a legacy torch file nor safetensors)"
        )
    except BaseException:
        f.close()
        raise


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefix: str | Iterable[str] | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Open one checkpoint (a file, or a folder that is one checkpoint) without reading tensor data.

    ``key`` picks the state dict inside a torch checkpoint (dotted for nesting);
    ``strip_prefix`` removes a prefix from every tensor name that has it.

    Example::

        with open_checkpoint("runs/epoch=3-step=300.ckpt") as ckpt:
            print(ckpt.format, ckpt.meta.epoch, ckpt.meta.step, list(ckpt.tensors)[:3])
    """
    p = Path(path)
    if p.is_dir():
        for _name, match, opener in FOLDER_READERS:
            if match(p):
                ckpt = opener(p, key, trust_pickle)
                break
        else:
            raise CheckpointReadError(
                f"{p}: not a checkpoint folder (no model.safetensors, pytorch_model.bin, index file or DCP .metadata); "
                "to average the checkpoints inside a folder, pass the folder as an input of merge"
            )
    else:
        ckpt = _open_file(p, key=key, trust_pickle=trust_pickle)
    if strip_prefix:
        strip_prefixes(ckpt, strip_prefix)
    return ckpt


def strip_prefixes(ckpt: Checkpoint, prefixes: str | Iterable[str]) -> None:
    """Remove prefixes from the checkpoint's tensor names (two names becoming one is an error)."""
    plist = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    out: dict[str, TensorRef] = {}
    for name, ref in ckpt.tensors.items():
        new = name
        for pre in plist:
            if pre and new.startswith(pre):
                new = new[len(pre) :]
        if new in out:
            raise CheckpointReadError(f"{ckpt.path}: removing prefix {plist!r} makes two tensors named {new!r}")
        ref.name = new
        out[new] = ref
    ckpt.tensors = out

"""The format layer: one reader module per input format, one writer module per output kind.

Reading: :func:`open_checkpoint` describes any supported checkpoint (a file or a folder)
without reading tensor data, choosing the reader by content. To add an input format, write
``NAME_in.py`` returning a :class:`~ckptavg.io.checkpoint.Checkpoint` and register it in
:data:`FILE_READERS` (by file content) or :data:`FOLDER_READERS` (by folder layout).

Writing: :func:`kind_of` gives the :class:`~ckptavg.io.kinds.OutputKind` a path asks for; the
kind checks its destination and opens the whole output or one rank's part. To add an output
kind, write ``NAME_out.py`` with a subclass of :class:`~ckptavg.io.kinds.OutputKind` (its
``KIND``) and add it to :data:`OUTPUT_KINDS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError, OptionError, OutputError
from . import dcp_out, hf_folder_out, megatron_out, safetensors_out, torch_out
from .accelerate_in import is_fsdp_checkpoint, open_fsdp_checkpoint
from .checkpoint import Checkpoint, CheckpointMeta, TensorRef
from .dcp_in import is_dcp_folder, open_dcp
from .deepspeed_in import is_deepspeed_folder, open_deepspeed, open_single_tag, single_tag
from .files import InputFile, input_file
from .fp8 import dequantize_scaled_fp8
from .hf_folder_in import is_model_folder, open_model_folder
from .kinds import OutputKind, OutputSetup, RankPart
from .remote_out import RemoteKind
from .safetensors_in import looks_like_safetensors, open_safetensors
from .torch_in import is_legacy_pickle, is_torch_zip, open_torch, open_torch_legacy
from .urls import as_path, is_remote, is_url
from .writer import Entry, Writer

__all__ = ["open_checkpoint", "Checkpoint", "CheckpointMeta", "TensorRef", "Entry", "Writer", "open_writer",
           "output_kind", "kind_of", "feed", "state_dict_entries", "is_checkpoint_folder",
           "FILE_READERS", "FOLDER_READERS", "OUTPUT_KINDS", "OutputKind", "OutputSetup", "RankPart"]

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
    ("accelerate-fsdp", is_fsdp_checkpoint,
     lambda p, key, trust_pickle: open_fsdp_checkpoint(p, key=key, trust_pickle=trust_pickle)),
    ("deepspeed", is_deepspeed_folder, open_deepspeed),
    ("peft", lambda p: _adapters().is_adapter_folder(p),
     lambda p, key, trust_pickle: _adapters().open_adapter_folder(p, key=key, trust_pickle=trust_pickle,
                                                                 open_file=_open_file)),
    ("hf-folder", is_model_folder,
     lambda p, key, trust_pickle: open_model_folder(p, key=key, trust_pickle=trust_pickle, open_file=_open_file)),
    # a DeepSpeed root holding one checkpoint and no model weights (a Trainer's checkpoint-N/ under ZeRO-3)
    ("deepspeed-root", lambda p: single_tag(p) is not None, open_single_tag),
]


def _adapters() -> Any:
    from .. import adapters  # (PEFT adapter folders: the exact LoRA average lives beside the pipeline)

    return adapters


def _kohya_names(names: list[str]) -> bool:
    from ..kohya import is_kohya_names  # (the exact LoRA average lives beside the pipeline)

    return is_kohya_names(names)


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
    if not is_remote(p) and not os.access(p, os.R_OK):
        raise CheckpointReadError(f"{p}: permission denied")
    if size == 0:
        raise CheckpointReadError(f"{p}: empty file, not a checkpoint")
    f = input_file(p, size)
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
    p = as_path(path)
    if p.is_dir():
        for _name, match, opener in FOLDER_READERS:
            if match(p):
                ckpt = opener(p, key, trust_pickle)
                break
        else:
            raise CheckpointReadError(
                f"{p}: not a checkpoint folder (no model.safetensors, pytorch_model.bin, "
                "diffusion_pytorch_model.safetensors, index file or DCP .metadata); "
                "to average the checkpoints inside a folder, pass the folder as an input of merge"
            )
    else:
        ckpt = _open_file(p, key=key, trust_pickle=trust_pickle)
    dequantize_scaled_fp8(ckpt)  # float8 numbers times their scales: one float32 weight each
    if ckpt.format in ("safetensors", "torch") and ckpt.weights_key is None and _kohya_names(list(ckpt.tensors)):
        ckpt.format = "kohya"  # a kohya LoRA file: averaged exactly in the space of its updates (ckptavg.kohya)
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


# --------------------------------------------------------------------------------------
# writers

#: every output kind, in the order a path is matched against them (a ``.dcp`` folder before any folder)
#: (the Megatron root last: never chosen by a path alone, see :func:`kind_of`)
OUTPUT_KINDS: list[OutputKind] = [dcp_out.KIND, hf_folder_out.KIND, safetensors_out.KIND, torch_out.KIND,
                                  megatron_out.KIND]


def kind_of(path: str | os.PathLike[str], fmt: str | None = None, input_formats: Sequence[str] = ()) -> OutputKind:
    """The output kind a path asks for: a DCP folder (a name ending in ``.dcp`` or ``.dcp/``), a
    Hugging Face folder (a path ending in ``/``, an existing folder, or a name without a file
    extension), ``.safetensors``, or a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
    ``.pth.tar``, ``.tar``). A folder output is a Megatron checkpoint root instead when every input
    is a Megatron checkpoint (``input_formats``) or ``fmt`` is ``"megatron"``; ``fmt="hf"`` keeps the
    Hugging Face folder. For a URL, the same kind written locally and uploaded
    (:class:`~ckptavg.io.remote_out.RemoteKind`).

    Example::

        kind_of("soup/").name  # 'hf-folder'
        kind_of("avg/", input_formats=["megatron", "megatron"]).name  # 'megatron'
    """
    text = os.fspath(path)
    remote = is_remote(path) or (is_url(text) and not text.lower().startswith("file://"))
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    kind = next((k for k in OUTPUT_KINDS if k.matches(text)), None)
    if kind is None:
        raise OptionError(
            f"{text}: the output must end in .safetensors or .pt/.pth/.bin/.ckpt (the extension picks the format), "
            "or name a folder (ending in /) for Hugging Face sharded safetensors"
        )
    if fmt not in (None, "megatron", "hf"):
        raise OptionError(f"--format must be megatron or hf, got {fmt!r}")
    if fmt is not None and kind.single_file:
        raise OptionError(f"{text}: --format {fmt} writes a folder: give -o DIR/ (the extension picks a file's format)")
    if fmt == "megatron" or (fmt is None and kind is hf_folder_out.KIND and input_formats
                             and all(f == "megatron" for f in input_formats)):
        kind = megatron_out.KIND
    elif fmt == "hf":
        kind = hf_folder_out.KIND
    return RemoteKind(kind) if remote else kind


def output_kind(path: str | os.PathLike[str]) -> str:
    """The name of the output kind a path asks for (see :func:`kind_of`).

    Example::

        output_kind("swa.pt")  # 'torch'
    """
    return kind_of(path).name


def open_writer(kind: str, dest: Path | None, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                setup: OutputSetup | None = None) -> Writer:
    """The writer of the whole output for a kind's name (``"memory"``, or ``dest`` None: in memory).

    Example::

        w = open_writer("safetensors", Path("out.safetensors"), [Entry("w", torch.float32, (2,))])
        w.write(torch.ones(2)); w.commit()
    """
    if dest is None or kind == "memory":
        from .memory_out import MemoryWriter

        return MemoryWriter(entries)
    for k in OUTPUT_KINDS:
        if k.name == kind:
            return k.open(Path(dest), entries, metadata or {}, setup or OutputSetup())
    raise OptionError(f"unknown output kind {kind!r}; expected one of {', '.join(k.name for k in OUTPUT_KINDS)}")


def state_dict_entries(state_dict: Mapping[str, torch.Tensor], dest: Any = None
                       ) -> tuple[list[Entry], list[torch.Tensor]]:
    """Entries for an in-memory state dict (tensors sharing one storage become aliases) and the
    tensors whose bytes a writer must receive, in order."""
    entries: list[Entry] = []
    seen: dict[tuple, int] = {}
    tensors: list[torch.Tensor] = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise OutputError(f"{dest}: entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            entries.append(Entry(name, t.dtype, tuple(t.shape), alias_of=seen[key]))
            continue
        if key is not None:
            seen[key] = len(entries)
        entries.append(Entry(name, t.dtype, tuple(t.shape)))
        tensors.append(t)
    return entries, tensors


def feed(writer: Writer, tensors: Sequence[torch.Tensor]) -> None:
    """Stream in-memory tensors (in entry order, aliases left out) into ``writer``."""
    for t in tensors:
        if t.numel():
            writer.write(t.cpu().contiguous())

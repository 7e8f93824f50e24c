"""The layout of a Hugging Face model folder as ckptavg writes it: which paths name a folder,
the shard names and the cut into shards (one process or several ranks), which files of an input
folder are copied along, and what an existing destination may be replaced."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CkptavgError, OutputError
from .writer import Entry

__all__ = ["INDEX_NAME", "SINGLE_NAME", "ShardLayout", "check_destination", "folder_extras", "is_folder_output",
           "shard_layout", "shard_names"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".tar")
# files in a model folder that are weights (of any framework) or training state: not copied
_NOT_COPIED_SUFFIXES = _MODEL_SUFFIXES + (".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ot", ".npz",
                                          ".pkl", ".pickle", ".keras", ".tflite")
_NOT_COPIED_NAMES = {"trainer_state.json", "training_args.json"}
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_FILE_EXT_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9]{1,5}$")


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """True if ``-o output`` names a folder (Hugging Face sharded safetensors output).

    A folder is a path ending with ``/``, an existing folder, or a name without a
    model-file extension (``soup``, ``llama-3.1-soup``). A name with another short
    file extension (``out.txt``, ``model.v2``) is not taken as a folder: add a ``/``.
    """
    s = os.fspath(output)
    if not s:
        return False
    if s.endswith("/") or s.endswith(os.sep):
        return True
    p = Path(s)
    if p.is_dir():
        return True
    name = p.name.lower()
    if any(name.endswith(x) for x in _MODEL_SUFFIXES):
        return False
    if "." not in name.strip("."):
        return True
    return not _FILE_EXT_RE.match(name.rsplit(".", 1)[1])


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards, as ``save_pretrained`` names them."""
    if n <= 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def folder_extras(folder: Path) -> list[Path]:
    """The files of a model folder that are copied to a folder output (not weights, not
    training state, not hidden, not sub-folders), in name order."""
    out = []
    try:
        items = sorted(folder.iterdir(), key=lambda q: q.name)
    except OSError as e:
        raise CkptavgError(f"{folder}: cannot list folder: {e.strerror}") from None
    for q in items:
        low = q.name.lower()
        if low.startswith(".") or not q.is_file():
            continue
        if any(low.endswith(s) for s in _NOT_COPIED_SUFFIXES) or low.endswith(".index.json"):
            continue
        if low in _NOT_COPIED_NAMES or low.startswith("rng_state"):
            continue
        out.append(q)
    return out


def _is_ckptavg_output(folder: Path) -> bool:
    """Whether ``folder`` is an earlier ckptavg output: an index, a single file or (a node's part
    of a merge across ranks without a shared file system) shards only, ckptavg's provenance in
    the index's or the first safetensors header's metadata."""
    idx = folder / INDEX_NAME
    try:
        if idx.is_file():
            meta = json.loads(idx.read_text(encoding="utf-8")).get("metadata") or {}
            return isinstance(meta, dict) and "ckptavg_version" in meta
        single = folder / SINGLE_NAME
        if not single.is_file():
            names = sorted(q.name for q in folder.iterdir())
            if not names or not all(_SHARD_RE.match(n) for n in names):
                return False
            single = folder / names[0]
        with open(single, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 1024 * 1024:
                return False
            header = json.loads(fh.read(n).decode("utf-8"))
        meta = header.get("__metadata__") or {}
        return isinstance(meta, dict) and "ckptavg_version" in meta
    except (OSError, ValueError, struct.error, AttributeError, UnicodeDecodeError):
        return False


def check_destination(dest: Path) -> str:
    """How a folder output will be published: ``"new"``, ``"empty"`` (an empty folder
    is there) or ``"replace"`` (an earlier ckptavg output is there). Anything else at
    ``dest`` is refused with :class:`~ckptavg.errors.OutputError`."""
    if not dest.exists() and not dest.is_symlink():
        for anc in dest.parents:
            if anc.exists():
                if not anc.is_dir():
                    raise OutputError(f"{dest}: cannot create the output folder: {anc} is a file")
                break
        return "new"
    if dest.is_symlink() or not dest.is_dir():
        raise OutputError(f"{dest}: exists and is not a folder; folder output needs a new or empty folder")
    try:
        items = sorted(q.name for q in dest.iterdir())
    except OSError as e:
        raise OutputError(f"{dest}: cannot list the output folder: {e.strerror}") from None
    if not items:
        return "empty"
    if _is_ckptavg_output(dest):
        return "replace"
    shown = ", ".join(repr(n) for n in items[:3]) + (", ..." if len(items) > 3 else "")
    raise OutputError(
        f"{dest}: the folder exists and holds other files ({shown}); ckptavg only replaces an empty folder or "
        "an earlier ckptavg output: choose a new folder"
    )


@dataclass
class ShardLayout:
    """The shards of a folder output: which rank and which shard holds each entry."""

    owner: list[int]  # rank per entry
    shard_of: list[int]  # global shard index per entry
    names: list[str]  # shard file names (global numbering)
    shard_rank: list[int]  # rank writing each shard

    def local(self, rank: int) -> list[int]:
        """Indices of the entries ``rank`` writes, in plan order."""
        return [i for i, r in enumerate(self.owner) if r == rank]


def shard_layout(entries: Sequence[Entry], owner: Sequence[int], world: int, shard_size: int) -> ShardLayout:
    """The one cut of a folder output into shards: each rank's entries (all of them in one process)
    cut as huggingface_hub's ``split_torch_state_dict_into_shards`` does (a new shard when the next
    tensor would pass ``shard_size``), numbered globally in rank order.

    Example::

        lay = shard_layout(plan.entries(), partition(costs, 2), 2, 5 * 10**9)
        lay.names  # ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    shard_of = [0] * len(entries)
    shard_rank: list[int] = []
    for r in range(world):
        sizes: list[int] = []
        for i in (i for i, o in enumerate(owner) if o == r):
            n = entries[i].nbytes
            if not sizes or (sizes[-1] > 0 and sizes[-1] + n > shard_size):
                sizes.append(0)
                shard_rank.append(r)
            sizes[-1] += n
            shard_of[i] = len(shard_rank) - 1
    if not shard_rank:
        shard_rank.append(0)  # no tensors: rank 0 writes one empty model.safetensors
    return ShardLayout(list(owner), shard_of, shard_names(len(shard_rank)), shard_rank)

"""The layout of a Hugging Face model folder as ckptavg writes it: which paths name a folder,
the shard names and the cut into shards (one process or several ranks), which files of an input
folder are copied along, and what an existing destination may be replaced."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..errors import CkptavgError, OutputError
from .folders import INDEX_NAME, SINGLE_NAME, check_replaceable, recover_leftovers
from .urls import is_remote
from .writer import Entry

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Extras", "ShardLayout", "check_destination", "folder_extras",
           "index_name", "is_folder_output", "shard_layout", "shard_names"]


_MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".tar")
# files in a model folder that are weights (of any framework) or training state: not copied
_NOT_COPIED_SUFFIXES = _MODEL_SUFFIXES + (".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ot", ".npz",
                                          ".pkl", ".pickle", ".keras", ".tflite")
_NOT_COPIED_NAMES = {"trainer_state.json", "training_args.json"}
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


def shard_names(n: int, stem: str = "model") -> list[str]:
    """File names of ``n`` shards, as ``save_pretrained`` names them (``stem``: ``model``, or
    ``diffusion_pytorch_model`` for a diffusers component folder)."""
    if n <= 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def index_name(stem: str = "model") -> str:
    """The index file name of a sharded folder output (``model.safetensors.index.json``)."""
    return f"{stem}.safetensors.index.json"


class Extras(NamedTuple):
    """The files of an input model folder copied to a folder output, and what was left out for safety."""

    files: list[tuple[str, Path]]  # (name in the folder, regular file to read), in name order
    skipped: list[str]  # one note per entry left out: a symlink leading outside, a FIFO, a device...


def _hub_blobs(folder: Path) -> Path | None:
    """``models--ORG--NAME/blobs`` when ``folder`` is a snapshot of the Hugging Face hub cache
    (``.../models--ORG--NAME/snapshots/REV``), whose files are symlinks into that folder."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent / "blobs"
    return None


def _safe_source(root: Path, blobs: Path | None, q: Path) -> tuple[Path | None, str | None]:
    """The file to read for entry ``q`` (itself, or its symlink's target when that is a regular
    file inside ``root`` or the hub cache's ``blobs``), or a note on why it is left out."""
    try:
        st = os.lstat(q)
    except OSError:
        return None, None
    if stat.S_ISREG(st.st_mode):
        return q, None
    if stat.S_ISDIR(st.st_mode):
        return None, None  # sub-folders are not copied
    if not stat.S_ISLNK(st.st_mode):
        return None, f"{q}: not a regular file (a FIFO, socket or device), not copied"
    target = Path(os.path.realpath(q))
    inside = root in target.parents or (blobs is not None and Path(os.path.realpath(blobs)) in target.parents)
    try:
        regular = stat.S_ISREG(os.lstat(target).st_mode)
    except OSError:
        regular = False
    if not inside:
        return None, f"{q}: a symlink to {target}, outside the model folder, not copied"
    if not regular:
        return None, f"{q}: a symlink to something that is not a regular file, not copied"
    return target, None


def folder_extras(folder: Path) -> Extras:
    """The files of a model folder that are copied to a folder output (not weights, not
    training state, not hidden, not sub-folders), in name order. Only regular files that are
    really inside the folder are taken: a symlink whose target lies outside it (or is not a
    regular file) and special files (FIFOs, sockets, devices) are left out, each with a note
    (:attr:`Extras.skipped`). A snapshot folder of the Hugging Face hub cache may link into its
    repository's ``blobs``. Each file comes as its name and the path to read (a symlink's target).

    Example::

        folder_extras(Path("ft1")).files  # [('config.json', Path('ft1/config.json')), ...]
    """
    out: list[tuple[str, Path]] = []
    skipped: list[str] = []
    try:
        items = sorted(folder.iterdir(), key=lambda q: q.name)
    except OSError as e:
        raise CkptavgError(f"{folder}: cannot list folder: {e.strerror}") from None
    remote = is_remote(folder)
    root = folder if remote else Path(os.path.realpath(folder))
    blobs = None if remote else _hub_blobs(folder)
    for q in items:
        low = q.name.lower()
        if low.startswith("."):
            continue
        if any(low.endswith(s) for s in _NOT_COPIED_SUFFIXES) or low.endswith(".index.json"):
            continue
        if low in _NOT_COPIED_NAMES or low.startswith("rng_state"):
            continue
        # behind a URL there are no symlinks or special files: every object is a plain file
        src, note = ((q if q.is_file() else None), None) if remote else _safe_source(root, blobs, q)
        if note is not None:
            skipped.append(note)
        if src is not None:
            out.append((q.name, src))
    return Extras(out, skipped)


def check_destination(dest: Path) -> str:
    """How a folder output will be published: ``"new"``, ``"empty"`` (an empty folder
    is there) or ``"replace"`` (an earlier ckptavg output holding only files ckptavg wrote is
    there, see :mod:`ckptavg.io.folders`). Anything else at ``dest`` is refused with
    :class:`~ckptavg.errors.OutputError`, before anything is read. Leftovers of an interrupted
    replacement of ``dest`` are restored or removed first (:func:`~ckptavg.io.folders.recover_leftovers`).

    Example::

        check_destination(Path("soup"))  # "new" when nothing is there yet
    """
    recover_leftovers(dest)
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
    if check_replaceable(dest):
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


def shard_layout(entries: Sequence[Entry], owner: Sequence[int], world: int, shard_size: int,
                 stem: str = "model") -> ShardLayout:
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
    return ShardLayout(list(owner), shard_of, shard_names(len(shard_rank), stem), shard_rank)

"""A DCP folder's ``.metadata``, read without running code: a restricted unpickler that resolves
only torch's own DCP metadata classes (and a few harmless standard types); anything else is
refused unless the user trusts the file (``--trust-pickle``)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError, UnsafePickleError

__all__ = ["METADATA_NAME", "read_metadata", "short_error"]

METADATA_NAME = ".metadata"
_MAX_METADATA = 1 << 30


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from pathlib import PosixPath, PurePosixPath, PureWindowsPath, WindowsPath

    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    out: dict[tuple[str, str], Any] = {
        (md.__name__, n): getattr(md, n)
        for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                  "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    }
    # the save plans dcp.save may keep in the metadata (megatron-core's torch_dist saver does: all_local_plans):
    # dataclasses and enums of torch's planner, rebuilt from their fields
    from torch.distributed.checkpoint import planner as pl

    out.update({(pl.__name__, n): getattr(pl, n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                                             "LoadPlan", "ReadItem", "LoadItemType")
                if hasattr(pl, n)})
    out[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    out[("torch", "Size")] = torch.Size
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # layout by name, a dict lookup
    for cls in (PosixPath, WindowsPath, PurePosixPath, PureWindowsPath):  # StorageMeta.checkpoint_id
        out[("pathlib", cls.__name__)] = cls
    out[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return out


class _MetadataUnpickler(pickle.Unpickler):
    """torch's ``FileSystemReader.read_metadata`` runs ``pickle.load`` on ``.metadata``, which
    can execute any code the file names. This unpickler only resolves the globals a DCP
    ``.metadata`` written by torch contains (the metadata dataclasses, ``_StorageInfo``,
    ``torch.Size``, dtypes, layouts, paths), so a hostile file cannot run code; with
    ``trust_pickle`` the file is trusted and loaded the way torch loads it."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        obj = _MetadataUnpickler._allowed.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Disallowed(f"{module}.{name}")


class _Disallowed(pickle.UnpicklingError):
    pass


def read_metadata(folder: Path, trust_pickle: bool) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    p = folder / METADATA_NAME
    try:
        size = p.stat().st_size
        if size > _MAX_METADATA:
            raise CheckpointReadError(f"{p}: implausibly large DCP metadata ({size} bytes)")
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointReadError(f"{p}: cannot read DCP metadata: {e.strerror}") from None
    try:
        if trust_pickle:
            md = pickle.loads(data)  # as torch's FileSystemReader.read_metadata does (trusted)
        else:
            md = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Disallowed as e:
        raise UnsafePickleError(
            f"{p}: refusing to load: the DCP metadata needs {e}, which is not a DCP metadata class (it could run "
            "code); pass --trust-pickle (trust_pickle=True) only if you trust this folder"
        ) from None
    except Exception as e:  # a damaged pickle fails in any way
        raise CheckpointReadError(f"{p}: unreadable DCP metadata ({type(e).__name__}: {short_error(e)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointReadError(f"{p}: not DCP metadata (holds a {type(md).__name__})")
    if not isinstance(md.storage_data, dict):
        raise CheckpointReadError(
            f"{p}: DCP metadata without file storage information (storage_data is "
            f"{type(md.storage_data).__name__}); only folders written by FileSystemWriter are supported"
        )
    return md


def short_error(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return (s[:200] + "...") if len(s) > 200 else s


# --------------------------------------------------------------------------------------
# chunks and tensor references

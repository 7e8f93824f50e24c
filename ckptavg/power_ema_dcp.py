"""Sharded power EMAs: DTensor parameters (FSDP2 ``fully_shard``, tensor parallel) and DCP snapshots.

:class:`ckptavg.PowerEMA` keeps a DTensor's EMA as a plain tensor holding this rank's shard only
(no all-gather per step); :func:`wrap` turns it back into a DTensor with the parameter's mesh and
placements, and :func:`save_dcp_snapshot` writes one snapshot folder with
``torch.distributed.checkpoint`` (each rank its own part), which ``ckptavg merge --method power-ema``
reads like any DCP checkpoint. Nothing here imports ``torch.distributed.tensor`` unless a DTensor
can exist (the module is already loaded), so whole-model users pay nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError

__all__ = ["ShardSpec", "is_dtensor", "local_of", "save_dcp_snapshot", "shard_spec", "wrap"]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing DTensor when none can exist).

    Example::

        is_dtensor(next(model.parameters()))   # True after fully_shard(model)
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself.

    Example::

        local_of(param).shape   # (8, 8) for a (16, 8) parameter sharded over 2 ranks
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardSpec:
    """Where a DTensor's shard lives: its mesh, placements, global shape and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def shard_spec(t: torch.Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` of a DTensor, None for a plain tensor.

    Example::

        spec = shard_spec(param)   # ShardSpec(mesh=DeviceMesh(...), placements=(Shard(dim=0),), ...)
    """
    if not is_dtensor(t):
        return None
    return ShardSpec(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))  # type: ignore[attr-defined]


def wrap(local: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """``local`` as a DTensor laid out as ``spec`` says (no copy, no communication), or itself.

    Example::

        ema_param = wrap(ema_local, shard_spec(param))   # a DTensor like param, holding the EMA
    """
    if spec is None:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
    )


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def _is_writer() -> bool:
    if not _group_ready():
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def save_dcp_snapshot(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, DTensors and small values) as the DCP folder ``path``, atomically.

    Every rank of the default process group must call it with the same ``path`` (it is collective,
    like ``dcp.save``). The folder is written as ``.<name>.partial`` beside ``path`` (a name every
    rank agrees on; a leftover from a killed run is removed first) and renamed into place by rank 0
    once ``dcp.save`` returned everywhere, that is once its ``.metadata`` is written; an existing
    snapshot of the same name is replaced. Without a process group it runs in this process alone.

    Example::

        save_dcp_snapshot(Path("ema/ema-0.050-00001000"), {"model.weight": dt, "step": 1000})
    """
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")
    try:
        if _is_writer():
            path.parent.mkdir(parents=True, exist_ok=True)
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if _is_writer():
            _fsync_folder(tmp)
            if path.exists():
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
            _fsync_folder(path.parent)
        _barrier()
    except OSError as e:
        raise OutputError(f"{path}: cannot write the snapshot ({e.strerror or e})") from None


def _fsync_folder(folder: Path) -> None:
    """fsync every file in ``folder`` and the folder itself (the rename must not outrun the data)."""
    names = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    for p in [*names, folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

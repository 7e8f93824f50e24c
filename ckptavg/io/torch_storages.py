"""Which dtype and size each tensor of a torch archive really has when several tensors name one
storage record with different dtypes (or element counts).

``torch.load`` keeps the first storage it loads for a record (``loaded_storages`` in
``torch.serialization._load``: the first reference's dtype and element count, once its storage
holds data) and hands that typed storage to every later reference, whose tensor then takes
that dtype (``torch._utils._rebuild_tensor``). Loading to ``meta`` caches nothing (a meta
storage has no data pointer), so there each tensor keeps the dtype its own reference names.
:func:`effective_storages` recomputes what ``torch.load`` gives, from the order in which
torch created the storages (:class:`~ckptavg.io.torch_zip.SeqOffset`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointReadError
from .torch_zip import SeqOffset

__all__ = ["effective_storages"]

_MAX_OBJECTS = 10_000_000


def _tensors(obj: Any, where: str) -> list[torch.Tensor]:
    """Every tensor in the object tree: in containers, in objects' attributes, in tensors' own
    attributes (iterative: any depth, cycles)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is None or isinstance(o, (str, bytes, int, float)):
            continue
        seen.add(id(o))
        if len(seen) > _MAX_OBJECTS:
            raise CheckpointReadError(f"{where}: not a valid torch checkpoint (more than {_MAX_OBJECTS} objects)")
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, dict):
            stack.extend(dict.values(o))
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        attrs = getattr(o, "__dict__", None)
        if isinstance(attrs, dict):
            stack.extend(dict.values(attrs))
    return out


def effective_storages(obj: Any, calls: list[int], where: str) -> dict[int, tuple[torch.dtype, int]]:
    """``{id(tensor): (dtype, storage nbytes)}`` as ``torch.load`` gives them, for the tensors of
    ``obj`` (loaded to meta under :func:`~ckptavg.io.torch_zip.exact_offsets`, which gave
    ``calls``) whose storage record other references share with another dtype or size.

    Example::

        with exact_offsets() as calls:
            obj = torch.load(path, map_location="meta", weights_only=True)
        fixed = effective_storages(obj, calls, str(path))
    """
    refs: dict[int, tuple[torch.dtype, int, list[torch.Tensor]]] = {}  # seq -> (dtype, nbytes, tensors)
    for t in _tensors(obj, where):
        st = torch.Tensor.untyped_storage(t)  # (not an attribute the pickle may have set)
        off = getattr(st, "_checkpoint_offset", None)
        if isinstance(off, SeqOffset):
            refs.setdefault(off.seq, (t.dtype, st.nbytes(), []))[2].append(t)
    by_record: dict[int, list[int]] = {}
    for seq, off in enumerate(calls):
        by_record.setdefault(off, []).append(seq)
    out: dict[int, tuple[torch.dtype, int]] = {}
    for off, seqs in by_record.items():
        if len(seqs) < 2 or (all(s in refs for s in seqs) and len({refs[s][:2] for s in seqs}) < 2):
            continue  # one reference, or all alike
        winner: tuple[torch.dtype, int] | None = None
        for k, s in enumerate(seqs):
            if s not in refs:
                if winner is None and any(x in refs for x in seqs[k + 1 :]):
                    raise CheckpointReadError(
                        f"{where}: the storage record at byte {off} is named by several tensors, one of them outside "
                        "the checkpoint's object tree; which dtype torch.load gives the others cannot be told: "
                        "refusing to guess")
                continue
            dtype, nbytes, ts = refs[s]
            if winner is None:
                if nbytes > 0:  # torch keeps a storage only once it holds data
                    winner = (dtype, nbytes)
                continue
            for t in ts:
                out[id(t)] = winner
    return out

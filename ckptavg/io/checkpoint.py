"""What every reader returns: a :class:`Checkpoint` of :class:`TensorRef` s and its metadata.

A reader describes a checkpoint without reading tensor data: names, dtypes, shapes, where
each tensor's bytes are, and what the checkpoint records about itself (epoch, step,
metrics). The engine then asks each :class:`TensorRef` for byte ranges of its tensor.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError
from .files import InputFile

__all__ = ["TensorRef", "CheckpointMeta", "Checkpoint", "bytes_to_tensor"]

_MATERIALIZE_LOCK = threading.Lock()


@dataclass(eq=False)
class TensorRef:
    """One tensor of a checkpoint: what it is and where its bytes are.

    Contiguous tensors stored in a file are read straight from ``file`` at ``offset``.
    Strided views (a transposed tensor saved as is, a slice of a larger storage) and
    tensors of legacy files are materialised on first use and released by
    :meth:`release`. Readers of other layouts (sharded chunks) subclass this and
    override :meth:`read_into` and :meth:`materialize`.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: InputFile | None = None
    offset: int = 0  # absolute file offset of element 0 (contiguous file tensors)
    # strided views: (storage file offset, storage nbytes, storage_offset, stride), validated by the reader
    strided: tuple[int, int, int, tuple[int, ...]] | None = None
    tensor: torch.Tensor | None = None  # in-memory source (legacy files)
    alias_key: tuple | None = None  # equal keys within a checkpoint = the very same tensor
    byteswap: bool = False
    _cache: torch.Tensor | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def path(self) -> Path | None:
        return self.file.path if self.file is not None else None

    @property
    def direct(self) -> bool:
        """True when byte ranges can be read from the file without materialising."""
        return self.file is not None and self.strided is None and not self.byteswap

    def read_into(self, start: int, mv: memoryview) -> None:
        """Copy ``len(mv)`` bytes of the tensor's C-order data, from byte ``start``, into ``mv``."""
        if self.direct:
            assert self.file is not None
            self.file.pread_into(mv, self.offset + start)
            return
        with _MATERIALIZE_LOCK:  # two engine workers reading one tensor's slices build it once
            src = self.materialize()
        flat = src.reshape(-1).view(torch.uint8) if src.numel() else torch.empty(0, dtype=torch.uint8)
        if len(mv):
            torch.frombuffer(mv, dtype=torch.uint8).copy_(flat[start : start + len(mv)])

    def materialize(self) -> torch.Tensor:
        """The whole tensor as a contiguous CPU tensor (cached until :meth:`release`)."""
        if self._cache is not None:
            return self._cache
        if self.tensor is not None:
            t = self.tensor.detach().contiguous()
        else:
            assert self.file is not None
            if self.strided is not None and self.numel:
                st_off, _st_nbytes, soff, stride = self.strided
                isz = self.itemsize
                # the reader checked that the view lies inside its storage record, so this
                # span is bounded by bytes that exist in the file
                last = soff + sum((s - 1) * st for s, st in zip(self.shape, stride))
                lo, hi = soff * isz, (last + 1) * isz
                raw = bytearray(hi - lo)
                self.file.pread_into(memoryview(raw), st_off + lo)
                base = bytes_to_tensor(raw, self.dtype, self.byteswap)
                t = base.as_strided(self.shape, stride, 0).contiguous()
            elif self.numel == 0:
                t = torch.empty(self.shape, dtype=self.dtype)
            else:
                raw = bytearray(self.nbytes)
                self.file.pread_into(memoryview(raw), self.offset)
                t = bytes_to_tensor(raw, self.dtype, self.byteswap).reshape(self.shape)
        self._cache = t
        return t

    def release(self) -> None:
        self._cache = None


def bytes_to_tensor(raw: bytearray, dtype: torch.dtype, byteswap: bool) -> torch.Tensor:
    """A tensor over ``raw`` (native byte order after an optional swap)."""
    if not raw:
        return torch.empty(0, dtype=dtype)
    u8 = torch.frombuffer(raw, dtype=torch.uint8)
    if byteswap and dtype.itemsize > 1:
        u8 = u8.view(-1, dtype.itemsize).flip(1).contiguous().view(-1)
    return u8.view(dtype)


@dataclass(eq=False)
class FolderTensorRef(TensorRef):
    """A tensor of a folder checkpoint assembled from several byte ranges (DCP chunks, ZeRO
    partitions): never one direct range of one file; its path is the folder's."""

    folder: Path = field(default_factory=Path)

    @property
    def path(self) -> Path | None:
        return self.folder

    @property
    def direct(self) -> bool:
        return False

    def materialize(self) -> torch.Tensor:
        """The whole tensor, assembled through :meth:`read_into` (cached until :meth:`release`); for small tensors."""
        if self._cache is None:
            raw = bytearray(self.nbytes)
            self.read_into(0, memoryview(raw))
            t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            self._cache = t.view(self.dtype).reshape(self.shape)
        return self._cache


@dataclass
class CheckpointMeta:
    """What a checkpoint records about itself (or what its file name says)."""

    epoch: int | float | None = None
    step: int | None = None
    epoch_from: str | None = None  # "recorded" | "name"
    step_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    name_numbers: tuple[int, ...] = ()
    # power-EMA snapshot profile (EDM2): the relative width / exponent it records
    sigma_rel: float | None = None
    gamma: float | None = None
    # ckptavg's own provenance, when the file is an earlier ckptavg output
    ckptavg_output: bool = False


@dataclass(eq=False)
class Checkpoint:
    """An opened checkpoint: its tensors (in the file's order) and metadata.

    Example::

        ckpt = open_checkpoint("runs/epoch=3-step=300.ckpt")
        print(ckpt.format, ckpt.weights_key, ckpt.meta.epoch, len(ckpt.tensors))
        w = ckpt.tensors["layer.weight"].materialize()
        ckpt.close()
    """

    path: Path
    format: str  # "torch" | "torch-legacy" | "safetensors" | "hf-folder" | "diffusers" | "dcp" | "megatron" | "peft"
    #: | "deepspeed"
    tensors: dict[str, TensorRef]
    meta: CheckpointMeta
    weights_key: str | None = None  # where the state dict was found (dotted), None = top level
    size: int = 0  # bytes on disk
    obj: Any = None  # torch checkpoints: the full object tree, tensors on the meta device
    files: list[InputFile] = field(default_factory=list)
    st_metadata: dict[str, str] | None = None
    adapter: dict[str, Any] | None = None  # a PEFT adapter folder's adapter_config.json
    #: Megatron ``torch_dist``: the model's byte entries (``_extra_state``), never loaded: name -> (file, offset,
    #: length)
    byte_entries: dict[str, tuple[Any, int, int]] = field(default_factory=dict)
    #: what the plan should say about how this checkpoint was read (one of several models, ...)
    notes: list[str] = field(default_factory=list)
    #: scaled float8 weights were dequantized (:mod:`ckptavg.io.fp8`): a folder output drops ``quantization_config``
    dequantized: bool = False
    _tensor_source: dict[int, TensorRef] = field(default_factory=dict, repr=False)
    _make_ref: Any = field(default=None, repr=False)

    def ref_for(self, t: torch.Tensor, name: str = "") -> TensorRef:
        """The :class:`TensorRef` for a (meta) tensor anywhere in ``obj`` (torch formats)."""
        ref = self._tensor_source.get(id(t))
        if ref is None and self._make_ref is not None:
            ref = self._make_ref(t, name)
        if ref is None:
            raise CheckpointReadError(f"{self.path}: internal: tensor {name!r} has no source")
        return ref

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Read PyTorch Distributed Checkpoint (DCP) folders, streaming.

A DCP folder (``torch.distributed.checkpoint.save``, FSDP/FSDP2, torchtitan) holds
``.metadata`` (a pickled ``torch.distributed.checkpoint.metadata.Metadata``) and data files
``__{rank}_{n}.distcp``. The metadata maps every flattened key (``model.layer.weight``) to
its dtype, global size and chunks (offsets and sizes in the global tensor), and every chunk
to ``(file, byte offset, length)``. With torch's default serialization each chunk is a
complete ``torch.save`` zip of the chunk tensor placed at that offset; non-tensor entries
(``step``) are ``torch.save`` blobs of the object.

Opening reads ``.metadata`` and stats the data files, nothing else. Reading a byte range of
a global tensor gathers it from the chunks that overlap it with positioned reads, so
memory stays a small multiple of the request whatever the tensor or file sizes.

Example::

    from ckptavg.io.dcp_in import open_dcp
    ckpt = open_dcp(Path("checkpoint/step-1000"))
    print(ckpt.meta.step, list(ckpt.tensors)[:3])
    w = ckpt.tensors["layers.0.attention.wq.weight"].materialize()
    ckpt.close()
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError
from .checkpoint import Checkpoint, CheckpointMeta, FolderTensorRef, TensorRef
from .dcp_checks import checked_metadata, chunk_storage, shown
from .dcp_metadata import METADATA_NAME, read_metadata
from .dcp_recorded import recorded_meta
from .files import InputFile, input_file
from .metadata import apply_name_metadata
from .urls import as_path

__all__ = ["is_dcp_folder", "open_dcp", "DcpTensorRef", "METADATA_NAME"]

_MIN_BUDGET = 256 << 10  # temporaries of a strided gather: at most max(2 x request, this) bytes
# Top-level entries of training checkpoints that are not model weights (torchtitan flattens the
# model's keys to the top level beside these).
_NOT_WEIGHTS = frozenset({"optimizer", "optimizers", "optim", "optim_state", "lr_scheduler", "lr_schedulers",
                          "scheduler", "train_state", "dataloader", "data_loader", "rng_state", "rng", "extra_state"})
_OPTIMIZER_N = re.compile(r"^optimizer_\d+$")  # Lightning's sharded checkpoints: optimizer_0, optimizer_1...
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def is_dcp_folder(path: Path) -> bool:
    """True if ``path`` is a folder holding a DCP ``.metadata`` file.

    Example::

        is_dcp_folder(Path("checkpoint/step-1000"))  # True for a dcp.save() folder
    """
    return path.is_dir() and (path / METADATA_NAME).is_file()


# --------------------------------------------------------------------------------------
# .metadata: a pickle, loaded with a restricted unpickler


@dataclass(eq=False)
class _Chunk:
    """One stored chunk of a global tensor: where it sits in the tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: InputFile
    blob: int  # absolute file offset of the chunk's torch.save blob
    length: int
    # filled from the blob's own header on first use
    data: int = -1  # absolute file offset of the chunk storage's byte 0
    soff: int = 0  # storage offset (elements) of element 0
    stride: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(eq=False)
class DcpTensorRef(FolderTensorRef):
    """A global tensor of a DCP folder, assembled on demand from its stored chunks.

    :meth:`read_into` serves any C-order byte range of the global tensor by gathering,
    from each overlapping chunk, just the part the range needs (positioned reads; at most
    a few times the request size in temporary memory).

    Example::

        ref = open_dcp(Path("ckpt")).tensors["layer.weight"]
        buf = bytearray(64)
        ref.read_into(0, memoryview(buf))  # the first 64 bytes of the full tensor
    """

    chunks: list[_Chunk] = field(default_factory=list)
    fqn: str = ""  # the key in the DCP metadata (before the weights prefix was removed)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _err(self, msg: str) -> CheckpointReadError:
        return CheckpointReadError(f"{self.folder}: tensor {shown(self.fqn)}: {msg}")

    def read_into(self, start: int, mv: memoryview) -> None:
        """Copy ``len(mv)`` bytes of the global tensor's C-order data, from byte ``start``, into ``mv``."""
        n = len(mv)
        if n == 0:
            return
        if start < 0 or start + n > self.nbytes:
            raise ValueError(f"byte range {start}:{start + n} outside tensor {self.name!r} ({self.nbytes} bytes)")
        isz = self.itemsize
        e0, e1 = start // isz, -(-(start + n) // isz)
        if e0 * isz == start and e1 * isz == start + n:
            self._read_elems(e0, e1, mv)
            return
        tmp = bytearray((e1 - e0) * isz)  # an unaligned range: read whole elements around it
        self._read_elems(e0, e1, memoryview(tmp))
        mv[:] = memoryview(tmp)[start - e0 * isz : start - e0 * isz + n]

    # -- assembling a range

    def _read_elems(self, e0: int, e1: int, mv: memoryview) -> None:
        isz = self.itemsize
        dest = torch.frombuffer(mv, dtype=torch.uint8)
        base = dest.data_ptr()
        budget = max(2 * len(mv), _MIN_BUDGET)
        pos = 0
        for box in _boxes(e0, e1, self.shape):
            size = [hi - lo for lo, hi in box]
            cnt = math.prod(size)
            dbox = dest[pos * isz : (pos + cnt) * isz].view(*size, isz)
            got = 0
            for c in self.chunks:
                inter = []
                for (lo, hi), o, s in zip(box, c.offsets, c.sizes):
                    a, b = max(lo, o), min(hi, o + s)
                    if a >= b:
                        break
                    inter.append((a, b))
                else:
                    sub = dbox[tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(inter, box))]
                    self._gather(c, [a - o for (a, _), o in zip(inter, c.offsets)],
                                 [b - a for a, b in inter], sub, mv, base, budget)
                    got += math.prod(b - a for a, b in inter)
            if got != cnt:  # validated at open; a guard against a bug, not a user error
                raise self._err(f"internal: chunks cover {got} of {cnt} elements of a range")
            pos += cnt

    def _gather(self, c: _Chunk, lo: list[int], ext: list[int], dest: torch.Tensor, mv: memoryview,
                base: int, budget: int) -> None:
        """Copy chunk-local box ``lo``/``ext`` of chunk ``c`` into ``dest`` (uint8, shape ext + [itemsize])."""
        if c.data < 0:
            with self._lock:
                if c.data < 0:
                    self._parse_chunk(c)
        isz = self.itemsize
        stride = c.stride
        first = c.soff + sum(a * s for a, s in zip(lo, stride))
        span = sum((e - 1) * s for e, s in zip(ext, stride)) + 1
        numel = math.prod(ext)
        if span != numel and span * isz > budget:
            # a strided chunk (stored transposed, say) whose bytes for this box are spread
            # out: split the box along its most spread-out dimension until a piece's
            # bytes fit the budget, so temporaries stay bounded by the request size
            d = max((k for k in range(len(ext)) if ext[k] > 1), key=lambda k: stride[k])
            half = ext[d] // 2
            lo2, ext1, ext2 = list(lo), list(ext), list(ext)
            ext1[d], ext2[d] = half, ext[d] - half
            lo2[d] += half
            self._gather(c, lo, ext1, dest.narrow(d, 0, half), mv, base, budget)
            self._gather(c, lo2, ext2, dest.narrow(d, half, ext[d] - half), mv, base, budget)
            return
        at = c.data + first * isz
        if span == numel and _c_order(ext, stride) and dest.is_contiguous():
            # the chunk's bytes for this box are exactly the destination's bytes: read in place
            off = dest.data_ptr() - base
            self._pread(c, mv[off : off + numel * isz], at)
            return
        tmp = bytearray(span * isz)
        self._pread(c, memoryview(tmp), at)
        src = torch.frombuffer(tmp, dtype=torch.uint8).as_strided(
            (*ext, isz), (*(s * isz for s in stride), 1), 0
        )
        dest.copy_(src)

    def _pread(self, c: _Chunk, mv: memoryview, at: int) -> None:
        if at < c.blob or at + len(mv) > c.blob + c.length:
            raise self._err(f"chunk at {list(c.offsets)} in {c.file.path.name} reads outside its stored bytes")
        try:
            c.file.pread_into(mv, at)
        except CheckpointReadError as e:
            raise self._err(str(e).removeprefix(f"{c.file.path}: ") + f" ({c.file.path.name})") from None

    def _parse_chunk(self, c: _Chunk) -> None:
        """Locate the chunk tensor's bytes inside its ``torch.save`` blob.

        torch's own ``torch.load(..., map_location="meta", weights_only=True)`` on a view of
        the blob (torch's ``_create_file_view``, as ``FileSystemReader`` uses) gives the
        chunk's dtype, shape, strides and the record offset of its storage without reading
        the data; only the data bytes are then read by hand, piecewise.
        """
        where = f"{self.folder}: tensor {shown(self.fqn)}: chunk at {list(c.offsets)} in {c.file.path.name}"
        try:
            c.file.pread_into(memoryview(head := bytearray(4)), c.blob)
        except CheckpointReadError as e:
            raise CheckpointReadError(f"{where}: {str(e).removeprefix(f'{c.file.path}: ')}") from None
        if bytes(head) != b"PK\x03\x04":
            raise CheckpointReadError(
                f"{where} is not a torch.save blob (a DCP serialization format ckptavg does not read, e.g. "
                "safetensors-format DCP)"
            )
        t, data = chunk_storage(c.file, c.blob, c.length, where)
        if t.dtype != self.dtype or tuple(t.shape) != c.sizes:
            raise CheckpointReadError(
                f"{where} holds a {str(t.dtype).removeprefix('torch.')} {list(t.shape)} tensor but the metadata says "
                f"{str(self.dtype).removeprefix('torch.')} {list(c.sizes)}"
            )
        st = torch.Tensor.untyped_storage(t)
        stride = tuple(t.stride())
        if any(s < 0 for s in stride):
            raise CheckpointReadError(f"{where}: unsupported chunk layout")
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, stride)) if t.numel() else 0
        if (last + 1) * t.element_size() > st.nbytes() or data + st.nbytes() > c.blob + c.length:
            raise CheckpointReadError(f"{where}: damaged chunk (its tensor runs past its stored bytes)")
        c.stride, c.soff, c.data = stride, int(t.storage_offset()), data


def _c_order(ext: list[int], stride: tuple[int, ...]) -> bool:
    acc = 1
    for e, s in zip(reversed(ext), reversed(stride)):
        if e != 1 and s != acc:
            return False
        acc *= e
    return True


def _boxes(a: int, b: int, shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Split the C-order element range ``[a, b)`` of ``shape`` into boxes (per-dim ranges)
    whose C-order elements follow each other in that range (at most 2 per dimension)."""
    if a >= b:
        return []
    if not shape:
        return [[]]
    inner = math.prod(shape[1:])
    r0, o0 = divmod(a, inner)
    r1, o1 = divmod(b, inner)
    if r0 == r1:
        return [[(r0, r0 + 1), *rest] for rest in _boxes(o0, o1, shape[1:])]
    out: list[list[tuple[int, int]]] = []
    if o0:
        out += [[(r0, r0 + 1), *rest] for rest in _boxes(o0, inner, shape[1:])]
        r0 += 1
    if r1 > r0:
        out.append([(r0, r1), *((0, s) for s in shape[1:])])
    if o1:
        out += [[(r1, r1 + 1), *rest] for rest in _boxes(0, o1, shape[1:])]
    return out


# --------------------------------------------------------------------------------------
# opening a folder


def open_dcp(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Open a DCP folder as one checkpoint (format ``"dcp"``), reading only ``.metadata``.

    Tensor names are the flattened keys. ``key="model"`` keeps the keys under ``model.``
    without that prefix; by default the ``model.`` subtree is used when there is one, else
    every tensor key outside training-state entries (optimizer, lr_scheduler, train_state,
    dataloader...). Step and epoch come from the checkpoint's own ``step``/``epoch`` or
    torchtitan's ``train_state`` entries (only those tiny items are read), else from the
    folder name (``step-1000``, ``epoch_3``).

    Example::

        ckpt = open_dcp(Path("outputs/checkpoint/step-1000"))
        print(ckpt.format, ckpt.weights_key, ckpt.meta.step, len(ckpt.tensors))
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = as_path(path)
    if not is_dcp_folder(folder):
        raise CheckpointReadError(f"{folder}: not a DCP checkpoint folder (no {METADATA_NAME})")
    sdm, index = checked_metadata(folder / METADATA_NAME, read_metadata(folder, trust_pickle))
    tensor_keys = [k for k, v in sdm.items() if isinstance(v, TensorStorageMetadata)]
    prefix, wkey = _choose_subtree(folder, tensor_keys, key)
    files: dict[str, InputFile] = {}

    def file_for(rel: str, fqn: str) -> InputFile:
        if rel not in files:
            p = folder / rel
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise CheckpointReadError(f"{folder}: tensor {shown(fqn)}: data file {shown(rel)} is missing") from None
            except OSError as e:
                raise CheckpointReadError(f"{folder}: tensor {shown(fqn)}: cannot access {shown(rel)}: "
                                          f"{e.strerror}") from None
            files[rel] = input_file(p, size)
        return files[rel]

    def locate(fqn: str, offsets: tuple[int, ...] | None) -> tuple[InputFile, int, int]:
        info = index.get((fqn, offsets))
        if info is None:
            at = f" chunk at {list(offsets)}" if offsets is not None else ""
            raise CheckpointReadError(f"{folder}: tensor {shown(fqn)}:{at} has no storage entry in the metadata")
        rel, off, length, transforms = info
        if transforms:
            raise CheckpointReadError(
                f"{folder}: tensor {shown(fqn)} is stored with transforms ({shown(transforms)}: compression or "
                "similar), which ckptavg does not read")
        f = file_for(rel, fqn)
        if off + length > f.size:
            raise CheckpointReadError(
                f"{folder}: tensor {shown(fqn)}: data file {shown(rel)} ended early (truncated?): needs bytes up to "
                f"{off + length}, has {f.size}"
            )
        return f, off, length

    tensors: dict[str, TensorRef] = {}
    for fqn in tensor_keys:
        if prefix is not None and not fqn.startswith(prefix):
            continue
        if prefix is None and _training_state(fqn):
            continue
        name = fqn[len(prefix) :] if prefix else fqn
        tensors[name] = _make_ref(folder, fqn, name, sdm[fqn], locate)
    if not tensors:
        raise CheckpointReadError(f"{folder}: DCP checkpoint holds no model tensors")

    size = sum(f.size for f in files.values())
    ckpt = Checkpoint(path=folder, format="dcp", tensors=tensors, meta=CheckpointMeta(), weights_key=wkey,
                      size=size, files=list(files.values()))
    try:
        recorded_meta(ckpt, folder, sdm, lambda fqn, smd: _make_ref(folder, fqn, fqn, smd, locate), locate)
        if ckpt.format == "megatron":  # its byte entries (_extra_state) are copied into a Megatron output
            ckpt.byte_entries = _byte_entries(sdm, prefix, locate)
            ckpt.files = list(files.values())
        apply_name_metadata(ckpt)
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _byte_entries(sdm: dict[str, Any], prefix: str | None, locate: Any) -> dict[str, tuple[InputFile, int, int]]:
    """The model's byte entries (not training state), by output name: where their bytes lie (checked
    against the data file's size by ``locate``), never loaded."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out: dict[str, tuple[InputFile, int, int]] = {}
    for fqn, md in sdm.items():
        if not isinstance(md, BytesStorageMetadata):
            continue
        if prefix is not None and not fqn.startswith(prefix):
            continue
        if prefix is None and _training_state(fqn):
            continue
        out[fqn[len(prefix):] if prefix else fqn] = locate(fqn, None)
    return out


def _choose_subtree(folder: Path, keys: list[str], key: str | None) -> tuple[str | None, str | None]:
    """(prefix to keep and strip, weights_key) for ``key``, or the automatic choice."""
    if key:
        prefix = key.rstrip(".") + "."
        if not any(k.startswith(prefix) for k in keys):
            roots = sorted({k.split(".", 1)[0] for k in keys if "." in k})
            raise CheckpointReadError(
                f"{folder}: key {key!r} not found: no tensor key starts with {prefix!r}"
                + (f" (top-level entries: {', '.join(shown(r, 40) for r in roots[:20])})" if roots else "")
            )
        return prefix, key.rstrip(".")
    for root in ("model", "state_dict"):  # Lightning's sharded .ckpt/ folders: "model" (FSDP), "state_dict" (FSDP2)
        pre = root + "."
        if not any(k.startswith(pre) for k in keys):
            continue
        # a "model" entry holding the model (a Lightning or DCP state dict {"model": ..., "optimizer": ...}),
        # unless the model itself is flattened at the top level and has a submodule named "model"
        # (Hugging Face style "model.layers.*" beside "lm_head.weight", as torchtitan saves it): then
        # every tensor outside the training state is the model's, names kept
        outside = [k for k in keys if not k.startswith(pre) and not _training_state(k)]
        if not outside or _mirrors(outside, {k[len(pre):] for k in keys if k.startswith(pre)}):
            return pre, root
    return None, None


def _training_state(fqn: str) -> bool:
    """Whether a top-level DCP key belongs to the training state, not the model (``optimizer``,
    Lightning's ``optimizer_0``, ``lr_scheduler``, Megatron's ``rng_state/shard_...``...)."""
    root = fqn.split(".", 1)[0].split("/", 1)[0]
    return root in _NOT_WEIGHTS or bool(_OPTIMIZER_N.match(root))


def _mirrors(outside: list[str], model_names: set[str]) -> bool:
    """Whether the tensors outside ``model.`` are other weight sets of the same model (``ema.*`` with
    the model's own names), rather than the model's own top-level tensors (``lm_head.weight``)."""
    roots: dict[str, set[str]] = {}
    for k in outside:
        root, _, rest = k.partition(".")
        roots.setdefault(root, set()).add(rest)
    return all(rest and rest <= model_names for rest in roots.values())


def _make_ref(folder: Path, fqn: str, name: str, tmd: Any, locate: Any) -> DcpTensorRef:
    """A reference to a tensor entry whose types :func:`checked_metadata` has checked."""
    dtype = tmd.properties.dtype
    where = f"{folder}: tensor {shown(fqn)}"
    if dtype in _QUANTIZED:
        raise CheckpointReadError(f"{where} is quantized ({dtype}); dequantize the model before averaging")
    layout = getattr(tmd.properties, "layout", torch.strided)
    if layout != torch.strided:
        raise CheckpointReadError(f"{where} has layout {shown(layout)}; only dense tensors are supported")
    shape = tuple(tmd.size)
    raw = [(tuple(c.offsets), tuple(c.sizes)) for c in tmd.chunks]
    numel = math.prod(shape)
    vol = 0
    for off, sz in raw:
        if any(o + s > g for o, s, g in zip(off, sz, shape)):
            raise CheckpointReadError(
                f"{where}: chunk at {list(off)} of size {list(sz)} lies outside the tensor's size {list(shape)}"
            )
        vol += math.prod(sz)
    raw = [r for r in raw if math.prod(r[1]) > 0 or not shape]
    _check_disjoint(where, raw)
    if vol != numel:
        raise CheckpointReadError(
            f"{where}: the chunks do not cover the tensor (gap): {vol} of {numel} elements stored"
        )
    chunks = []
    for off, sz in raw:
        f, blob, length = locate(fqn, off)
        if length < math.prod(sz) * dtype.itemsize:
            raise CheckpointReadError(f"{where}: chunk at {list(off)} needs {math.prod(sz) * dtype.itemsize} bytes "
                                      f"but the metadata gives it {length}")
        chunks.append(_Chunk(off, sz, f, blob, length))
    return DcpTensorRef(name=name, dtype=dtype, shape=shape, folder=folder, chunks=chunks, fqn=fqn)


def _check_disjoint(where: str, chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Refuse overlapping chunks: a sweep along the dimension the chunks are split on (the one with
    the most distinct start offsets), so that chunks of one tensor-parallel or FSDP split are each
    compared with their neighbours only (10,000 chunks split on dimension 1: milliseconds)."""
    if not chunks or not chunks[0][0]:
        if len(chunks) > 1:
            raise CheckpointReadError(f"{where}: the chunks overlap ({len(chunks)} chunks of a scalar)")
        return
    d = max(range(len(chunks[0][0])), key=lambda k: len({o[k] for o, _ in chunks}))
    order = sorted(chunks, key=lambda c: c[0][d])
    for i, (oa, sa) in enumerate(order):
        for ob, sb in order[i + 1 :]:
            if ob[d] >= oa[d] + sa[d]:
                break
            if all(max(x, y) < min(x + m, y + n) for x, m, y, n in zip(oa, sa, ob, sb)):
                raise CheckpointReadError(f"{where}: the chunks at {list(oa)} and {list(ob)} overlap")

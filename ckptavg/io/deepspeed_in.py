"""DeepSpeed ZeRO checkpoint folders: the fp32 master weights, streamed out of the optimizer partitions.

``engine.save_checkpoint(ROOT, tag="global_stepN")`` writes ``ROOT/latest`` (the tag, as text) and
``ROOT/global_stepN/`` holding ``torch.save`` files:

* ``mp_rank_00_model_states.pt`` (ZeRO stage 1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per
  data-parallel rank R (stage 3): ``module`` (the state dict in the training dtype; under stage 3 the
  parameters there are empty), ``param_shapes`` (per parameter group, name -> shape, in the order of
  the flat buffers), ``buffer_names``, ``frozen_param_shapes`` / ``frozen_param_fragments``,
  ``shared_params`` (name -> the name it shares storage with), ``global_steps``;
* ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank R: ``optimizer_state_dict`` with
  ``zero_stage``, ``partition_count`` and the fp32 master weights: ``single_partition_of_fp32_groups``
  (stage 1/2: per group, rank R's slice of the group's flat buffer; the flat buffers of all ranks
  concatenated hold the parameters one after another, each followed by
  ``param_alignment_paddings[g][i]`` elements, the group's end padding dropped when saved) or
  ``fp32_flat_groups`` (stage 3: each parameter is split in ``ceil(numel / world)`` elements per rank,
  the last rank's part padded; a rank's groups concatenated hold its parts one after another).

A ``global_stepN/`` folder is one checkpoint: each parameter is a :class:`ZeroTensorRef` reading its
elements as byte ranges of the partitions (possibly in several ranks' files); buffers and frozen
parameters come from the model states. The files are described with torch's meta-device loading under
the weights-only unpickler; the classes DeepSpeed pickles there (its loss scaler, the ZeRO stage enum,
``fragment_address``) are replaced by inert stand-ins (:data:`DEEPSPEED_SAFE_GLOBALS`), so deepspeed is
never imported. Sizes (partition lengths against ``param_shapes``) are checked before any data is read.
This layout was worked out from DeepSpeed's ``zero_to_fp32.py`` and checked against its
``get_fp32_state_dict_from_zero_checkpoint`` (tests/test_deepspeed.py).

Example::

    ckpt = open_deepspeed(Path("ckpts/global_step300"), key=None, trust_pickle=False)
    ckpt.meta.step, sorted(ckpt.tensors)[:2]  # 300, ['0.bias', '0.weight']
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError, UnsafePickleError
from .checkpoint import Checkpoint, CheckpointMeta, FolderTensorRef, TensorRef
from .files import InputFile, input_file
from .metadata import trainer_state
from .torch_in import open_torch_tree

__all__ = ["is_deepspeed_folder", "open_deepspeed", "is_deepspeed_root", "checkpoints_of_deepspeed_root", "single_tag",
           "open_single_tag",
           "ZeroTensorRef", "DEEPSPEED_SAFE_GLOBALS"]

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
_OPTIM_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MP_RE = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_(?:model|optim)_states\.pt$")
_STEP_RE = re.compile(r"^global_step(\d+)$")
LATEST = "latest"
_MAX_LATEST = 1 << 10


class _Inert:
    """Stands in for a DeepSpeed class that only holds attributes (its loss scaler, ``fragment_address``):
    what the pickle sets is kept in ``state``, nothing runs."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _zero_stage(value: Any) -> int:
    """Stands in for ``ZeroStageEnum`` (an ``int`` enum, pickled as ``ZeroStageEnum(value)``)."""
    if type(value) is not int or not 0 <= value <= 3:
        raise ValueError(f"not a ZeRO stage: {value!r}")
    return value


#: what DeepSpeed pickles into its checkpoint files beyond torch's weights-only allowlist, each mapped to
#: an inert stand-in (no DeepSpeed code is imported or run)
DEEPSPEED_SAFE_GLOBALS: list[Any] = [
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Inert, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


@dataclass(eq=False)
class ZeroTensorRef(FolderTensorRef):
    """A parameter assembled from byte ranges of flat partitions: ``segments`` (file, offset, bytes) in order."""

    segments: list[tuple[InputFile, int, int]] = field(default_factory=list)

    def read_into(self, start: int, mv: memoryview) -> None:
        """Copy ``len(mv)`` bytes of the tensor's C-order data, from byte ``start``, into ``mv``."""
        end, pos = start + len(mv), 0
        if start < 0 or end > self.nbytes:
            raise ValueError(f"byte range {start}:{end} outside tensor {self.name!r} ({self.nbytes} bytes)")
        for f, off, n in self.segments:
            a, b = max(start, pos), min(end, pos + n)
            if a < b:
                f.pread_into(mv[a - start : b - start], off + a - pos)
            pos += n



# --------------------------------------------------------------------------------------
# finding checkpoints


def _model_states(folder: Path) -> Path | None:
    for name in (MODEL_STATES, ZERO3_MODEL_STATES.format(0)):
        if (folder / name).is_file():
            return folder / name
    return None


def is_deepspeed_folder(folder: Path) -> bool:
    """Whether ``folder`` is a DeepSpeed checkpoint (``global_stepN/``: it holds DeepSpeed's model states)."""
    try:
        return _model_states(folder) is not None
    except OSError:
        return False


def is_deepspeed_root(folder: Path) -> bool:
    """Whether ``folder`` is a DeepSpeed checkpoint root (``latest`` beside checkpoint folders)."""
    try:
        return (folder / LATEST).is_file() and any(q.is_dir() and is_deepspeed_folder(q) for q in folder.iterdir())
    except OSError:
        return False


def single_tag(folder: Path) -> Path | None:
    """The one checkpoint of a root that holds exactly one, the one ``latest`` names (a Hugging Face
    Trainer's ``checkpoint-N/`` under DeepSpeed: ``global_stepN/`` beside ``latest``), else None."""
    try:
        if not (folder / LATEST).is_file():
            return None
        tags = [q for q in folder.iterdir() if q.is_dir() and is_deepspeed_folder(q)]
        text = (folder / LATEST).read_bytes()[:_MAX_LATEST].decode("utf-8", "replace").strip()
    except OSError:
        return None
    return tags[0] if len(tags) == 1 and tags[0].name == text else None


def _step_key(p: Path) -> tuple[int, int, str]:
    m = _STEP_RE.match(p.name)
    return (0, int(m.group(1)), "") if m else (1, 0, p.name)


def checkpoints_of_deepspeed_root(root: Path) -> list[Path]:
    """The checkpoint folders of a DeepSpeed root, ``global_stepN`` in step order (other tags after them),
    after checking that the tag ``latest`` names is one of them."""
    try:
        text = (root / LATEST).read_bytes()[:_MAX_LATEST].decode("utf-8", "replace").strip()
        found = sorted((q for q in root.iterdir() if q.is_dir() and is_deepspeed_folder(q)), key=_step_key)
    except OSError as e:
        raise CheckpointReadError(f"{root}: cannot read the DeepSpeed checkpoint root: {e.strerror}") from None
    if not text or "/" in text or not any(q.name == text for q in found):
        raise CheckpointReadError(f"{root}: 'latest' names {text[:100]!r}, which is not a checkpoint folder here "
                                  "(an interrupted save?); name the global_stepN folders to use")
    return found


# --------------------------------------------------------------------------------------
# reading


def _open_pt(path: Path, trust_pickle: bool, opened: list[InputFile]) -> Checkpoint:
    """One DeepSpeed ``torch.save`` file's object tree (tensors on meta), weights-only with the stand-ins;
    full unpickling only when that is refused and ``trust_pickle`` is given."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot access: {e.strerror}") from None
    f = input_file(path, size)
    opened.append(f)
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            ckpt = open_torch_tree(f, False)
    except UnsafePickleError:
        if not trust_pickle:
            raise
        ckpt = open_torch_tree(f, True)
    if not isinstance(ckpt.obj, Mapping):
        raise CheckpointReadError(f"{path}: holds a {type(ckpt.obj).__name__}, not DeepSpeed's checkpoint dict")
    return ckpt


def _get(ckpt: Checkpoint, key: str, kind: type | tuple[type, ...], where: Any = None) -> Any:
    obj = ckpt.obj if where is None else where
    v = obj.get(key) if isinstance(obj, Mapping) else None
    if not isinstance(v, kind):
        raise CheckpointReadError(f"{ckpt.path}: not a DeepSpeed checkpoint file ({key!r} missing or malformed)")
    return v


def _shape(ckpt: Checkpoint, name: str, s: Any) -> tuple[int, ...]:
    if not isinstance(s, (tuple, list)) or not all(type(n) is int and n >= 0 for n in s):
        raise CheckpointReadError(f"{ckpt.path}: param_shapes: parameter {name!r} has no valid shape ({s!r:.80})")
    return tuple(s)


def _flat_run(ckpt: Checkpoint, t: Any, what: str) -> tuple[InputFile, int, int, torch.dtype]:
    """(file, byte offset, numel, dtype) of a 1-D partition stored contiguously in ``ckpt``'s file."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.dtype.is_floating_point:
        raise CheckpointReadError(f"{ckpt.path}: {what} is not a 1-D floating-point tensor")
    ref = ckpt.ref_for(t, what)
    if not ref.direct or ref.file is None:
        raise CheckpointReadError(f"{ckpt.path}: {what} is not stored contiguously")
    return ref.file, ref.offset, ref.numel, ref.dtype


def _cut(runs: list[tuple[InputFile, int, int, torch.dtype]], start: int, numel: int
         ) -> list[tuple[InputFile, int, int]]:
    """Byte segments of elements ``[start, start + numel)`` of the runs concatenated (checked to fit)."""
    out: list[tuple[InputFile, int, int]] = []
    pos, end = 0, start + numel
    for f, off, n, dtype in runs:
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            isz = dtype.itemsize
            out.append((f, off + (a - pos) * isz, (b - a) * isz))
        pos += n
    return out


def _ref(folder: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...],
         segments: list[tuple[InputFile, int, int]]) -> TensorRef:
    if len(segments) == 1:
        f, off, _n = segments[0]
        ref: TensorRef = TensorRef(name=name, dtype=dtype, shape=shape, file=f, offset=off)
    else:
        ref = ZeroTensorRef(name=name, dtype=dtype, shape=shape, folder=folder, segments=segments)
    ref.alias_key = ("deepspeed", name)
    return ref


def _optim_files(folder: Path) -> list[Path]:
    found: dict[int, Path] = {}
    try:
        names = [q.name for q in folder.iterdir()]
    except OSError as e:
        raise CheckpointReadError(f"{folder}: cannot list folder: {e.strerror}") from None
    for n in names:
        if (m := _MP_RE.match(n)) and int(m.group(1)) != 0:
            raise CheckpointReadError(f"{folder}: a model-parallel DeepSpeed checkpoint ({n}); ckptavg reads "
                                      "data-parallel ZeRO checkpoints (mp_rank_00 only)")
        if m := _OPTIM_RE.match(n):
            found[int(m.group(1))] = folder / n
    if not found:
        raise CheckpointReadError(f"{folder}: no zero_pp_rank_R_mp_rank_00_optim_states.pt files, where a ZeRO "
                                  "checkpoint keeps its fp32 weights (an incomplete copy? without ZeRO, name "
                                  f"{MODEL_STATES}: its 'module' is the model)")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise CheckpointReadError(f"{folder}: zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt is missing "
                                  f"(found ranks {', '.join(map(str, sorted(found)))})")
    return [found[r] for r in sorted(found)]


def _optim_state(ckpt: Checkpoint, nfiles: int) -> tuple[int, Mapping]:
    osd = _get(ckpt, "optimizer_state_dict", Mapping)
    stage = osd.get("zero_stage")
    if type(stage) is not int or not 1 <= stage <= 3:
        raise CheckpointReadError(f"{ckpt.path}: no ZeRO stage 1-3 in its optimizer state (a DeepSpeed BF16 "
                                  "optimizer or another layout ckptavg does not read)")
    count = osd.get("partition_count")
    counts = count if isinstance(count, list) else [count]
    if not counts or any(type(c) is not int or c != nfiles for c in counts):
        if len(counts) == 1 and type(counts[0]) is int and counts[0] > nfiles:
            raise CheckpointReadError(f"{ckpt.path.parent}: zero_pp_rank_{nfiles}_mp_rank_00_optim_states.pt is "
                                      f"missing (saved by {counts[0]} data-parallel ranks, {nfiles} files here)")
        raise CheckpointReadError(f"{ckpt.path.parent}: saved by {count!r:.60} data-parallel ranks but {nfiles} "
                                  "optim_states files are here (an overwritten checkpoint? expert-parallel "
                                  "groups are not supported)")
    return stage, osd


def _groups(ckpt: Checkpoint, osd: Mapping, key: str, n: int) -> list[tuple[InputFile, int, int, torch.dtype]]:
    flat = osd.get(key)
    if not isinstance(flat, list) or len(flat) != n:
        raise CheckpointReadError(f"{ckpt.path}: {key} is missing or does not hold {n} parameter groups")
    return [_flat_run(ckpt, t, f"{key}[{g}]") for g, t in enumerate(flat)]


def _zero12_params(folder: Path, shapes: list[Mapping], ranks: list[list], paddings: Any
                   ) -> dict[str, TensorRef]:
    """Stage 1/2: group g's parameters lie one after another in the ranks' partitions of g concatenated."""
    out: dict[str, TensorRef] = {}
    ws = len(ranks)
    for g, group in enumerate(shapes):
        runs = [r[g] for r in ranks]
        total = sum(n for _f, _o, n, _d in runs)
        pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else None
        if pads is not None and (not isinstance(pads, list) or len(pads) != len(group)):
            raise CheckpointReadError(f"{folder}: param_alignment_paddings of group {g} do not match its parameters")
        pos = 0
        for i, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            if pos + numel > total:
                raise CheckpointReadError(f"{folder}: group {g}'s partitions hold {total} elements, fewer than its "
                                          f"parameters need (at {name!r}); a damaged or mismatched checkpoint")
            out[name] = _ref(folder, name, runs[0][3], shape, _cut(runs, pos, numel))
            pos += numel + (pads[i] if pads is not None and type(pads[i]) is int and pads[i] >= 0 else 0)
        align = 2 * ws  # the flat buffer's end padding (dropped when saved) is below this
        if -(-pos // align) != -(-total // align):
            raise CheckpointReadError(f"{folder}: group {g}'s partitions hold {total} elements, its parameters "
                                      f"{pos}; a damaged or mismatched checkpoint")
    return out


def _zero3_params(folder: Path, shapes: list[Mapping], ranks: list[list]) -> dict[str, TensorRef]:
    """Stage 3: each parameter is ``ceil(numel / world)`` elements in each rank's groups concatenated."""
    ws = len(ranks)
    params = [(name, shape) for group in shapes for name, shape in group.items()]
    need = sum(-(-math.prod(s) // ws) for _n, s in params)
    for r, runs in enumerate(ranks):
        have = sum(n for _f, _o, n, _d in runs)
        if have != need:
            raise CheckpointReadError(f"{folder}: rank {r}'s fp32_flat_groups hold {have} elements, its parameters' "
                                      f"parts {need}; a damaged or mismatched checkpoint")
    out: dict[str, TensorRef] = {}
    pos = 0
    for name, shape in params:
        numel = math.prod(shape)
        part = -(-numel // ws)
        dtype = ranks[0][0][3] if ranks[0] else torch.float32
        parts = [(f, o, n // dtype.itemsize, dtype) for runs in ranks for f, o, n in _cut(runs, pos, part)]
        out[name] = _ref(folder, name, dtype, shape, _cut(parts, 0, numel))  # the last part's padding cut off
        pos += part
    return out


def _frozen(folder: Path, model: list[Checkpoint], stage: int) -> dict[str, TensorRef]:
    """Frozen parameters: whole in the model states (stage 1/2), or a part per rank's model states (3)."""
    shapes = model[0].obj.get("frozen_param_shapes") or {}
    if not isinstance(shapes, Mapping):
        raise CheckpointReadError(f"{model[0].path}: frozen_param_shapes is malformed")
    out: dict[str, TensorRef] = {}
    for name, s in shapes.items():
        shape, ws = _shape(model[0], name, s), len(model)
        runs = []
        for ck in model:
            frags = _get(ck, "frozen_param_fragments", Mapping)
            runs.append(_flat_run(ck, frags.get(name), f"frozen_param_fragments[{name!r}]")
                        if stage == 3 else _whole(ck, frags.get(name), name, shape))
        numel = math.prod(shape)
        if len({d for *_x, d in runs}) != 1 or sum(n for _f, _o, n, _d in runs) < numel or (
                stage == 3 and any(n != -(-numel // ws) for _f, _o, n, _d in runs)):
            raise CheckpointReadError(f"{folder}: frozen parameter {name!r}: its stored parts do not make "
                                      f"{list(shape)}")
        out[str(name)] = _ref(folder, str(name), runs[0][3], shape, _cut(runs, 0, numel))
    return out


def _whole(ck: Checkpoint, t: Any, name: str, shape: tuple[int, ...]) -> tuple[InputFile, int, int, torch.dtype]:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise CheckpointReadError(f"{ck.path}: frozen parameter {name!r} is not stored with shape {list(shape)}")
    ref = ck.ref_for(t, name)
    if not ref.direct or ref.file is None:
        raise CheckpointReadError(f"{ck.path}: frozen parameter {name!r} is not stored contiguously")
    return ref.file, ref.offset, ref.numel, ref.dtype


def _buffers(model: Checkpoint, module: Mapping) -> dict[str, TensorRef]:
    names = model.obj.get("buffer_names") or []
    if not isinstance(names, list):
        raise CheckpointReadError(f"{model.path}: buffer_names is malformed")
    out: dict[str, TensorRef] = {}
    for name in names:
        t = module.get(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointReadError(f"{model.path}: buffer {name!r} is not in 'module'")
        out[str(name)] = model.ref_for(t, str(name))
    return out


def _describe(folder: Path, trust_pickle: bool, opened: list[InputFile]) -> tuple[dict[str, TensorRef], Checkpoint]:
    states = _model_states(folder)
    if states is None:
        raise CheckpointReadError(f"{folder}: no DeepSpeed model states ({MODEL_STATES})")
    optim_paths = _optim_files(folder)
    model = [_open_pt(states, trust_pickle, opened)]
    module = _get(model[0], "module", Mapping)
    shapes = _get(model[0], "param_shapes", list)
    if not all(isinstance(g, Mapping) for g in shapes):
        raise CheckpointReadError(f"{states}: param_shapes is malformed")
    shapes = [{str(k): _shape(model[0], str(k), v) for k, v in g.items()} for g in shapes]
    optims = [_open_pt(p, trust_pickle, opened) for p in optim_paths]
    stage, osd0 = _optim_state(optims[0], len(optims))
    osds = [osd0] + [_optim_state(ck, len(optims))[1] for ck in optims[1:]]
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    ranks = [_groups(ck, osd, key, len(shapes)) for ck, osd in zip(optims, osds)]
    if len({d for runs in ranks for *_x, d in runs}) > 1:
        raise CheckpointReadError(f"{folder}: the ranks' {key} differ in dtype")
    if stage == 3:
        model += [_open_pt(folder / ZERO3_MODEL_STATES.format(r), trust_pickle, opened)
                  for r in range(1, len(optims))] if model[0].obj.get("frozen_param_shapes") else []
        params = _zero3_params(folder, shapes, ranks)
    else:
        params = _zero12_params(folder, shapes, ranks, osd0.get("param_alignment_paddings"))
    tensors = {**_buffers(model[0], module), **_frozen(folder, model, stage), **params}
    return _ordered(model[0], module, tensors), model[0]


def _ordered(model: Checkpoint, module: Mapping, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The module's order; shared parameters (``shared_params``: name -> the name holding it) as aliases."""
    shared = model.obj.get("shared_params") or {}
    if isinstance(shared, Mapping):
        for name, target in shared.items():
            src = tensors.get(str(target))
            if src is not None and str(name) not in tensors:
                tensors[str(name)] = dataclasses.replace(src, name=str(name))  # same alias_key: one tensor
    first = [str(k) for k in module if str(k) in tensors]
    return {k: tensors[k] for k in [*first, *(k for k in tensors if k not in set(first))]}


def open_deepspeed(folder: Path, key: str | None, trust_pickle: bool) -> Checkpoint:
    """Describe a DeepSpeed ZeRO checkpoint folder (``global_stepN/``) without reading tensor data."""
    if key is not None:
        raise CheckpointReadError(f"{folder}: --key does not apply to a DeepSpeed checkpoint (its fp32 weights are "
                                  "the model)")
    opened: list[InputFile] = []
    try:
        tensors, model = _describe(folder, trust_pickle, opened)
    except BaseException:
        for f in opened:
            f.close()
        raise
    meta = CheckpointMeta()
    steps = model.obj.get("global_steps")
    m = _STEP_RE.match(folder.name)
    if type(steps) is int and steps >= 0:
        meta.step, meta.step_from = steps, "recorded"
    elif m:
        meta.step, meta.step_from = int(m.group(1)), "name"
    return Checkpoint(path=folder, format="deepspeed", tensors=tensors, meta=meta,
                      size=sum(f.size for f in opened), files=opened)


def open_single_tag(root: Path, key: str | None, trust_pickle: bool) -> Checkpoint:
    """The one checkpoint of a root (:func:`single_tag`), with the step, epoch and metrics of a Trainer's
    ``trainer_state.json`` beside it, if any."""
    tag = single_tag(root)
    if tag is None:
        raise CheckpointReadError(f"{root}: not a DeepSpeed root holding one checkpoint")
    ckpt = open_deepspeed(tag, key, trust_pickle)
    try:
        trainer_state(root, ckpt.meta)
    except BaseException:
        ckpt.close()
        raise
    return ckpt

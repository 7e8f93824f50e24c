"""``--keep-structure``: write the last selected checkpoint with its weights replaced by the average.

The output is the last selected input's whole object tree (Lightning's ``epoch``,
``global_step``, ``hyper_parameters``, ``callbacks``, ``loops``; timm's ``arch``,
``metric``; fairseq's ``cfg``, ``extra_state``, ``optimizer_history``...) with every
tensor of the averaged state dict replaced, at the key it came from and under its
original name (prefixes included, whatever ``strip_prefix`` did for matching), by the
averaged tensor. So the training framework's own loader takes the file as one of its own
checkpoints: ``LightningModule.load_from_checkpoint``, timm's ``load_checkpoint``,
fairseq's ``load_checkpoint_to_cpu``.

What happens to the rest of the tree:

* **Other weight sets are averaged too.** A checkpoint can hold more than one copy of
  the model: timm's ``state_dict`` and ``state_dict_ema``, ``model`` and ``model_ema``,
  fairseq's ``extra_state.ema``. Leaving the last checkpoint's copy there would hand
  loaders stale weights (timm's ``load_checkpoint`` prefers ``state_dict_ema`` by
  default), so every such set present in the last checkpoint (see
  :data:`WEIGHT_SET_KEYS`) is averaged with the same weights, at its own key. A set
  that some selected input lacks, or whose tensors do not match across the inputs, is
  removed from the output instead (and the summary says so), so loaders fall back to
  the averaged weights.
* **Optimizer and scheduler states are dropped** (:data:`TRAINING_STATE_KEYS`: Lightning's
  ``optimizer_states``/``lr_schedulers``, timm's ``optimizer``/``amp_scaler``, fairseq's
  ``last_optimizer_state``...): they describe the last checkpoint's point in training, not
  the averaged weights. This is what Lightning's ``save_weights_only`` writes and what
  fairseq treats as ``--reset-optimizer``. ``keep_optimizer=True`` keeps them.
* **Everything else is kept as it is in the last checkpoint**: tensors outside the weight
  sets (a callback's ``best_model_score``, fairseq's ``ema_fp32_params``, step counters)
  are copied byte for byte, and Lightning's ``callbacks`` state (ModelCheckpoint's best
  paths and scores, EarlyStopping's counters) and ``loops`` stay those of the last
  checkpoint.
* **Provenance** goes under a top-level ``ckptavg`` entry (version, method, inputs with
  weight, epoch and step, the weight sets averaged and the keys dropped), in plain
  Python types so ``torch.load(weights_only=True)`` reads it. A flat state dict (no
  surrounding checkpoint dict) gets no such entry, since it would break
  ``load_state_dict``.

Tensors are streamed as in every other merge: the averaged ones from the engine, the
copied ones in chunks from the last checkpoint; the object tree holds no tensor data.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import CkptavgError, MismatchError, OptionError, OutputError
from .io.checkpoint import Checkpoint, TensorRef
from .io.structured_out import StructuredWriter
from .io.torch_out import StorageRef, TensorStub, refuse_reduce_hooks
from .io.writer import Entry
from .planner import parse_dtype, plan_tensors
from .plans import MergePlan, PlannedTensor

__all__ = ["StructuredOutput", "prepare", "WEIGHT_SET_KEYS", "TRAINING_STATE_KEYS"]

#: Keys (dotted for nesting) where checkpoints keep a copy of the model's weights.
WEIGHT_SET_KEYS = (
    "state_dict", "model", "module", "model_state_dict", "net",
    "state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model", "model_ema_state_dict",
    "extra_state.ema", "current_model_state",
)
#: Top-level keys holding optimizer, scheduler or loss-scaler state (dropped unless kept).
TRAINING_STATE_KEYS = (
    "optimizer_states", "lr_schedulers",  # Lightning
    "optimizer", "amp_scaler",  # timm
    "last_optimizer_state",  # fairseq
    "optimizers", "optimizer_state", "optimizer_state_dict", "opt_state", "scheduler", "schedulers",
    "lr_scheduler", "scheduler_state", "scheduler_state_dict", "lr_scheduler_state_dict", "scaler", "grad_scaler",
    "scaler_state_dict",
)


@dataclass
class StructuredOutput:
    """Everything needed to write a ``--keep-structure`` output, decided before reading data."""

    plan: MergePlan  # the merge plan, with the other weight sets' tensors appended
    base: Path  # the checkpoint whose structure is kept
    entries: list[Entry]
    stubs: list[TensorStub]
    tree: Any
    copies: list[tuple[int, TensorRef]]  # entries copied byte for byte from the base
    averaged: list[str]  # weight sets averaged (dotted keys; "" = the top level)
    dropped: list[str]  # top-level keys removed
    notes: list[str] = field(default_factory=list)

    def writer(self, dest: Path) -> StructuredWriter:
        """The writer for this output: the tree with the averaged tensors, then the copied ones."""
        return StructuredWriter(dest, self.entries, tree=self.tree, stubs=self.stubs, copies=self.copies)

    def summary_notes(self) -> list[str]:
        """Short notes for the end-of-run summary line."""
        out = [f"structure of {self.base.name} kept ({', '.join(k or 'state dict' for k in self.averaged)} averaged)"]
        if self.dropped:
            out.append(
                f"dropped {', '.join(self.dropped)} (optimizer/scheduler state does not belong to averaged "
                "weights; --keep-optimizer keeps it)"
            )
        out.extend(self.notes)
        return out


def get_dotted(obj: Any, dotted: str) -> Any:
    """``obj[a][b]`` for ``"a.b"``, or None."""
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return None
    return cur


def is_weight_set(v: Any) -> bool:
    """A mapping that is mostly tensors (a state dict, possibly with a few extra entries)."""
    if not isinstance(v, Mapping) or not v:
        return False
    n = sum(isinstance(x, torch.Tensor) for x in v.values())
    return n > 0 and n >= 0.5 * len(v)


def _companion_tensors(plan: MergePlan, key: str) -> list[PlannedTensor]:
    """Plan one more weight set, at ``key`` in every selected input, with the plan's weights."""
    shims: list[Checkpoint] = []
    for inp in plan.inputs:
        c = inp.checkpoint
        d = get_dotted(c.obj, key)
        if not is_weight_set(d):
            raise MismatchError(f"{c.path}: has no {key!r}")
        tensors = {str(k): c.ref_for(v, f"{key}.{k}") for k, v in d.items() if isinstance(v, torch.Tensor)}
        shims.append(Checkpoint(path=c.path, format=c.format, tensors=tensors, meta=c.meta))
    out_dtype = parse_dtype(plan.options.dtype)
    acc = parse_dtype(plan.options.accumulate, "--accumulate") or torch.float32
    planned = plan_tensors(shims, out_dtype, acc)
    for pt in planned:
        pt.name = f"{key}.{pt.name}"
    return planned


def prepare(plan: MergePlan, *, keep_optimizer: bool = False) -> StructuredOutput:
    """Decide the ``--keep-structure`` output of ``plan`` (reads headers only)."""
    last = plan.inputs[-1].checkpoint
    if last.format not in ("torch", "torch-legacy") or last.obj is None:
        raise OptionError(
            f"{last.path}: --keep-structure needs torch checkpoints, and this is {last.format} (its structure is "
            "only its tensors); write a .safetensors file or a folder instead"
        )
    tensors, averaged, skipped, notes = _weight_sets(plan, last)
    full = replace(plan, tensors=tensors, notes=list(plan.notes))
    new_top, dropped = _new_top(full, last, averaged, skipped, keep_optimizer)
    rw = _TreeRewriter(last)
    for pt in tensors:
        j = rw.add(pt.name, pt.out_dtype, pt.shape, pt.alias_of)
        rw.by_ref.setdefault(id(pt.refs[-1]), j)
    tree = rw.convert(new_top, "", 0)
    _check_picklable(tree, last.path)
    return StructuredOutput(plan=full, base=last.path, entries=rw.entries, stubs=rw.stubs, tree=tree,
                            copies=rw.copies, averaged=averaged, dropped=dropped, notes=notes)


def _weight_sets(plan: MergePlan, last: Checkpoint) -> tuple[list[PlannedTensor], list[str], list[str], list[str]]:
    """The plan's tensors with the other weight sets of the checkpoint (EMA copies...) appended,
    the weight sets averaged, those that cannot be averaged (removed), and notes."""
    wkey, top = last.weights_key, last.obj
    averaged = [wkey or ""]
    tensors = list(plan.tensors)
    skipped: list[str] = []
    notes: list[str] = []
    if wkey is None or not isinstance(top, Mapping):
        return tensors, averaged, skipped, notes
    for key in WEIGHT_SET_KEYS:
        if key == wkey or key.startswith(wkey + ".") or wkey.startswith(key + "."):
            continue
        if not is_weight_set(get_dotted(top, key)):
            continue
        try:
            extra = _companion_tensors(plan, key)
        except CkptavgError as e:
            skipped.append(key)
            notes.append(f"removed {key} (it cannot be averaged: {e})")
            continue
        base = len(tensors)
        for pt in extra:
            if pt.alias_of is not None:
                pt.alias_of += base
        tensors.extend(extra)
        averaged.append(key)
    return tensors, averaged, skipped, notes


def _new_top(full: MergePlan, last: Checkpoint, averaged: list[str], skipped: list[str],
             keep_optimizer: bool) -> tuple[Any, list[str]]:
    """The new top level: training state dropped, failed weight sets removed, provenance added."""
    top, wkey = last.obj, last.weights_key
    dropped: list[str] = []
    if not isinstance(top, dict):
        return top, dropped
    new_top = copy.copy(top)
    if not keep_optimizer:
        for k in TRAINING_STATE_KEYS:
            if k in new_top and k not in averaged and k != wkey:
                del new_top[k]
                dropped.append(k)
    for key in skipped:
        _remove(new_top, key)
    if wkey is not None:
        new_top["ckptavg"] = _provenance(full, last.path, averaged, dropped)
    return new_top, dropped


class _TreeRewriter:
    """Rewrites the last checkpoint's object tree with a stub for every tensor: the averaged
    entries first (in plan order), then each other tensor as an entry copied from the file."""

    def __init__(self, last: Checkpoint) -> None:
        self.last = last
        self.entries: list[Entry] = []
        self.stubs: list[TensorStub] = []
        self.storages = 0
        self.by_ref: dict[int, int] = {}
        self.copies: list[tuple[int, TensorRef]] = []
        self.copy_alias: dict[tuple, int] = {}
        self.memo: dict[int, Any] = {}

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], alias_of: int | None) -> int:
        e = Entry(name, dtype, tuple(shape), alias_of)
        if alias_of is not None:
            self.stubs.append(TensorStub(self.stubs[alias_of].storage, e.shape))
        else:
            self.stubs.append(TensorStub(StorageRef(str(self.storages), dtype, e.nbytes), e.shape))
            self.storages += 1
        self.entries.append(e)
        return len(self.entries) - 1

    def tensor_stub(self, t: torch.Tensor, path: str) -> TensorStub:
        ref = self.last.ref_for(t, path)
        j = self.by_ref.get(id(ref))
        if j is None:
            akey = (ref.alias_key, ref.dtype) if ref.alias_key is not None and ref.numel > 0 else None
            if akey is not None and akey in self.copy_alias:
                j = self.add(path, ref.dtype, ref.shape, self.copy_alias[akey])
            else:
                j = self.add(path, ref.dtype, ref.shape, None)
                self.copies.append((j, ref))
                if akey is not None:
                    self.copy_alias[akey] = j
            self.by_ref[id(ref)] = j
        return self.stubs[j]

    def convert(self, obj: Any, path: str, depth: int) -> Any:
        if depth > 200:
            raise OutputError(f"{self.last.path}: the checkpoint's structure is nested too deeply to rewrite")
        if id(obj) in self.memo:
            return self.memo[id(obj)]
        if isinstance(obj, torch.Tensor):
            out: Any = self.tensor_stub(obj, path)
        elif isinstance(obj, dict):
            out = copy.copy(obj)
            out.clear()
            for k, v in obj.items():
                out[k] = self.convert(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(obj, list):
            out = [self.convert(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(obj)]
        elif isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            items = [self.convert(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(obj)]
            if all(a is b for a, b in zip(items, obj)):
                out = obj
            elif type(obj) is tuple:
                out = tuple(items)
            elif hasattr(obj, "_fields"):
                out = type(obj)(*items)
            else:
                out = type(obj)(items)
        else:
            out = obj
        self.memo[id(obj)] = out
        return out


def _remove(top: dict, dotted: str) -> None:
    """Remove a dotted key, copying the dicts on the way (the input's tree stays as it was)."""
    parts = dotted.split(".")
    cur = top
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            return
        nxt = copy.copy(nxt)
        cur[part] = nxt
        cur = nxt
    cur.pop(parts[-1], None)


def _provenance(plan: MergePlan, base: Path, averaged: list[str], dropped: list[str]) -> dict[str, Any]:
    return {
        "version": __version__,
        "method": plan.weights.description,
        "inputs": [
            {"file": str(i.path), "weight": float(i.weight), "epoch": i.epoch, "step": i.step} for i in plan.inputs
        ],
        "structure_of": str(base),
        "averaged": list(averaged),
        "dropped": list(dropped),
    }


class _CheckPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        return refuse_reduce_hooks(obj)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            return obj.key
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.storage.TypedStorage)):
            raise OutputError("a tensor inside an object of a type ckptavg cannot rewrite")
        return None


def _check_picklable(tree: Any, base: Path) -> None:
    try:
        _CheckPickler(io.BytesIO(), protocol=2).dump(tree)
    except OutputError as e:
        raise OutputError(f"{base}: cannot keep this checkpoint's structure: {e}") from None
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise OutputError(f"{base}: cannot keep this checkpoint's structure: {e}") from None

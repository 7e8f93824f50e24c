"""Metadata: where the weights are inside a checkpoint object, and what it records
(epoch, step, metrics, a power-EMA profile), or what its file name says.

Shared by every reader: torch files give an object tree, safetensors files a string
``__metadata__`` mapping, Hugging Face folders ``trainer_state.json``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError
from ..weights import MAX_GAMMA
from .checkpoint import Checkpoint, CheckpointMeta
from .snapshot_names import apply_edm2_name

__all__ = ["STATE_DICT_KEYS", "LIVE_WEIGHTS_KEY", "name_metadata", "find_state_dict", "meta_from_object",
           "meta_from_strings", "apply_name_metadata", "trainer_state", "model_stem"]

#: where Lightning's WeightAveraging callbacks keep the live (trained) weights; "state_dict" holds the average
LIVE_WEIGHTS_KEY = "current_model_state"
#: keys searched, in order, for the state dict inside a torch checkpoint
STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")

_EPOCH_RE = re.compile(r"(?:^|[^a-z])(?:epoch|ep)[=_\-]?(\d+)", re.IGNORECASE)
_STEP_RE = re.compile(r"(?:^|[^a-z])(?:global_step|step|iteration|iter|it)[=_\-]?(\d+)", re.IGNORECASE)
_FAIRSEQ_RE = re.compile(r"^checkpoint[_-]?(\d+)(?:[_-](\d+))?$", re.IGNORECASE)
_NUM_RE = re.compile(r"\d+")
_TRAINER_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
_ACCELERATE_DIR_RE = re.compile(r"^checkpoint_\d+$")
# accelerate's names for the k-th model of a checkpoint: the number is an index, not a time
_MODEL_INDEX_RE = re.compile(r"^(?:pytorch_)?model(?:_fsdp)?(?:_\d+)?$")
_FILE_EXT_RE = re.compile(r"\.(safetensors|pt|pth|ckpt|bin|tar|pkl)$", re.IGNORECASE)


def model_stem(path: Path) -> str:
    name = path.name
    for ext in (".pth.tar", ".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".tar"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def name_metadata(path: Path) -> tuple[int | None, int | None, tuple[int, ...]]:
    """Epoch, step and all numbers found in a checkpoint's file name; for a folder (a name without a
    checkpoint file's extension), its folder name's. A file whose name has no number
    (``adapter_model.safetensors``, ``unet/diffusion_pytorch_model.safetensors``) takes them from
    the nearest of its two parent folders that has one (``checkpoint-500/``); a folder whose name
    has none (a diffusers component, ``checkpoint-500/unet/``) from its parent folder when that
    names a step or epoch (``checkpoint-500``, ``epoch_3``) or is accelerate's ``checkpoint_N``."""
    is_file = bool(_FILE_EXT_RE.search(path.name))
    stem = model_stem(path) if is_file else path.name
    if _MODEL_INDEX_RE.match(stem):  # accelerate's k-th model (model_1.safetensors, pytorch_model_fsdp_0/)
        found: tuple[int | None, int | None, tuple[int, ...]] = (None, None, ())
    elif not is_file:
        return _folder_or_parent(path)
    else:
        found = _file_name_metadata(stem)
    if found != (None, None, ()):
        return found
    for anc in (path.parent, path.parent.parent):
        if anc.name and anc != path:
            found = _folder_name_metadata(anc.name)
            if found != (None, None, ()):
                return found
    return None, None, ()


def _folder_or_parent(path: Path) -> tuple[int | None, int | None, tuple[int, ...]]:
    found = _folder_name_metadata(path.name)
    if found == (None, None, ()) and path.parent.name and path.parent != path:
        parent = _folder_name_metadata(path.parent.name)
        if parent[0] is not None or parent[1] is not None or _ACCELERATE_DIR_RE.match(path.parent.name):
            return parent
    return found


def _folder_name_metadata(name: str) -> tuple[int | None, int | None, tuple[int, ...]]:
    """A folder's name: ``checkpoint-N`` (the Hugging Face Trainer's) is step N; ``checkpoint_N``
    (accelerate's automatic naming) is a save counter, neither epoch nor step (its number still
    orders); else as a file's name, without fairseq's ``checkpointE`` rule."""
    m = _TRAINER_DIR_RE.match(name)
    if m:
        return None, int(m.group(1)), (int(m.group(1)),)
    nums = tuple(int(x) for x in _NUM_RE.findall(name))
    if _ACCELERATE_DIR_RE.match(name):
        return None, None, nums
    me, ms = _EPOCH_RE.search(name), _STEP_RE.search(name)
    return (int(me.group(1)) if me else None), (int(ms.group(1)) if ms else None), nums


def _file_name_metadata(stem: str) -> tuple[int | None, int | None, tuple[int, ...]]:
    epoch = step = None
    m = _FAIRSEQ_RE.match(stem)
    if m:
        epoch = int(m.group(1))
        if m.group(2) is not None:
            step = int(m.group(2))
    m = _EPOCH_RE.search(stem)
    if m:
        epoch = int(m.group(1))
    m = _STEP_RE.search(stem)
    if m:
        step = int(m.group(1))
    return epoch, step, tuple(int(x) for x in _NUM_RE.findall(stem))




def _is_flat_prefix(obj: Mapping[Any, Any], key: str) -> bool:
    pre = key.rstrip(".") + "."
    return any(isinstance(k, str) and k.startswith(pre) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_tensor_dict(d: Any) -> bool:
    return (
        isinstance(d, Mapping)
        and len(d) > 0
        and all(isinstance(k, str) for k in d)
        and all(isinstance(v, torch.Tensor) for v in d.values())
    )


def _candidate_keys(obj: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths of nested dicts that hold tensors (for error messages)."""
    out: list[str] = []
    if not isinstance(obj, Mapping) or depth > 3:
        return out
    for k, v in obj.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if any(isinstance(x, torch.Tensor) for x in v.values()):
                out.append(path)
            out.extend(_candidate_keys(v, path + ".", depth + 1))
    return out


def find_state_dict(obj: Any, key: str | None, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    if key and isinstance(obj, Mapping) and key not in obj and _is_flat_prefix(obj, key):
        # a flat state dict holding several models side by side (ema-pytorch's EMA module:
        # "online_model.*", "ema_model.*", "initted", "step"): --key picks one by its prefix
        pre = key.rstrip(".") + "."
        return {k[len(pre):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(pre)}, key
    if key:
        cur = obj
        walked: list[str] = []
        for part in key.split("."):
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
            elif isinstance(cur, (list, tuple)) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            else:
                here = ".".join(walked) or "the top level"
                keys = list(cur.keys()) if isinstance(cur, Mapping) else []
                raise CheckpointReadError(
                    f"{path}: key {key!r} not found: {here} has no {part!r}"
                    + (f" (it has: {', '.join(map(str, keys[:20]))})" if keys else "")
                )
            walked.append(part)
        if not isinstance(cur, Mapping) or not any(isinstance(v, torch.Tensor) for v in cur.values()):
            raise CheckpointReadError(f"{path}: key {key!r} does not hold a dict of tensors")
        return cur, key
    if _is_tensor_dict(obj):
        return obj, None
    if isinstance(obj, Mapping) and _is_tensor_dict(obj.get(LIVE_WEIGHTS_KEY)):
        # Lightning's WeightAveraging callbacks (EMAWeightAveraging...) keep their running average under
        # "state_dict" and the weights being trained under "current_model_state": the live weights are
        # the checkpoint's model (averaging the averages is --key state_dict)
        return obj[LIVE_WEIGHTS_KEY], LIVE_WEIGHTS_KEY
    if isinstance(obj, Mapping):
        for k in STATE_DICT_KEYS:
            if k in obj and _is_tensor_dict(obj[k]):
                return obj[k], k
        # tolerate a few non-tensor entries (e.g. _extra_state) in the usual places
        for k in STATE_DICT_KEYS:
            v = obj.get(k)
            if isinstance(v, Mapping) and v and sum(isinstance(x, torch.Tensor) for x in v.values()) >= 0.5 * len(v):
                return v, k
        cands = _candidate_keys(obj)
        if cands:
            raise CheckpointReadError(
                f"{path}: no state dict found under {', '.join(STATE_DICT_KEYS)}; "
                f"candidates: {', '.join(cands[:15])}; pick one with --key"
            )
        shown = ", ".join(map(str, list(obj.keys())[:20]))
        raise CheckpointReadError(f"{path}: no tensors found (top-level keys: {shown or 'none'})")
    raise CheckpointReadError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")


_STEP_KEYS = ("step", "global_step", "num_updates", "iteration")
#: numbers trainers store about the checkpoint's format, not about the model (timm's ``version``)
_FORMAT_FIELDS = ("version", "format_version", "checkpoint_version")
_EPOCH_KEYS = ("epoch",)


def _scalar(ckpt: Checkpoint, v: Any) -> float | int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return _number(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        try:
            if v.device.type == "meta":
                ref = ckpt.ref_for(v)
                t = ref.materialize()
                ref.release()
            else:
                t = v
            return _number(t.reshape(()).item())
        except CheckpointReadError:
            return None
    return None


def _number(v: Any) -> int | float | None:
    """A finite int/float (not bool), else None; huge integers that no float holds are None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return v if math.isfinite(float(v)) else None
    except OverflowError:
        return None


def _as_epoch(v: Any) -> int | float | None:
    """Epochs may be fractional (Hugging Face Trainer: 2.5); whole values become ints."""
    x = _number(v)
    if x is None or x < 0:
        return None
    return int(x) if float(x).is_integer() else float(x)


def _meta_from_mapping(meta: CheckpointMeta, d: Mapping[str, Any], parse_str: bool = False,
                       ckpt: Checkpoint | None = None, path: Path | None = None) -> None:
    def val(v: Any) -> float | int | None:
        if parse_str and isinstance(v, str):
            if len(v) > 64:
                return None
            try:
                return _number(int(v))
            except ValueError:
                try:
                    return _number(float(v))
                except ValueError:
                    return None
        if ckpt is not None:
            return _scalar(ckpt, v)
        return _number(v)

    for k in _STEP_KEYS:
        if k in d and meta.step is None:
            v = val(d[k])
            if v is not None and float(v).is_integer() and v >= 0:
                meta.step, meta.step_from = int(v), "recorded"
    for k in _EPOCH_KEYS:
        if k in d and meta.epoch is None:
            ep = _as_epoch(val(d[k]))
            if ep is not None:
                meta.epoch, meta.epoch_from = ep, "recorded"
    for k in ("sigma_rel", "gamma"):
        if k in d and getattr(meta, k) is None:
            x = val(d[k])
            if path is not None:
                check_profile(path, k, d[k], x)
            if x is not None and x > 0:
                setattr(meta, k, float(x))
    if "ckptavg_version" in d or "ckptavg_method" in d:
        meta.ckptavg_output = True
    for k, v in d.items():
        if not isinstance(k, str):
            continue
        x = val(v)
        if x is not None and k not in meta.metrics:
            meta.metrics[k] = x
        elif isinstance(v, Mapping) and k == "metrics":
            for mk, mv in v.items():
                mx = val(mv)
                if isinstance(mk, str) and mx is not None:
                    meta.metrics[mk] = mx
        elif parse_str and k == "metrics" and isinstance(v, str) and len(v) < 1 << 16:
            try:
                parsed = json.loads(v)
            except (ValueError, RecursionError):
                continue
            if isinstance(parsed, dict):
                for mk, mv in parsed.items():
                    mx = _number(mv)
                    if isinstance(mk, str) and mx is not None:
                        meta.metrics[mk] = mx

#: the power-EMA profile a snapshot records: sigma_rel in (0, SIGMA_REL_MAX), gamma in (0, MAX_GAMMA]
SIGMA_REL_MAX = 0.2886


def check_profile(path: Path, key: str, raw: Any, x: float | int | None) -> None:
    """A recorded ``sigma_rel``/``gamma`` that is a number (or a string, a one-element tensor) must be a valid
    power-EMA profile: NaN, inf, 0, negative or out-of-range values are an error naming the file, never a
    silent switch to a plain checkpoint. Other values (None, a dict) are not a profile and are ignored."""
    numeric = isinstance(raw, (int, float, str)) or (isinstance(raw, torch.Tensor) and raw.numel() == 1)
    if isinstance(raw, bool) or not numeric:
        return
    if key == "sigma_rel":
        ok, rule = x is not None and 0 < x < SIGMA_REL_MAX, f"in (0, {SIGMA_REL_MAX})"
    else:
        ok, rule = x is not None and 0 < x <= MAX_GAMMA, f"in (0, {MAX_GAMMA:g}]"
    if ok:
        return
    if isinstance(raw, torch.Tensor):
        shown = f"a {str(raw.dtype).removeprefix('torch.')} tensor" + (f" holding {x!r}" if x is not None else "")
    else:
        shown = _shown(raw)
    raise CheckpointReadError(
        f"{path}: the power-EMA snapshot profile '{key}' is {shown}; it must be a finite number {rule}"
    )


def meta_from_strings(ckpt: Checkpoint, d: Mapping[str, str]) -> None:
    """Metadata from a string mapping (safetensors ``__metadata__``): numbers are parsed; a ``sigma_rel``
    or ``gamma`` that is not a valid power-EMA profile is a :class:`CheckpointReadError` naming the file.

    Example::

        meta_from_strings(ckpt, {"step": "4000", "sigma_rel": "0.05"})  # ckpt.meta.step == 4000
    """
    _meta_from_mapping(ckpt.meta, d, parse_str=True, path=ckpt.path)
    for k in ("ckptavg_version", "ckptavg_method", "format"):
        ckpt.meta.metrics.pop(k, None)


def meta_from_object(ckpt: Checkpoint) -> None:
    obj = ckpt.obj
    if not isinstance(obj, Mapping) or (ckpt.weights_key is None and _is_tensor_dict(obj)):
        return
    _meta_from_mapping(ckpt.meta, obj, ckpt=ckpt, path=ckpt.path)
    # fairseq keeps the epoch under extra_state (and the update count in optimizer_history)
    extra = obj.get("extra_state")
    if isinstance(extra, Mapping):
        sub = CheckpointMeta()
        _meta_from_mapping(sub, extra, ckpt=ckpt)
        it = extra.get("train_iterator")
        if sub.epoch is None and isinstance(it, Mapping) and isinstance(it.get("epoch"), int):
            # The iterator records the epoch to resume at: after a finished epoch E it holds
            # E + 1 with iterations_in_epoch 0 (fairseq names that file checkpointE.pt).
            ep = it["epoch"]
            version = it.get("version", 1)
            if it.get("iterations_in_epoch") == 0 and isinstance(version, int) and version >= 2 and ep > 1:
                ep -= 1
            sub.epoch, sub.epoch_from = ep, "recorded"
        if ckpt.meta.epoch is None and sub.epoch is not None:
            ckpt.meta.epoch, ckpt.meta.epoch_from = sub.epoch, "recorded"
        if ckpt.meta.step is None and sub.step is not None:
            ckpt.meta.step, ckpt.meta.step_from = sub.step, "recorded"
        for k, v in sub.metrics.items():
            ckpt.meta.metrics.setdefault(k, v)
    _lightning_monitored(ckpt, obj.get("callbacks"))
    hist = obj.get("optimizer_history")
    if ckpt.meta.step is None and isinstance(hist, list) and hist and isinstance(hist[-1], Mapping):
        nu = hist[-1].get("num_updates")
        if isinstance(nu, int):
            ckpt.meta.step, ckpt.meta.step_from = nu, "recorded"
    ckpt.meta.metrics.pop("epoch", None)
    for k in _STEP_KEYS + _FORMAT_FIELDS:
        ckpt.meta.metrics.pop(k, None)


def _lightning_monitored(ckpt: Checkpoint, callbacks: Any) -> None:
    """Lightning's ModelCheckpoint state holds the monitored value of the checkpoint being
    saved (``current_score``, under ``monitor``): record it as a metric of that name."""
    if not isinstance(callbacks, Mapping):
        return
    for state in callbacks.values():
        if isinstance(state, Mapping) and isinstance(state.get("monitor"), str) and "current_score" in state:
            v = _scalar(ckpt, state["current_score"])
            if v is not None:
                ckpt.meta.metrics.setdefault(state["monitor"], v)


def apply_name_metadata(ckpt: Checkpoint) -> None:
    epoch, step, nums = name_metadata(ckpt.path)
    m = ckpt.meta
    m.name_numbers = nums
    if m.epoch is None and epoch is not None:
        m.epoch, m.epoch_from = epoch, "name"
    if m.step is None and step is not None:
        m.step, m.step_from = step, "name"
    for k in (*_STEP_KEYS, *_EPOCH_KEYS, "sigma_rel", "gamma"):
        m.metrics.pop(k, None)
    apply_edm2_name(ckpt)


# Throughput figures the Hugging Face Trainer logs beside its eval metrics: not metrics of the model.
_NOT_METRICS = re.compile(r"_(runtime|samples_per_second|steps_per_second)$")


def trainer_state(path: Path, meta: CheckpointMeta) -> None:
    """Step, epoch (fractional epochs kept) and latest eval metrics from a Hugging Face Trainer's
    ``trainer_state.json``. A file that is not JSON, or whose ``global_step``, ``epoch`` or
    ``log_history`` has the wrong type, is a :class:`CheckpointReadError` naming the file and key
    (ordering by a silently ignored epoch would be wrong); unknown keys are ignored.

    >>> m = CheckpointMeta(); trainer_state(Path("runs/checkpoint-500"), m)  # doctest: +SKIP
    """
    f = path / "trainer_state.json"
    if not f.is_file():
        return

    def bad(what: str) -> CheckpointReadError:
        return CheckpointReadError(f"{f}: invalid trainer state: {what}")

    try:
        if f.stat().st_size > 64 << 20:
            raise bad("larger than 64 MiB")
        state = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise bad(f"cannot read: {e.strerror}") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise bad(f"not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(state, dict):
        raise bad(f"a JSON {type(state).__name__}, not an object")
    if state.get("global_step") is not None:
        gs = _number(state["global_step"])
        if gs is None or not float(gs).is_integer() or gs < 0:
            raise bad(f"'global_step' is {_shown(state['global_step'])}, not a non-negative integer")
        meta.step, meta.step_from = int(gs), "recorded"
    if state.get("epoch") is not None:
        ep = _as_epoch(state["epoch"])
        if ep is None:
            raise bad(f"'epoch' is {_shown(state['epoch'])}, not a finite non-negative number")
        meta.epoch, meta.epoch_from = ep, "recorded"
    history = state.get("log_history")
    if history is not None and not isinstance(history, list):
        raise bad(f"'log_history' is {_shown(history)}, not a list")
    for i, entry in enumerate(history or []):
        if not isinstance(entry, dict):
            raise bad(f"'log_history[{i}]' is {_shown(entry)}, not an object")
        for k, v in entry.items():
            x = _number(v)
            if isinstance(k, str) and k.startswith("eval_") and x is not None and not _NOT_METRICS.search(k):
                meta.metrics[k] = x


def _shown(v: Any) -> str:
    """A short description of a JSON value for an error message."""
    if isinstance(v, (dict, list)):
        return f"a JSON {'object' if isinstance(v, dict) else 'array'}"
    r = repr(v) if not isinstance(v, int) or v.bit_length() < 200 else f"an integer of {len(str(v))} digits"
    return r if len(r) <= 40 else r[:37] + "..."

"""Power-function EMAs kept during training, saved as snapshots for exact post-hoc EMA (EDM2).

:class:`PowerEMA` keeps, for each profile, one running average of a model's floating parameters
and buffers, updated after every optimizer step with EDM2's rule ``ema = beta*ema + (1-beta)*theta_t``,
``beta = (1 - 1/t)^(gamma+1)``. Saving the profiles every few thousand steps
(:meth:`PowerEMA.save_snapshots`) lets :func:`ckptavg.weights.posthoc_ema` reconstruct the power EMA
of any other width, at any saved step, after training.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError, OutputError
from .io.files import write_atomically
from .power_ema_dcp import ShardSpec, local_of, save_dcp_snapshot, shard_spec, wrap
from .weights import gamma_to_sigma_rel, sigma_rel_to_gamma

__all__ = ["PowerEMA", "SNAPSHOT_KIND"]

#: the value of the ``ckptavg_snapshot`` metadata key in every snapshot file
SNAPSHOT_KIND = "power-ema"

_CAST_CHUNK_BYTES = 1 << 26  # tensors needing a dtype/device cast are converted 64 MiB at a time


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class PowerEMA:
    """Power-function EMAs of a model's weights, one per profile (EDM2), for post-hoc EMA.

    Keeps one copy of the model's floating parameters and floating buffers per profile: the memory
    cost is one extra copy of the parameters per profile (two by default), in ``dtype``. By default the
    copies are float32 (float64 tensors stay float64) on each tensor's own device; pass
    ``dtype=torch.bfloat16`` to halve them (the average then carries bf16 rounding) or ``device="cpu"``
    to keep them off the accelerator (each update then copies the weights to the CPU). Integer and bool
    buffers (``num_batches_tracked``...) are not averaged: the latest value is copied at each update.
    Entries of ``model.state_dict()`` that are not tensors (``get_extra_state``) are not kept.

    Sharded models work as they train: a DTensor parameter (FSDP2 ``fully_shard``, tensor parallel)
    keeps its EMA as this rank's shard only (no communication per update), :meth:`state_dict` returns
    DTensors laid out like the parameters, and ``save_snapshots(..., format="dcp")``, called on every
    rank, writes each snapshot as a DCP folder that ``ckptavg merge --method power-ema`` reads.

    Profiles are given by their relative widths ``sigma_rels`` or by their exponents ``gammas``
    (``sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))``; 0.05 -> gamma 16.97, 0.10 -> 6.94).

    Call :meth:`update` after each optimizer step. With steps ``t`` it applies
    ``ema = beta*ema + (1-beta)*theta`` with ``beta = (t_prev/t)^(gamma+1)``, ``t_prev`` the previous
    update's step (0 at first): for consecutive steps that is EDM2's ``beta = (1 - 1/t)^(gamma+1)``, and
    the first update (``beta = 0``) sets the EMA to the weights. Updating every k steps instead treats the
    weights as constant over each gap.

    Example::

        ema = PowerEMA(model, sigma_rels=(0.05, 0.10))
        for step, batch in enumerate(loader, start=1):
            loss = model(batch).mean(); loss.backward(); opt.step(); opt.zero_grad()
            ema.update()
            if step % 1000 == 0:
                ema.save_snapshots("ema_snapshots/")       # ema-0.050-00001000.safetensors, ...
        # later: ckptavg.weights.posthoc_ema([(step, gamma) of each file], sigma_rel=0.07)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        gammas: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise OptionError(f"PowerEMA needs a torch.nn.Module, got {type(model).__name__}")
        if gammas is not None:
            self.gammas = [float(g) for g in gammas]
            self.sigma_rels = [gamma_to_sigma_rel(g) for g in self.gammas]
        else:
            self.sigma_rels = [float(s) for s in sigma_rels]
            self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if not self.gammas:
            raise OptionError("PowerEMA needs at least one profile (sigma_rels or gammas)")
        labels = [f"{s:.3f}" for s in self.sigma_rels]
        if len(set(labels)) != len(labels):
            raise OptionError(f"PowerEMA profiles must differ in sigma_rel to 3 decimals, got {', '.join(labels)}")
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise OptionError(f"PowerEMA dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.step = 0
        self._names: list[str] = []
        self._key_of: dict[str, int] = {}  # name -> index of its tensor (tied names share one)
        self._float: list[bool] = []  # per tensor index
        self._emas: list[list[torch.Tensor | None]] = [[] for _ in self.gammas]  # [profile][tensor index]
        self._latest: list[torch.Tensor | None] = []  # non-floating tensors: latest value
        self._spec: list[ShardSpec | None] = []  # per tensor index: a DTensor's layout (its EMA is the local shard)
        seen: dict[int, int] = {}
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=True).items():
                if not isinstance(t, torch.Tensor):
                    continue
                self._names.append(name)
                if id(t) in seen:
                    self._key_of[name] = seen[id(t)]
                    continue
                idx = len(self._float)
                seen[id(t)] = idx
                self._key_of[name] = idx
                self._spec.append(shard_spec(t))
                t = local_of(t)
                dev = self.device if self.device is not None else t.device
                if _is_float(t):
                    self._float.append(True)
                    dt = dtype if dtype is not None else (t.dtype if t.dtype == torch.float64 else torch.float32)
                    if t.is_complex() and not dt.is_complex:
                        dt = torch.complex128 if t.dtype == torch.complex128 else torch.complex64
                    for p in range(len(self.gammas)):
                        self._emas[p].append(t.detach().to(device=dev, dtype=dt, copy=True))
                    self._latest.append(None)
                else:
                    self._float.append(False)
                    for p in range(len(self.gammas)):
                        self._emas[p].append(None)
                    self._latest.append(t.detach().to(device=dev, copy=True))

    # ------------------------------------------------------------------ update

    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights into every profile, after the optimizer step ``step``.

        Without ``step`` the calls are counted (1, 2, ...). Steps must increase.

        Example::

            opt.step(); ema.update()            # or ema.update(global_step)
        """
        prev = self.step
        t = prev + 1 if step is None else int(step)
        if t <= prev:
            raise OptionError(f"PowerEMA.update: step {t} is not after the previous update's step {prev}")
        if prev == 0:
            weights = [1.0] * len(self.gammas)
        else:
            weights = [-math.expm1((g + 1.0) * math.log(prev / t)) for g in self.gammas]
        current = self.model.state_dict(keep_vars=True)
        groups: dict[tuple, list[int]] = {}
        sources: list[torch.Tensor | None] = [None] * len(self._float)
        for name in self._names:
            idx = self._key_of[name]
            if sources[idx] is not None:
                continue
            t_now = current.get(name)
            if not isinstance(t_now, torch.Tensor):
                raise OptionError(f"PowerEMA.update: the model no longer has the tensor {name!r}")
            ref = self._emas[0][idx] if self._float[idx] else self._latest[idx]
            assert ref is not None
            if tuple(local_of(t_now).shape) != tuple(ref.shape):
                raise OptionError(
                    f"PowerEMA.update: {name!r} changed shape from {tuple(ref.shape)} to {tuple(local_of(t_now).shape)}"
                )
            sources[idx] = local_of(t_now.detach())
            if self._float[idx]:
                groups.setdefault((t_now.device, t_now.dtype, ref.device, ref.dtype), []).append(idx)
        with torch.no_grad():
            for idx, latest in enumerate(self._latest):
                if latest is not None:
                    latest.copy_(sources[idx])  # type: ignore[arg-type]
            for (sdev, sdt, edev, edt), idxs in groups.items():
                if sdev == edev and sdt == edt:
                    self._lerp(idxs, [sources[i] for i in idxs], weights)  # type: ignore[misc]
                    continue
                chunk: list[int] = []
                size = 0
                for i in idxs + [-1]:
                    if i >= 0:
                        chunk.append(i)
                        size += sources[i].numel() * sources[i].element_size()  # type: ignore[union-attr]
                    if chunk and (i < 0 or size >= _CAST_CHUNK_BYTES):
                        cast = [sources[j].to(device=edev, dtype=edt) for j in chunk]  # type: ignore[union-attr]
                        self._lerp(chunk, cast, weights)
                        chunk, size = [], 0
        self.step = t

    def _lerp(self, idxs: list[int], srcs: list[torch.Tensor], weights: list[float]) -> None:
        for p, w in enumerate(weights):
            emas = [self._emas[p][i] for i in idxs]
            if w >= 1.0:
                torch._foreach_copy_(emas, srcs)  # type: ignore[arg-type]
            else:
                torch._foreach_lerp_(emas, srcs, w)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ read and save

    def _profile(self, profile: int | float) -> int:
        if isinstance(profile, bool):
            raise OptionError(f"PowerEMA profile must be an index or a sigma_rel, got {profile!r}")
        if isinstance(profile, int):
            if not (-len(self.gammas) <= profile < len(self.gammas)):
                raise OptionError(f"PowerEMA has {len(self.gammas)} profiles; index {profile} is out of range")
            return profile % len(self.gammas)
        for p, s in enumerate(self.sigma_rels):
            if math.isclose(s, float(profile), rel_tol=1e-6):
                return p
        have = ", ".join(f"{s:g}" for s in self.sigma_rels)
        raise OptionError(f"PowerEMA has no profile with sigma_rel {profile}; it keeps {have}")

    def state_dict(self, profile: int | float = 0) -> dict[str, torch.Tensor]:
        """One profile's average, keyed like ``model.state_dict()`` (by index, or by its sigma_rel).

        The tensors are the live averages (tied names share one tensor, as in the model): clone them
        before changing them or before the next :meth:`update` if you keep them. For a sharded model
        the average of a DTensor parameter is a DTensor with the parameter's mesh and placements,
        holding this rank's shard.

        Example::

            model_ema.load_state_dict(ema.state_dict(0.10))
        """
        p = self._profile(profile)
        out: dict[str, torch.Tensor] = {}
        wrapped: dict[int, torch.Tensor] = {}
        for name in self._names:
            idx = self._key_of[name]
            if idx not in wrapped:
                t = self._emas[p][idx] if self._float[idx] else self._latest[idx]
                assert t is not None
                wrapped[idx] = wrap(t, self._spec[idx])
            out[name] = wrapped[idx]
        return out

    def _targets(self, profile: int) -> dict[str, torch.Tensor]:
        """One profile's live tensors as kept (a DTensor's local shard), keyed by name."""
        out: dict[str, torch.Tensor] = {}
        for name in self._names:
            idx = self._key_of[name]
            t = self._emas[profile][idx] if self._float[idx] else self._latest[idx]
            assert t is not None
            out[name] = t
        return out

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume: the step, the profiles and each profile's average (live tensors).

        Example::

            torch.save({"model": model.state_dict(), "ema": ema.training_state()}, "resume.pt")
        """
        return {
            "step": self.step,
            "sigma_rels": list(self.sigma_rels),
            "gammas": list(self.gammas),
            "profiles": [self.state_dict(p) for p in range(len(self.gammas))],
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned (same profiles, same tensor names and shapes).

        Example::

            ema = PowerEMA(model); ema.load_training_state(torch.load("resume.pt", weights_only=True)["ema"])
        """
        try:
            gammas = [float(g) for g in state["gammas"]]
            profiles = state["profiles"]
            step = int(state["step"])
        except (KeyError, TypeError, ValueError) as e:
            raise OptionError(f"PowerEMA.load_training_state: not a PowerEMA training state ({e})") from None
        if len(gammas) != len(self.gammas) or not all(
            math.isclose(a, b, rel_tol=1e-9) for a, b in zip(gammas, self.gammas)
        ):
            raise OptionError(
                f"PowerEMA.load_training_state: the state has gammas {gammas}, this PowerEMA keeps {self.gammas}"
            )
        with torch.no_grad():
            for p, sd in enumerate(profiles):
                if set(sd) != set(self._names):
                    missing = sorted(set(self._names) - set(sd)) + sorted(set(sd) - set(self._names))
                    raise OptionError(f"PowerEMA.load_training_state: tensor names differ, e.g. {missing[0]!r}")
                for name, t in self._targets(p).items():
                    src = local_of(sd[name])
                    if tuple(src.shape) != tuple(t.shape):
                        raise OptionError(f"PowerEMA.load_training_state: {name!r} has shape {tuple(src.shape)}")
                    t.copy_(src)
        self.step = step

    def save_snapshots(
        self, folder: str | os.PathLike[str], step: int | None = None, format: str = "safetensors"
    ) -> list[Path]:
        """Write one snapshot per profile into ``folder``; returns their paths.

        Files are ``ema-{sigma_rel:.3f}-{step:08d}.safetensors`` with ``__metadata__`` ``{"step",
        "sigma_rel", "gamma", "ckptavg_snapshot": "power-ema"}`` (strings), or with ``format="torch"``
        ``ema-....pt`` holding ``{"state_dict", "step", "sigma_rel", "gamma"}``. With ``format="dcp"``
        each snapshot is a ``torch.distributed.checkpoint`` folder ``ema-{sigma_rel:.3f}-{step:08d}/``
        holding the model's keys plus ``step``, ``sigma_rel``, ``gamma`` and ``ckptavg_snapshot``; it is
        the format for sharded models (DTensor parameters, FSDP2, tensor parallel): every rank calls
        ``save_snapshots`` and writes its own shards, nothing is gathered. The tensors are saved in the
        EMA's dtype (float32 by default). Each write is atomic (a temporary file or folder beside it,
        then a rename). ``step`` defaults to the last update's step.

        Example::

            paths = ema.save_snapshots("ema/")   # [ema/ema-0.050-00004000.safetensors, ema/ema-0.100-...]
            ema.save_snapshots("ema/", format="dcp")   # on every rank of an FSDP2 run
        """
        if format not in ("safetensors", "torch", "dcp"):
            raise OptionError(
                f"PowerEMA.save_snapshots: format must be 'safetensors', 'torch' or 'dcp', got {format!r}"
            )
        if self.step == 0:
            raise OptionError("PowerEMA.save_snapshots: no update yet; call update() after an optimizer step first")
        if format != "dcp" and any(spec is not None for spec in self._spec):
            raise OptionError(
                "PowerEMA.save_snapshots: the model has sharded (DTensor) parameters; use format='dcp', "
                "which writes each rank's shards without gathering them"
            )
        step = self.step if step is None else int(step)
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{folder}: cannot create the snapshot folder ({e.strerror or e})") from None
        ext = {"safetensors": ".safetensors", "torch": ".pt", "dcp": ""}[format]
        paths = []
        for p, (s, g) in enumerate(zip(self.sigma_rels, self.gammas)):
            path = folder / f"ema-{s:.3f}-{step:08d}{ext}"
            sd = self.state_dict(p)
            if format == "dcp":
                info = {"step": step, "sigma_rel": s, "gamma": g, "ckptavg_snapshot": SNAPSHOT_KIND}
                clash = sorted(set(info) & set(sd))
                if clash:
                    raise OptionError(f"PowerEMA.save_snapshots: the model has a tensor named {clash[0]!r}")
                save_dcp_snapshot(path, {**sd, **info})
            elif format == "safetensors":
                tensors: dict[str, torch.Tensor] = {}
                stored: set[int] = set()
                for name, t in sd.items():
                    if id(t) in stored:  # a tied name: save_file refuses tensors that share memory
                        tensors[name] = t.clone(memory_format=torch.contiguous_format)
                    else:
                        stored.add(id(t))
                        tensors[name] = t.contiguous()
                meta = {"step": str(step), "sigma_rel": repr(s), "gamma": repr(g), "ckptavg_snapshot": SNAPSHOT_KIND}
                write_atomically(path, functools.partial(_save_safetensors, tensors, meta=meta), "the snapshot")
            else:
                obj = {"state_dict": sd, "step": step, "sigma_rel": s, "gamma": g}
                write_atomically(path, functools.partial(torch.save, obj), "the snapshot")
            paths.append(path)
        return paths


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=meta)

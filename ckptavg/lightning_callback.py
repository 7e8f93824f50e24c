"""A Lightning callback that keeps power EMAs (:class:`ckptavg.power_ema.PowerEMA`) and saves snapshots.

This module imports Lightning (``lightning``, or the older ``pytorch_lightning``); ``import ckptavg``
does not import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError
from .power_ema import PowerEMA
from .power_ema_dcp import is_dtensor, save_dcp_snapshot

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment,no-redef,unused-ignore]
    except ImportError as e:
        raise ImportError("ckptavg.lightning_callback needs lightning (pip install lightning)") from e

__all__ = ["PowerEMACallback"]


class PowerEMACallback(Callback):
    """Keep power EMAs of the LightningModule during ``fit`` and save snapshots every N optimizer steps.

    After each optimizer step (``on_train_batch_end`` when ``trainer.global_step`` advanced; with
    gradient accumulation that is once per accumulated step) the EMAs are updated with step
    ``trainer.global_step``; every ``every_n_steps`` steps, and at the end of training, one snapshot per
    profile is written into ``dirpath`` (default ``<default_root_dir>/ema_snapshots``), e.g.
    ``ema-0.050-00004000.safetensors`` (see :meth:`PowerEMA.save_snapshots`). Keys are those of
    ``pl_module.state_dict()``. With whole parameters (one device, DDP) only global rank 0 keeps the
    EMAs (memory: one copy of the parameters per profile, float32 unless ``dtype`` is given;
    ``device="cpu"`` keeps them off the accelerator).

    Sharded models (``ModelParallelStrategy``: FSDP2 ``fully_shard`` or tensor parallel applied in
    ``configure_model``, whose parameters are DTensors): every rank keeps the EMA of its own shards
    (nothing is gathered, per step or per snapshot) and the snapshots are DCP folders
    ``ema-0.050-00004000/`` each rank writes its part of (``format`` defaults to ``"dcp"`` there),
    which ``ckptavg merge --method power-ema`` reconstructs. ``FSDPStrategy`` (FSDP1's flat parameters)
    and ``DeepSpeedStrategy`` (partitioned parameters) are refused at the start of ``fit``: use
    ``ModelParallelStrategy``.

    The callback's state (the step and every profile's average) goes into Lightning checkpoints, so a
    run resumed with ``ckpt_path`` continues the same EMAs. For a sharded model the averages are not
    in the checkpoint file itself (Lightning writes the callbacks' state from rank 0 alone): each
    checkpoint writes them as a DCP folder ``<dirpath>/.ckptavg-ema-state/step-XXXXXXXX/`` (every rank
    its shards) and records its path; resuming loads it (a missing folder is an error, never a
    restarted EMA). Delete those folders with the checkpoints that name them.

    Example::

        from ckptavg.lightning_callback import PowerEMACallback

        trainer = L.Trainer(callbacks=[PowerEMACallback(sigma_rels=(0.05, 0.10), every_n_steps=2000)])
        trainer.fit(module, loader)
        # then: ckptavg merge <default_root_dir>/ema_snapshots/ --method power-ema --sigma-rel 0.07 -o ema.pt
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 1000,
        dirpath: str | os.PathLike[str] | None = None,
        *,
        gammas: Sequence[float] | None = None,
        format: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        save_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise OptionError(f"PowerEMACallback: every_n_steps must be at least 1, got {every_n_steps}")
        if format not in (None, "safetensors", "torch", "dcp"):
            raise OptionError(f"PowerEMACallback: format must be 'safetensors', 'torch' or 'dcp', got {format!r}")
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gammas) if gammas is not None else None
        self.every_n_steps = int(every_n_steps)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.format = format
        self.device = device
        self.dtype = dtype
        self.save_on_train_end = save_on_train_end
        self.ema: PowerEMA | None = None
        self.sharded = False  # the model's parameters are DTensors: every rank keeps its shards' EMA
        self._state_folder = Path(".ckptavg-ema-state")  # set at the start of fit, beside the snapshots
        self.saved: list[Path] = []
        self._last_saved_step = 0
        self._pending_state: dict[str, Any] | None = None

    def _folder(self, trainer: Any) -> Path:
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "ema_snapshots"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = type(getattr(trainer, "strategy", None)).__name__
        if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
            raise OptionError(
                f"PowerEMACallback: {strategy} keeps flat or partitioned parameters whose shards are not laid out "
                "like the model's tensors; use ModelParallelStrategy (fully_shard in configure_model), whose "
                "DTensor parameters the callback averages shard by shard")
        self.sharded = any(is_dtensor(p) for p in pl_module.parameters())
        if self.sharded and self.format not in (None, "dcp"):
            raise OptionError(f"PowerEMACallback: the model is sharded (DTensor parameters): snapshots are DCP "
                              f"folders each rank writes its part of; format={self.format!r} would gather them")
        if not self.sharded and self.format == "dcp":  # rank 0 alone would enter DCP's collectives under DDP
            raise OptionError("PowerEMACallback: format='dcp' is for sharded models (DTensor parameters); whole "
                              "models are kept on rank 0 and saved as 'safetensors' or 'torch'")
        if not self.sharded and not trainer.is_global_zero:
            return
        self._state_folder = self._folder(trainer) / ".ckptavg-ema-state"
        self.ema = PowerEMA(pl_module, self.sigma_rels, gammas=self.gammas, device=self.device, dtype=self.dtype)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is None:
            return
        step = int(trainer.global_step)
        if step <= self.ema.step:
            return  # no optimizer step in this batch (gradient accumulation) or a skipped step
        self.ema.update(step)
        if step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.ema is not None and self.save_on_train_end and self.ema.step > self._last_saved_step:
            self._save(trainer)

    def _save(self, trainer: Any) -> None:
        assert self.ema is not None
        fmt = self.format or ("dcp" if self.sharded else "safetensors")
        self.saved.extend(self.ema.save_snapshots(self._folder(trainer), format=fmt))
        self._last_saved_step = self.ema.step

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None or self.ema.step == 0:
            return {}
        if not self.sharded:
            return {**self.ema.training_state(), "last_saved_step": self._last_saved_step}
        # every rank is here (Lightning dumps a checkpoint on every rank): each writes its shards
        folder = self._state_folder / f"step-{self.ema.step:08d}"
        save_dcp_snapshot(folder, _flat(self.ema))
        return {"step": self.ema.step, "gammas": list(self.ema.gammas), "sigma_rels": list(self.ema.sigma_rels),
                "sharded_state": os.fspath(folder.resolve()), "last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._last_saved_step = int(state_dict.get("last_saved_step", 0))
        if self.ema is not None:
            self._restore(state_dict)
        else:
            self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.ema is not None
        if "sharded_state" not in state:
            if self.sharded:
                raise OptionError("PowerEMACallback: the checkpoint holds the EMA of a whole model; this run's model "
                                  "is sharded")
            self.ema.load_training_state(state)
            return
        folder = Path(state["sharded_state"])
        if not self.sharded:
            raise OptionError(f"PowerEMACallback: the checkpoint's EMA ({folder}) is sharded; this run's model is not")
        if not (folder / ".metadata").is_file():
            raise OptionError(f"PowerEMACallback: {folder}: the sharded EMA state this checkpoint names is missing; "
                              "the power EMAs cannot be resumed exactly")
        import torch.distributed.checkpoint as dcp

        flat = _flat(self.ema)
        dcp.load(flat, checkpoint_id=os.fspath(folder))
        profiles: list[dict[str, Any]] = [{} for _ in self.ema.gammas]
        for key, t in flat.items():
            p, name = key.split("/", 1)
            profiles[int(p)][name] = t
        self.ema.load_training_state({"step": state["step"], "gammas": state["gammas"], "profiles": profiles})


def _flat(ema: PowerEMA) -> dict[str, Any]:
    """Every profile's average as one flat state for DCP (``"<profile>/<name>"``: DTensors for
    sharded tensors), fresh tensors the load writes into."""
    return {f"{p}/{name}": t for p in range(len(ema.gammas)) for name, t in ema.state_dict(p).items()}

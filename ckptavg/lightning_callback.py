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
    ``trainer.global_step``; every ``every_n_steps`` steps, and at the end of training, one file per
    profile is written into ``dirpath`` (default ``<default_root_dir>/ema_snapshots``), e.g.
    ``ema-0.050-00004000.safetensors`` (see :meth:`PowerEMA.save_snapshots`). Keys are those of
    ``pl_module.state_dict()``. Only global rank 0 keeps the EMAs (memory: one copy of the parameters
    per profile, float32 unless ``dtype`` is given; ``device="cpu"`` keeps them off the accelerator).
    Sharded strategies (FSDP, DeepSpeed) are not supported.

    The callback's state (the step and every profile's average) goes into Lightning checkpoints, so a
    run resumed with ``ckpt_path`` continues the same EMAs.

    Example::

        from ckptavg.lightning_callback import PowerEMACallback

        trainer = L.Trainer(callbacks=[PowerEMACallback(sigma_rels=(0.05, 0.10), every_n_steps=2000)])
        trainer.fit(module, loader)
        # then ckptavg.weights.posthoc_ema(...) over the snapshots' (step, gamma) metadata
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 1000,
        dirpath: str | os.PathLike[str] | None = None,
        *,
        gammas: Sequence[float] | None = None,
        format: str = "safetensors",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        save_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise OptionError(f"PowerEMACallback: every_n_steps must be at least 1, got {every_n_steps}")
        if format not in ("safetensors", "torch"):
            raise OptionError(f"PowerEMACallback: format must be 'safetensors' or 'torch', got {format!r}")
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gammas) if gammas is not None else None
        self.every_n_steps = int(every_n_steps)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.format = format
        self.device = device
        self.dtype = dtype
        self.save_on_train_end = save_on_train_end
        self.ema: PowerEMA | None = None
        self.saved: list[Path] = []
        self._last_saved_step = 0
        self._pending_state: dict[str, Any] | None = None

    def _folder(self, trainer: Any) -> Path:
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "ema_snapshots"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        self.ema = PowerEMA(pl_module, self.sigma_rels, gammas=self.gammas, device=self.device, dtype=self.dtype)
        if self._pending_state is not None:
            self.ema.load_training_state(self._pending_state)
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
        self.saved.extend(self.ema.save_snapshots(self._folder(trainer), format=self.format))
        self._last_saved_step = self.ema.step

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None or self.ema.step == 0:
            return {}
        return {**self.ema.training_state(), "last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._last_saved_step = int(state_dict.get("last_saved_step", 0))
        if self.ema is not None:
            self.ema.load_training_state(state_dict)
        else:
            self._pending_state = state_dict

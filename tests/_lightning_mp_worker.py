"""Run under torchrun (gloo, CPU): Lightning's ModelParallelStrategy (FSDP2 ``fully_shard`` in
``configure_model``) with ``PowerEMACallback``, beside a reference callback that keeps whole-model
power EMAs on rank 0 from the gathered parameters (``PowerEMA`` on an unsharded copy).

Run A trains 8 steps (4 per epoch) with a Lightning checkpoint at step 4 (a distributed checkpoint
folder) and snapshots every 4 steps into OUT/a (sharded, DCP) and OUT/whole (reference). Run B
resumes from the step-4 checkpoint to step 8 with a new callback writing into OUT/b.

    torchrun --nproc-per-node 2 tests/_lightning_mp_worker.py OUT
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from ckptavg import PowerEMA
from ckptavg.lightning_callback import PowerEMACallback

SIGMA_RELS = (0.05, 0.10)
warnings.filterwarnings("ignore")


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.net(x) - x[:, :3]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class WholeEMA(L.Callback):
    """The reference: rank 0 keeps PowerEMAs of an unsharded copy, loaded with the full parameters
    after every optimizer step (gathered on every rank)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.copy: Module | None = None
        self.ema: PowerEMA | None = None

    def _full(self, pl_module) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor() for k, v in pl_module.state_dict().items()}

    def on_fit_start(self, trainer, pl_module) -> None:
        full = self._full(pl_module)
        if trainer.is_global_zero:
            self.copy = Module()
            self.copy.load_state_dict(full)
            self.ema = PowerEMA(self.copy, SIGMA_RELS)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        full = self._full(pl_module)
        if self.ema is not None and self.copy is not None:
            self.copy.load_state_dict(full)
            self.ema.update(trainer.global_step)
            if trainer.global_step % 4 == 0:
                self.ema.save_snapshots(self.folder)


def trainer(max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                                                                                   tensor_parallel_size=1),
                     max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))


def main() -> None:
    out = Path(sys.argv[1])
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=torch.Generator().manual_seed(1)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 32 samples per rank: 4 steps per epoch
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(8, [PowerEMACallback(SIGMA_RELS, every_n_steps=4, dirpath=out / "a"), WholeEMA(out / "whole"),
                ckpt]).fit(Module(), loader)
    resume = out / "ckpt" / "epoch=0-step=4.ckpt"
    trainer(8, [PowerEMACallback(SIGMA_RELS, every_n_steps=4, dirpath=out / "b")]).fit(Module(), loader,
                                                                                      ckpt_path=resume)


if __name__ == "__main__":
    main()

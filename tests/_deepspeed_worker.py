"""One rank of a 2-rank gloo run that trains a tiny model with DeepSpeed ZeRO (CPU accelerator) and saves
checkpoints, for tests/test_deepspeed.py.

Usage (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and DS_ACCELERATOR=cpu in the environment):
``python _deepspeed_worker.py OUT STAGE [STAGE...]``. For each stage it writes ``OUT/zSTAGE/`` with
``global_step1..3/`` and ``latest``, and rank 0 saves DeepSpeed's own consolidation of each
(``get_fp32_state_dict_from_zero_checkpoint``) to ``OUT/zSTAGE/reference.pt`` ({tag: state dict}).

The parameter sizes (35, 5, 5, 5, 15, 3 elements) do not divide by the world size, so the flat
partitions are padded; ``net.3.bias`` is frozen (DeepSpeed keeps it outside the optimizer: its
``frozen_param_fragments``); ``skip.weight`` is ``net.0.weight`` (its ``shared_params``); BatchNorm's
running statistics are buffers.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

# DeepSpeed imports its Muon optimizer (torch.compile at import: ~10 s here) only to check whether an
# optimizer is Muon; stand-ins (never used by this Adam run) keep the run from paying for it
_muon = types.ModuleType("deepspeed.runtime.zero.muon.muon_optimizer")
_muon.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})  # type: ignore[attr-defined]
_orig = types.ModuleType("deepspeed.runtime.zero.muon.original_muon")
_orig.muon_update = None  # type: ignore[attr-defined]
sys.modules.update({m.__name__: m for m in (_muon, _orig)})

import deepspeed  # noqa: E402

# on its CPU accelerator DeepSpeed compiles a shared-memory allreduce (about a minute, when ninja is
# installed) at init; gloo is all this run needs
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
                                       torch.nn.Linear(5, 3))
        self.skip = torch.nn.Linear(7, 5, bias=False)
        self.skip.weight = self.net[0].weight  # tied: DeepSpeed's shared_params
        self.net[3].bias.requires_grad_(False)  # frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.skip(x)[:, :3]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Net()


def train(stage: int, out: str) -> None:
    cfg = {"train_batch_size": 4 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "steps_per_print": 1000}
    m = model()
    engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters() if p.requires_grad],
                                      config=cfg)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        loss = engine(torch.randn(4, 7, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(out, tag=f"global_step{engine.global_steps}")
    dist.barrier()
    if dist.get_rank() == 0:
        ref = {f"global_step{s}": get_fp32_state_dict_from_zero_checkpoint(out, tag=f"global_step{s}")
               for s in (1, 2, 3)}
        torch.save(ref, os.path.join(out, "reference.pt"))
    dist.barrier()


def main() -> None:
    out, stages = sys.argv[1], [int(s) for s in sys.argv[2:]]
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in stages:
        train(stage, os.path.join(out, f"z{stage}"))
    print("done", stages, flush=True)


if __name__ == "__main__":
    main()

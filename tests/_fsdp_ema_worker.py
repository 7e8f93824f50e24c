"""Run under torchrun (gloo, CPU): train a small model sharded with FSDP2 ``fully_shard`` and keep
power EMAs two ways in the same run: ``PowerEMA`` on the sharded model (each rank its shards, DCP
snapshots) and, on rank 0, ``PowerEMA`` on a whole copy of the model updated from the gathered
parameters (safetensors snapshots). Then rank 0 merges both with the ckptavg CLI, every rank loads
the sharded result with ``dcp.load`` into the sharded model, and rank 0 saves what it loaded.

    torchrun --nproc-per-node 2 tests/_fsdp_ema_worker.py OUT
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ckptavg import PowerEMA

SIGMA_RELS = (0.05, 0.10)
STEPS, EVERY = 24, 8
TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def ckptavg(*args: str) -> None:
    """The CLI in one process of its own: without torchrun's variables it does not join this group."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    subprocess.run([sys.executable, "-m", "ckptavg", *args, "--quiet"], check=True, env=env)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build()
    whole = copy.deepcopy(model)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = PowerEMA(model, sigma_rels=SIGMA_RELS)
    whole_ema = PowerEMA(whole, sigma_rels=SIGMA_RELS) if rank == 0 else None
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(1, STEPS + 1):
        x = torch.randn(8, 6, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(step)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # collective: every rank
        if whole_ema is not None:
            whole.load_state_dict(full)
            whole_ema.update(step)
        if step % EVERY == 0:
            ema.save_snapshots(out / "sharded", format="dcp")
            if whole_ema is not None:
                whole_ema.save_snapshots(out / "whole")
    facts = {
        name: [type(t).__name__, list(t.to_local().shape), list(model.state_dict()[name].to_local().shape)]
        for name, t in ema.state_dict(0).items()
    }
    dist.barrier()
    if rank == 0:
        (out / "facts.json").write_text(json.dumps(facts))
        common = ["--method", "power-ema", "--sigma-rel", "0.07"]
        ckptavg("merge", str(out / "sharded"), *common, "-o", str(out / "sharded.safetensors"))
        ckptavg("merge", str(out / "whole"), *common, "-o", str(out / "whole.safetensors"))
        ckptavg("merge", str(out / "sharded"), *common, "-o", str(out / "merged.dcp"))
    dist.barrier()
    target = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert all(isinstance(v, DTensor) for v in target.values())
    dcp.load(target, checkpoint_id=str(out / "merged.dcp"))
    loaded = {k: v.full_tensor() for k, v in target.items()}
    if rank == 0:
        torch.save(loaded, out / "loaded.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

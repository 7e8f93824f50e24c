"""One rank of the 2-process DCP test (run by tests/test_dcp.py, not collected by pytest).

``python _dcp_worker.py RANK WORLD PORT SAVE_DIR LOAD_DIR OUT_DIR``: joins a gloo group on
127.0.0.1, saves DTensors (sharded on dim 0, on dim 1, replicated) with ``dcp.save`` into
SAVE_DIR, then (if LOAD_DIR is not "-") loads the DCP folder LOAD_DIR into DTensors sharded on
dim 0 and saves each rank's local shard and the gathered full tensor to OUT_DIR/rank{R}.pt.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def full_tensors() -> dict[str, torch.Tensor]:
    """The global tensors every rank (and the test) builds identically."""
    g = torch.Generator().manual_seed(1234)
    return {
        "rows.weight": torch.randn(7, 5, generator=g),  # dim 0 over 2 ranks: 4 + 3 rows
        "cols.weight": torch.randn(3, 7, generator=g),  # dim 1 over 2 ranks: 4 + 3 columns
        "rep.bias": torch.randn(5, generator=g),
        "half.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
    }


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    save_dir, load_dir, out_dir = sys.argv[4], sys.argv[5], sys.argv[6]
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = full_tensors()
        place = {"rows.weight": Shard(0), "cols.weight": Shard(1), "rep.bias": Replicate(), "half.weight": Shard(0)}
        model = {k: distribute_tensor(v, mesh, [place[k]]) for k, v in full.items()}
        dcp.save({"model": model, "step": 1000}, checkpoint_id=save_dir)
        if load_dir != "-":
            target = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in full.items()}
            dcp.load(target, checkpoint_id=load_dir)
            torch.save({"local": {k: v.to_local() for k, v in target.items()},
                        "full": {k: v.full_tensor() for k, v in target.items()}}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

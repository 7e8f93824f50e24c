"""Run under torchrun (2 ranks, gloo, CPU): megatron-core's own ``dist_checkpointing.load`` reads the
Megatron checkpoint ``sys.argv[1]`` (an ``iter_NNNNNNN/`` folder) into a sharded state dict split
differently from the one the inputs were saved with (tensor-parallel on dimension 1 instead of 0),
and each rank saves what it got, with the common state, to ``sys.argv[2]/loaded_{rank}.pt``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    folder, out = sys.argv[1], sys.argv[2]
    sd = {
        "decoder.weight": ShardedTensor.from_rank_offsets("decoder.weight", torch.empty(8, 6 // world),
                                                          (1, rank, world)),
        "decoder.bias": ShardedTensor.from_rank_offsets("decoder.bias", torch.empty(6), replica_id=rank),
        "decoder.layers.weight": ShardedTensor.from_rank_offsets("decoder.layers.weight",
                                                                 torch.empty(3, 4, 4 // world), (2, rank, world)),
        "decoder._extra_state": ShardedObject("decoder._extra_state", None, (1,), (0,), replica_id=rank),
    }
    loaded = dist_checkpointing.load(sd, folder)
    common = dist_checkpointing.load_common_state_dict(folder)
    torch.save({"state": loaded, "common": common}, os.path.join(out, f"loaded_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

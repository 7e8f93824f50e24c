"""Run under torchrun (2 ranks, gloo, CPU): megatron-core's own ``dist_checkpointing.save`` writes
Megatron ``torch_dist`` checkpoints ``ROOT/iter_NNNNNNN/`` for each iteration given, with a
tensor-parallel split (dim 0), a replicated tensor, layers stacked on a leading axis and an
``_extra_state`` object, then the ``latest_checkpointed_iteration.txt`` marker; rank 0 also saves
the full tensors of each iteration (``ROOT/ref_N.pt``) for the test's float64 reference.

megatron-core's saver syncs CUDA and puts a flag on the current device: both are pointed at the CPU."""

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

    root = sys.argv[1]
    for it in (int(x) for x in sys.argv[2:]):
        g = torch.Generator().manual_seed(it)
        full = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g),
                "layers": torch.randn(3, 4, 4, generator=g)}
        sd = {
            "decoder.weight": ShardedTensor.from_rank_offsets("decoder.weight", full["w"].chunk(world, 0)[rank].clone(),
                                                              (0, rank, world)),
            "decoder.bias": ShardedTensor.from_rank_offsets("decoder.bias", full["b"].clone(), replica_id=rank),
            "decoder.layers.weight": ShardedTensor.from_rank_offsets("decoder.layers.weight", full["layers"].clone(),
                                                                     replica_id=rank),
            "decoder._extra_state": ShardedObject("decoder._extra_state", {"fp8": it}, (1,), (0,), replica_id=rank),
            "iteration": it,
        }
        folder = os.path.join(root, f"iter_{it:07d}")
        os.makedirs(folder, exist_ok=True)
        dist_checkpointing.save(sd, folder)
        if rank == 0:
            torch.save(full, os.path.join(root, f"ref_{it}.pt"))
            with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(it))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

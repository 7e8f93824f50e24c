"""Megatron torch_dist checkpoints: ckptavg against Megatron-LM's own ``tools/checkpoint/weighted_merge.py``.

``make`` writes N Megatron ``torch_dist`` checkpoints of about M MB each with megatron-core's own
``dist_checkpointing.save``, under torchrun with 2 gloo ranks on CPU (tensor-parallel splits on
dimensions 0, 1 and 2, a replicated bias, one ``_extra_state`` object per layer), into
``ROOT/iter_NNNNNNN/`` with ``latest_checkpointed_iteration.txt``; ``check`` compares two merged
roots tensor by tensor (through torch's own ``dcp.load``).

Then time whole commands (any timer that runs them several times and reports wall time and peak
RSS: ``/usr/bin/time -v`` in a loop, hyperfine...), each into a fresh output folder:

  ckptavg, one process:     ckptavg merge ROOT --schedule linear -o OUT/ -q
  ckptavg, 2 ranks:         torchrun --standalone --nproc-per-node 2 -m ckptavg merge ROOT --schedule linear -o OUT/ -q
  weighted_merge.py:        python MEGATRON/tools/checkpoint/weighted_merge.py --merge-inputs ROOT \\
                                --start-checkpoint 1000 --end-checkpoint N000 --merge-style linear --merge-output OUT
  (and the same under torchrun --standalone --nproc-per-node 2)
  import-only baselines:    python benchmarks/megatron_bench.py import-only  (torch, torch.distributed.checkpoint and
                            ckptavg's merge driver);  python MEGATRON/tools/checkpoint/weighted_merge.py --help
                            (each alone and under torchrun --standalone --nproc-per-node 2)

MEGATRON is a checkout of Megatron-LM that includes PR 5114 (the script imports its own ``megatron``
package from the checkout). Net time is wall time minus the import-only process's; extra memory is
peak RSS minus the import-only process's.

Usage::

    torchrun --standalone --nproc-per-node 2 benchmarks/megatron_bench.py make /tmp/mbench --count 8 --size-mb 200
    python benchmarks/megatron_bench.py check /tmp/out_ckptavg/iter_0008000 /tmp/out_wm/iter_0008000
"""

from __future__ import annotations

import argparse
import os
import pickle
import zlib

import torch
import torch.distributed as dist


def _shapes(mb: int) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Global shapes and the dimension each is split on across the tensor-parallel ranks (~mb MB in float32)."""
    h = 1024
    rows = max(2, (mb * 2**20 // 4 // 3 // h) // 2 * 2)
    layers = 8
    return {
        "embedding.word_embeddings.weight": ((rows, h), 0),
        "decoder.layers.mlp.linear_fc1.weight": ((layers, rows // layers // 2 * 2, h), 1),
        "decoder.layers.mlp.linear_fc2.weight": ((layers, h, rows // layers // 2 * 2), 2),
        "decoder.final_layernorm.bias": ((h,), None),
    }


def make(root: str, n: int, mb: int) -> None:
    torch.cuda.synchronize = lambda *a, **k: None  # megatron-core's saver syncs CUDA
    torch.cuda.current_device = lambda: "cpu"  # and puts a flag on the current device
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    for i in range(1, n + 1):
        it = 1000 * i
        sd: dict = {"iteration": it}
        for name, (shape, axis) in _shapes(mb).items():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{it}".encode()))
            full = torch.randn(shape, generator=g)
            if axis is None:
                sd[name] = ShardedTensor.from_rank_offsets(name, full, replica_id=rank)
            else:
                part = full.chunk(world, axis)[rank].clone()
                sd[name] = ShardedTensor.from_rank_offsets(name, part, (axis, rank, world))
        for layer in range(8):
            key = f"decoder.layers.{layer}.self_attention._extra_state"
            sd[key] = ShardedObject(key, {"amax": torch.full((4,), float(it))}, (1,), (0,), replica_id=rank)
        folder = os.path.join(root, f"iter_{it:07d}")
        os.makedirs(folder, exist_ok=True)
        dist_checkpointing.save(sd, folder)
        if rank == 0:
            with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(it))
        dist.barrier()
    dist.destroy_process_group()


def check(a: str, b: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(os.path.join(a, ".metadata"), "rb") as fh:
        md = pickle.load(fh)  # noqa: S301 (a benchmark's own output)
    worst = 0.0
    for name, tmd in md.state_dict_metadata.items():
        if not isinstance(tmd, TensorStorageMetadata):
            continue
        x = {name: torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)}
        y = {name: torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)}
        dcp.load(x, checkpoint_id=a)
        dcp.load(y, checkpoint_id=b)
        worst = max(worst, float((x[name].double() - y[name].double()).abs().max()))
    print(f"max |a - b| over every tensor: {worst:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("root")
    m.add_argument("--count", type=int, default=8)
    m.add_argument("--size-mb", type=int, default=200)
    sub.add_parser("import-only", help="import what ckptavg loads for this job, then exit (the baseline)")
    c = sub.add_parser("check")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.root, args.count, args.size_mb)
    elif args.cmd == "import-only":
        import torch.distributed.checkpoint  # noqa: F401

        import ckptavg.distributed  # noqa: F401
        import ckptavg.pipeline  # noqa: F401
    else:
        check(args.a, args.b)


if __name__ == "__main__":
    main()

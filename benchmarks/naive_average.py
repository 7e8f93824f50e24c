"""The naive baseline that ckptavg is measured against: load each checkpoint whole, average, save.

This is what most training codebases ship as their checkpoint averaging script: every input is
loaded completely into memory (``torch.load`` or ``safetensors.torch.load_file``), its floating
tensors are added into a float32 running sum that holds a whole model, and the result is divided,
cast back to each tensor's input dtype and saved. Integer and bool tensors (``num_batches_tracked``,
step counters) are taken from the last checkpoint, as ckptavg does. The output is fsynced before the
process exits, because ckptavg fsyncs too and the comparison should be like for like.

Peak memory is about two loaded checkpoints plus the float32 sum; time is dominated by
deserialising every file in full and by the per-tensor Python loop.

Usage::

    python benchmarks/naive_average.py IN1.pt IN2.pt ... -o OUT.pt          # or .safetensors
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import load_file, save_file


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load one checkpoint whole: a plain state dict saved by torch.save, or a .safetensors file."""
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def average(paths: list[str]) -> dict[str, torch.Tensor]:
    """Uniform average: float tensors summed in float32 (at least), others from the last checkpoint."""
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state = load_state_dict(path)
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                continue
            if name not in sums:
                dtypes[name] = tensor.dtype
                accumulate_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
                sums[name] = tensor.to(accumulate_dtype, copy=True)
            else:
                sums[name] += tensor
    result = {}
    for name, tensor in state.items():  # the last checkpoint supplies order and non-float tensors
        if name in sums:
            result[name] = sums.pop(name).div_(len(paths)).to(dtypes[name])
        else:
            result[name] = tensor
    return result


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    """Save by extension, then fsync the file so the data is on disk when the process ends."""
    if path.endswith(".safetensors"):
        save_file({name: t.contiguous() for name, t in state.items()}, path)
    else:
        torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="checkpoints to average (.pt state dicts or .safetensors)")
    parser.add_argument("-o", "--output", required=True, help="output path (.pt or .safetensors)")
    args = parser.parse_args()
    save_state_dict(average(args.inputs), args.output)


if __name__ == "__main__":
    main()

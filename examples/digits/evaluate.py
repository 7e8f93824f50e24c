"""Test accuracy of a digits model file: a state dict (.pt), a .safetensors file, or a training
checkpoint holding one under ``state_dict``.

    python evaluate.py runs/swa_bn.pt runs/checkpoints/epoch=030-step=0990.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

import model
import torch
from train import evaluate


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def test_accuracy(path: str | Path, num_classes: int = 10) -> float:
    net = model.build(num_classes=num_classes)
    net.load_state_dict(load_state_dict(path))  # strict: every key must match
    return evaluate(net, "test")[0]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{test_accuracy(arg):.4f}  {arg}")

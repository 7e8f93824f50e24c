"""Make the small training run the documentation's examples use, in the current folder.

    python make_runs.py

writes ``runs/`` (six Lightning-style checkpoints ``epoch=E-step=S.ckpt`` of a tiny
BatchNorm network, with ``val_loss`` and ``val_acc`` stored as metrics), ``model.py``
(the network, a data loader and a metric) and ``bn.toml`` (a spec for ``ckptavg bn``,
``merge --bn-spec``, ``sweep`` and ``soup``). Everything is deterministic: the same
torch version gives the same bytes. ``tests/test_docs.py`` runs the documentation's
examples against exactly these files.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_PY = '''"""The tiny network, data and metric of the documentation's examples."""
import torch
from torch import nn


def build(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 2))


def loader(n_batches: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(16, 4, generator=g)
        batches.append((x, (x.sum(dim=1) > 0).long()))
    return batches


def loss(model: nn.Module, batches: list) -> float:
    total = sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in batches)
    return total / len(batches)
'''

BN_TOML = '''[model]
factory = "model.py:build"

[data]
loader = "model.py:loader"
input = 0

[eval]
loader = "model.py:loader"
kwargs = { seed = 1 }
metric = "model.py:loss"
higher_is_better = false
'''


def main(folder: Path = Path(".")) -> None:
    torch.manual_seed(0)
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "bn.toml").write_text(BN_TOML)
    runs = folder / "runs"
    runs.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {
        "0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.zeros(8),
        "1.weight": torch.ones(8), "1.bias": torch.zeros(8),
        "1.running_mean": torch.zeros(8), "1.running_var": torch.ones(8),
        "1.num_batches_tracked": torch.tensor(0),
        "3.weight": torch.randn(2, 8, generator=g), "3.bias": torch.zeros(2),
    }
    for epoch in range(6):
        state = {k: (v + 0.1 * epoch * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 10 * epoch)
                 for k, v in base.items()}
        val_loss = round(0.9 - 0.1 * epoch + 0.03 * (epoch % 2), 4)
        ckpt = {"epoch": epoch, "global_step": 10 * (epoch + 1), "state_dict": state,
                "val_loss": val_loss, "val_acc": round(1 - val_loss / 2, 4)}
        torch.save(ckpt, runs / f"epoch={epoch}-step={10 * (epoch + 1)}.ckpt")


if __name__ == "__main__":
    main()

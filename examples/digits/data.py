"""scikit-learn's bundled digits (1797 images, 8x8, no download), split once with a fixed seed.

Splits: ``train`` (1077 images), ``val`` (180, for the checkpoints' metrics) and ``test`` (540, only
for the final table). Images are scaled to [0, 1], shaped (1, 8, 8) and float64 (as the model).
"""

from __future__ import annotations

from functools import cache

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

SPLIT_SEED = 0  # the split never changes with the training seed


@cache
def splits() -> dict[str, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=0.3, random_state=SPLIT_SEED, stratify=y)
    train, val = train_test_split(rest, test_size=180, random_state=SPLIT_SEED, stratify=y[rest])
    return {name: TensorDataset(x[i], y[i]) for name, i in [("train", train), ("val", val), ("test", test)]}


def loader(split: str = "train", batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of (images, labels) from one split; shuffled reproducibly when ``shuffle``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(splits()[split], batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=shuffle)


def train_loader(batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """The training split: what BatchNorm statistics are recalibrated on (named in bn.toml)."""
    return loader("train", batch_size, shuffle, seed)

"""Train the digits CNN with SGD at a high constant learning rate, saving a checkpoint every epoch.

The learning rate warms up for two epochs and then stays high, so late iterates keep bouncing
around the optimum: the last checkpoint is a noisy pick, which is what averaging fixes.

    python train.py --out runs/checkpoints --epochs 30 --seed 0

writes ``epoch=001-step=0033.ckpt`` ... with ``{'epoch', 'step', 'state_dict', 'optimizer', 'metrics'}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import data
import model
import torch
from torch import nn


def seed_everything(seed: int, threads: int) -> None:
    """Same numbers on every run and, as far as possible, on every CPU build of torch: a fixed seed,
    deterministic kernels, one thread (a fixed summation order) and a float64 model (model.py)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False  # oneDNN picks kernels by CPU; the reference kernels do not


@torch.no_grad()
def evaluate(net: nn.Module, split: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``net`` in eval mode on one split."""
    net.eval()
    correct = loss = count = 0
    for x, y in data.loader(split, batch_size=512):
        logits = net(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return correct / count, loss / count


def train(
    out: Path,
    epochs: int = 30,
    lr: float = 0.5,
    warmup_epochs: int = 2,
    batch_size: int = 32,
    seed: int = 0,
    threads: int = 1,
) -> list[Path]:
    """Train from scratch and return the checkpoint paths, one per epoch (epochs count from 1)."""
    seed_everything(seed, threads)
    out.mkdir(parents=True, exist_ok=True)
    net = model.build(num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batches = data.train_loader(batch_size=batch_size, shuffle=True, seed=seed)
    warmup_steps = warmup_epochs * len(batches)
    step, paths = 0, []
    for epoch in range(1, epochs + 1):
        net.train()
        for x, y in batches:
            step += 1
            for group in opt.param_groups:  # linear warmup, then constant
                group["lr"] = lr * min(1.0, step / max(warmup_steps, 1))
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            model.snap_to_grid(net)
        val_acc, val_loss = evaluate(net, "val")
        path = out / f"epoch={epoch:03d}-step={step:04d}.ckpt"
        torch.save(
            {
                "epoch": epoch,
                "step": step,
                "state_dict": net.state_dict(),
                "optimizer": opt.state_dict(),
                "metrics": {"val_acc": val_acc, "val_loss": val_loss},
            },
            path,
        )
        print(f"epoch {epoch:3d}  step {step:5d}  val_acc {val_acc:.4f}  val_loss {val_loss:.4f}")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoints"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    train(args.out, args.epochs, args.lr, batch_size=args.batch_size, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()

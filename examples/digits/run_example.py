"""End-to-end ckptavg example on real data: scikit-learn's handwritten digits.

Trains a small BatchNorm CNN with SGD at a high constant learning rate (one checkpoint per epoch),
then averages the second half of the checkpoints with the real ``ckptavg merge`` CLI and prints the
test accuracy of the last checkpoint next to SWA (with and without BatchNorm recalibration) and EMA.

    python examples/digits/run_example.py           # 30 epochs, about a minute on 2 idle CPU cores
    python examples/digits/run_example.py --quick   # 12 epochs, for CI (about half that)

The model and data are float64 and training runs on one thread with deterministic kernels, so
the numbers repeat exactly from run to run, and CPU builds of torch that round differently
(BLAS libraries, vector instruction sets) should only rarely move them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import train
from evaluate import test_accuracy

HERE = Path(__file__).resolve().parent
SPEC = HERE / "bn.toml"
EMA_DECAY = 0.8  # per checkpoint (per epoch): the last epoch weighs 0.2, the one before 0.16, ...
OUTPUTS = ("swa.pt", "swa_bn.pt", "ema_bn.pt")


def ckptavg(*args: str, cwd: Path, threads: int) -> None:
    """Run the installed CLI exactly as a user would (``python -m ckptavg`` needs no PATH)."""
    print(f"\n$ ckptavg {shlex.join(args)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "ckptavg", *args], cwd=cwd, env=env)
    if result.returncode:
        sys.exit(f"ckptavg failed with exit code {result.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 epochs instead of 30 (for CI)")
    parser.add_argument("--workdir", type=Path, default=HERE / "runs", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the data split is fixed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; a tiny model runs best on 1")
    parser.add_argument("--check", action="store_true", help="fail unless SWA + BN >= last checkpoint")
    args = parser.parse_args()
    if importlib.util.find_spec("ckptavg") is None:
        sys.exit("ckptavg is not installed in this Python: run `pip install -e .[examples]` in the repository root")

    start = time.perf_counter()
    epochs = 12 if args.quick else 30
    first = epochs // 2 + 1  # SWA and EMA average epochs first..epochs
    work = args.workdir.resolve()
    ckpt_dir = work / "checkpoints"
    for stale in [*ckpt_dir.glob("epoch=*-step=*.ckpt"), *(work / name for name in OUTPUTS)]:
        stale.unlink(missing_ok=True)  # a previous, longer run would add epochs to the selection

    print(f"Training {epochs} epochs (seed {args.seed}) into {ckpt_dir}")
    paths = train.train(ckpt_dir, epochs=epochs, seed=args.seed, threads=args.threads)
    trained = time.perf_counter() - start

    spec = os.path.relpath(SPEC, work) if work.is_relative_to(HERE) else str(SPEC)
    select = ["checkpoints/", "--epochs", f"{first}:"]
    run = {"cwd": work, "threads": args.threads}
    ckptavg("merge", *select, "-o", "swa.pt", **run)
    ckptavg("merge", *select, "-o", "swa_bn.pt", "--bn-spec", spec, **run)
    ckptavg("merge", *select, "--method", "ema", "--decay", str(EMA_DECAY), "-o", "ema_bn.pt", "--bn-spec", spec, **run)

    metrics = [torch.load(p, weights_only=True)["metrics"] for p in paths]
    best = max(range(epochs), key=lambda i: (metrics[i]["val_acc"], -metrics[i]["val_loss"]))
    span = f"epochs {first}-{epochs}"
    rows = [
        (f"last checkpoint (epoch {epochs})", paths[-1]),
        (f"best checkpoint by val_acc (epoch {best + 1})", paths[best]),
        (f"SWA {span}, no BN recalibration", work / "swa.pt"),
        (f"SWA {span} + BN recalibration", work / "swa_bn.pt"),
        (f"EMA (decay {EMA_DECAY}) {span} + BN recalibration", work / "ema_bn.pt"),
    ]
    print(f"\nTest accuracy on 540 held-out digits (seed {args.seed}, {epochs} epochs, lr 0.5):\n")
    print(f"| {'model':<50} | test accuracy |\n|{'-' * 52}|--------------:|")
    accuracy = {}
    for name, path in rows:
        accuracy[name] = test_accuracy(path)
        print(f"| {name:<50} | {accuracy[name]:>13.2%} |")
    total = time.perf_counter() - start
    print(f"\nTraining took {trained:.0f} s, training to table {total:.0f} s. Files in {work}")
    last, swa_bn = accuracy[rows[0][0]], accuracy[rows[3][0]]
    if args.check and swa_bn < last:
        sys.exit(f"check failed: SWA + BN recalibration ({swa_bn:.2%}) is below the last checkpoint ({last:.2%})")

    # Evaluation-driven averaging (sweep_soup.py): choose on the validation split, report on test.
    import sweep_soup

    chosen = sweep_soup.run(ckptavg, work, spec, first, **run)
    print(f"\n| {'model':<50} | test accuracy |\n|{'-' * 52}|--------------:|")
    for name, path in chosen:
        print(f"| {name:<50} | {test_accuracy(path):>13.2%} |")


if __name__ == "__main__":
    main()

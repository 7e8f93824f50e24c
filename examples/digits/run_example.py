"""End-to-end ckptavg example on real data: scikit-learn's handwritten digits.

Trains a small BatchNorm CNN with SGD at a high constant learning rate (one checkpoint per epoch),
then averages the second half of the checkpoints with the real ``ckptavg merge`` CLI and prints the
test accuracy of the last checkpoint next to SWA (with and without BatchNorm recalibration) and EMA.

    python examples/digits/run_example.py           # 30 epochs, about a minute on 2 idle CPU cores
    python examples/digits/run_example.py --quick   # 12 epochs, for CI (about half that)

The model and data are float64, training runs on one thread with deterministic kernels, and the
weights are rounded to a 2^-16 grid after every step (model.py), so the tables repeat exactly from
run to run and across CPUs: the last-bit differences between vector instruction sets and BLAS
kernels are rounded away instead of growing into a different model (tests/test_example.py trains
under several ATEN_CPU_CAPABILITY and MKL settings and compares the weights bit for bit).

``--check`` asserts what the READMEs claim: every table this run prints must appear verbatim in
examples/digits/README.md (for this mode) and, for the full run, in the top-level README.md.
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
    parser.add_argument("--check", action="store_true", help="fail unless the READMEs show exactly these tables")
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
    tables = [table(rows)]
    print("\n".join(tables[0]))
    total = time.perf_counter() - start
    print(f"\nTraining took {trained:.0f} s, training to table {total:.0f} s. Files in {work}")

    # Evaluation-driven averaging (sweep_soup.py): choose on the validation split, report on test.
    import sweep_soup

    tables.append(table(sweep_soup.run(ckptavg, work, spec, first, **run)))
    print("\n" + "\n".join(tables[1]))
    if args.check:
        readmes = [HERE / "README.md"] + ([] if args.quick or args.seed else [HERE.parents[1] / "README.md"])
        for readme in readmes:
            text = readme.read_text().splitlines()
            for lines in tables:
                if not any(text[i : i + len(lines)] == lines for i in range(len(text))):
                    sys.exit(f"check failed: {readme} does not show this run's table:\n" + "\n".join(lines))
        print(f"\ncheck passed: {', '.join(str(r.relative_to(HERE.parents[1])) for r in readmes)} show these tables")


def table(rows: list[tuple[str, Path]]) -> list[str]:
    """The markdown table of test accuracies printed for ``rows`` (name, model file)."""
    lines = [f"| {'model':<50} | test accuracy |", f"|{'-' * 52}|--------------:|"]
    return lines + [f"| {name:<50} | {test_accuracy(path):>13.2%} |" for name, path in rows]


if __name__ == "__main__":
    main()

"""Merge across ranks: the same inputs merged by ``torchrun`` with K=1 and K=2 ranks (gloo, CPU).

Run from the repository root::

    python benchmarks/torchrun_bench.py                  # 4 x 256 MiB fp32 inputs, 3 rounds
    python benchmarks/torchrun_bench.py --mib 64 --repeats 1 --ranks 1,2,4

For each K it records the wall time of the whole ``torchrun`` command (agent and workers each import
torch: a fixed cost of a few seconds) and the merge's own time as rank 0 reports it (``--json``'s
``seconds``: from planning to publishing, after every rank finished), medians over interleaved rounds, and checks that
every K produced the same tensors (byte for byte). A single-process ``python -m ckptavg merge`` of the
same inputs is timed alongside. On a machine with C cores the gain of K ranks is bounded by
min(K, C) and by the disk: each rank reads its own part of every input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(folder: Path, n: int, mib: int) -> list[Path]:
    code = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "folder, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for i in range(n):\n"
        "    sd = {f'layer{k}.weight': torch.randn(1 << 20, generator=g) for k in range(mib // 4)}\n"
        "    save_file(sd, f'{folder}/ck{i}.safetensors')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(n), str(mib)], check=True)
    return sorted(folder.glob("ck*.safetensors"))


def digest(folder: Path) -> str:
    code = (
        "import sys, hashlib\n"
        "from pathlib import Path\n"
        "from safetensors import safe_open\n"
        "h = hashlib.sha256()\n"
        "items = []\n"
        "for f in sorted(Path(sys.argv[1]).glob('*.safetensors')):\n"
        "    with safe_open(f, 'pt') as fh:\n"
        "        items += [(k, fh.get_tensor(k)) for k in fh.keys()]\n"
        "for k, t in sorted(items, key=lambda kv: kv[0]):\n"
        "    h.update(k.encode()); h.update(t.contiguous().view(-1).view(__import__('torch').uint8).numpy())\n"
        "print(h.hexdigest())\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True, text=True)
    return res.stdout.strip()


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    m = re.search(r'"seconds": ([0-9.]+)', res.stdout)  # rank 0's --json report
    return wall, float(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=4, help="number of checkpoints (default 4)")
    p.add_argument("--mib", type=int, default=256, help="size of each checkpoint in MiB (default 256)")
    p.add_argument("--ranks", default="1,2", help="comma-separated K values (default 1,2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", help="where to write inputs and outputs (default: system temp)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ranks.split(",")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="ckptavg-torchrun-", dir=args.workdir))
    try:
        inputs = generate(work, args.inputs, args.mib)
        runs: dict[str, list[tuple[float, float | None]]] = {}
        digests: dict[str, str] = {}
        for _ in range(args.repeats):
            variants = [("single", None)] + [(f"K={k}", k) for k in ks]
            for name, k in variants:
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                if k is None:
                    cmd = [sys.executable, "-m", "ckptavg", "merge", *map(str, inputs), "-o", f"{out}/", "--json"]
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k),
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                           "-m", "ckptavg", "merge", *map(str, inputs), "-o", f"{out}/", "--json"]
                runs.setdefault(name, []).append(timed(cmd, env))
                digests[name] = digest(out)
                shutil.rmtree(out, ignore_errors=True)
        same = len(set(digests.values())) == 1
        total = args.inputs * args.mib
        print(f"inputs: {args.inputs} x {args.mib} MiB fp32 ({total} MiB read per merge); cores: {os.cpu_count()}; "
              f"rounds: {args.repeats}; identical outputs: {same}")
        print(f"{'variant':>8}  {'wall s':>7}  {'merge s':>7}  {'merge MiB/s':>11}")
        result = {}
        for name, vals in runs.items():
            wall = statistics.median(v[0] for v in vals)
            merge_vals = [v[1] for v in vals if v[1] is not None]
            merge = statistics.median(merge_vals) if merge_vals else float("nan")
            result[name] = {"wall_s": wall, "merge_s": merge}
            print(f"{name:>8}  {wall:7.2f}  {merge:7.2f}  {total / merge:11.0f}")
        for k in ks[1:]:
            a, b = result[f"K={ks[0]}"], result[f"K={k}"]
            print(f"K={k} vs K={ks[0]}: merge time ratio {b['merge_s'] / a['merge_s']:.2f}, "
                  f"wall ratio {b['wall_s'] / a['wall_s']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"inputs": args.inputs, "mib": args.mib, "identical": same,
                                                   "cpus": os.cpu_count(), "results": result}, indent=2))
        if not same:
            raise SystemExit("outputs differ between variants")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""DCP inputs for the benchmarks: N checkpoints written by a real 2-rank ``dcp.save``.

Each checkpoint ``step-K/`` is what an FSDP2/torchtitan run leaves: 2 gloo processes save DTensors
sharded on dim 0 (every rank writes its half of every tensor into its own ``__R_0.distcp``), about
96 MiB of fp32 in 12 tensors, plus a step counter. Values differ per checkpoint (seeded), so the
average is not trivial.

Run from the repository root::

    python benchmarks/dcp_cases.py --n 8 --out /tmp/dcp-inputs          # generate only
    python benchmarks/dcp_cases.py --n 8 --out /tmp/dcp-inputs --measure

``--measure`` merges ``step-*/`` in a fresh process per output kind (a DCP folder, one safetensors file)
and reports the merge's peak RSS above that process's RSS after its imports (``VmHWM`` after resetting
the mark with ``/proc/self/clear_refs``, as tests/conftest.py's ``merge_peak_rss`` does) and its time
next to the time of reading every input file once (``cat``, page cache warm, as the merge finds it),
medians over ``--repeats`` rounds; with ``--ranks 2`` also the wall time of a 2-rank ``torchrun`` DCP
merge (agent and workers import torch: a fixed cost of a few seconds). The lead hooks
:func:`make_dcp_checkpoints` into bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TENSORS = 12  # of 2 Mi fp32 elements each: 96 MiB per checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, n: int, mib: int) -> None:
    """One rank of the save: joins a gloo group and ``dcp.save``s ``n`` checkpoints of DTensors."""
    import warnings

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        elems = mib * (1 << 20) // 4 // TENSORS
        rows = 1024
        for k in range(n):
            g = torch.Generator().manual_seed(1000 + k)
            model = {}
            for t in range(TENSORS):
                full = torch.randn(rows, elems // rows, generator=g)
                model[f"layers.{t}.weight"] = distribute_tensor(full, mesh, [Shard(0)])
            dcp.save({"model": model, "step": 100 * (k + 1)}, checkpoint_id=f"{out}/step-{100 * (k + 1)}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_dcp_checkpoints(out: str | os.PathLike[str], n: int = 8, mib: int = 96, world: int = 2) -> list[Path]:
    """Write ``n`` DCP checkpoints ``out/step-100 ... step-{100 n}`` with a real ``world``-rank
    ``dcp.save`` (gloo, CPU; DTensors sharded on dim 0, ``mib`` MiB each); returns their folders.
    Existing complete folders are reused.

    Example::

        folders = make_dcp_checkpoints("/tmp/dcp-inputs", n=8)   # 8 x 96 MiB, about a minute here
    """
    out = Path(out)
    folders = [out / f"step-{100 * (k + 1)}" for k in range(n)]
    if all((f / ".metadata").is_file() for f in folders):
        return folders
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), str(out), str(n),
                               str(mib)], env=env) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"dcp.save workers exited with {codes}")
    return folders


_PROBE = """
import json, sys, time
import torch, ckptavg
import ckptavg.api, ckptavg.engine, ckptavg.io.dcp_in, ckptavg.io.dcp_out, ckptavg.io.safetensors_out

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
ckptavg.merge(sys.argv[2:], sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": status("VmHWM") - base}))
"""


def _files(folders: list[Path]) -> list[Path]:
    return sorted(q for f in folders for q in f.iterdir() if q.is_file())


def _cat_seconds(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _merge_once(folders: list[Path], output: Path) -> dict[str, float]:
    shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    res = subprocess.run([sys.executable, "-c", _PROBE, str(output), *map(str, folders)], capture_output=True,
                         text=True, env=_env(), check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "merge failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _torchrun_once(folders: list[Path], output: Path, ranks: int) -> float:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0", "-m", "ckptavg", "merge",
           *map(str, folders), "-o", str(output), "-q"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(_env(), OMP_NUM_THREADS="1"), check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stdout + res.stderr)
    return time.perf_counter() - t0


def measure(folders: list[Path], work: Path, repeats: int = 3, ranks: int = 0) -> dict[str, object]:
    """Peak RSS and net time of single-process merges of ``folders`` into a DCP folder and a
    safetensors file (and, with ``ranks``, the wall time of a torchrun DCP merge); medians.

    Example::

        print(measure(make_dcp_checkpoints("/tmp/dcp-inputs"), Path("/tmp/dcp-out")))
    """
    work.mkdir(parents=True, exist_ok=True)
    files = _files(folders)
    size = sum(f.stat().st_size for f in files)
    _cat_seconds(files)  # warm the page cache, as for the merges below
    outputs = {"dcp": work / "avg.dcp", "safetensors": work / "avg.safetensors"}
    cat, runs = [], {k: [] for k in outputs}
    dist_runs: list[float] = []
    for _ in range(repeats):  # interleaved rounds: background load hits every measurement alike
        cat.append(_cat_seconds(files))
        for k, out in outputs.items():
            runs[k].append(_merge_once(folders, out))
        if ranks:
            dist_runs.append(_torchrun_once(folders, work / "avg-ranks.dcp", ranks))
    read = statistics.median(cat)
    result: dict[str, object] = {"inputs": len(folders), "input_bytes": size, "cat_seconds": round(read, 3)}
    for k, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        rss = statistics.median(r["peak_rss"] for r in rs)
        result[k] = {"seconds": round(secs, 3), "net_seconds": round(secs - read, 3),
                     "peak_rss_mib": round(rss / 2**20, 1),
                     "peak_rss_per_input_mib": round(rss / 2**20 / len(folders), 2)}
    if ranks:
        result[f"torchrun_{ranks}_ranks_dcp_wall_seconds"] = round(statistics.median(dist_runs), 3)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, port, out, n, mib = sys.argv[2:8]
        _worker(int(r), int(w), int(port), out, int(n), int(mib))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="checkpoints to write (default 8)")
    ap.add_argument("--mib", type=int, default=96, help="MiB per checkpoint (default 96)")
    ap.add_argument("--out", required=True, help="folder for the checkpoints (reused when complete)")
    ap.add_argument("--measure", action="store_true", help="merge them and report peak RSS and net time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=0, help="also time a torchrun merge with this many ranks")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folders = make_dcp_checkpoints(args.out, args.n, args.mib)
    print(f"{len(folders)} DCP checkpoints in {args.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if args.measure:
        print(json.dumps(measure(folders, Path(args.out) / "_outputs", args.repeats, args.ranks), indent=2))


if __name__ == "__main__":
    main()

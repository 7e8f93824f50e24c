"""Benchmark harness for ckptavg: wall time and peak RSS against I/O and naive baselines.

Run from the repository root::

    python benchmarks/bench.py                    # default run (under 5 minutes on a 2-core machine)
    python benchmarks/bench.py --quick            # smoke run (under 1 minute), smaller models
    python benchmarks/bench.py --bn               # also time `ckptavg bn` against a bare forward pass
    python benchmarks/bench.py --reference        # also the issue's reference point: 8 x 512 MiB fp32
    python benchmarks/bench.py --list             # show the cases; pick some with --cases 'resnet*,*n16*'
    python benchmarks/bench.py --json out.json    # where the table goes as JSON (default: benchmarks/results/)
    python benchmarks/bench.py --compare old.json # print this run's ratios next to an earlier run's
    python benchmarks/bench.py --profile prof.html [--profile-case NAME] [--profiler py-spy]

What it does, top to bottom:

1. Builds checkpoint sets in a temporary folder (``--workdir``, default the system temp dir):
   transformer-like (a few fp32 tensors of 16 MiB), ResNet-like (ResNet-50's 320 tensors, BatchNorm
   buffers with int64 ``num_batches_tracked``) and bf16 LLM-like models, scaled in N (2-16) and in
   size (x1-x4), saved as ``.pt`` (``torch.save`` of a plain state dict) and ``.safetensors``.
   Generation runs in a child process.
2. Measures every command in a fresh child process, in interleaved rounds (``--repeats``), and keeps
   medians. Commands that import torch go through a small wrapper that times ``import torch`` in the
   same process and records the time and peak RSS (VmHWM) at the end of the program, before
   interpreter teardown; the child's ``ru_maxrss`` from ``os.wait4`` and its anon/file RSS split,
   sampled from ``/proc/PID/status``, are recorded too.
3. Baselines, side by side in the same run: a process that only does ``import torch``; reading the
   inputs once (large reads into a reused buffer); writing one output of the same size (temp file,
   fsync, rename, like ckptavg); and a naive load-everything average (``naive_average.py``).
4. The thing under test: ``python -m ckptavg merge IN... -o OUT --quiet`` (and ``--device cuda`` when a
   GPU is present). If ckptavg is missing or fails, its rows say so and the baselines still run.
   ``--bn`` adds ``ckptavg bn`` against a bare forward pass over the same loader.
5. Prints the table with the ratios the issue sets targets for, and writes it as JSON.

The harness process itself never imports torch: on Linux a child's ``ru_maxrss`` starts from the RSS
of the parent it was forked from, so a fat parent would inflate every child's peak. README.md
explains the columns and the measurement traps. Generated files are removed at the end, on error
and on Ctrl-C (``--keep`` keeps the inputs, and a later ``--keep`` run with the same ``--workdir``
reuses them).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 1 << 20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}

# --------------------------------------------------------------------------------------------------
# 1. Model layouts: lists of (tensor name, shape, dtype). Pure data, no torch needed.
# --------------------------------------------------------------------------------------------------


def transformer_layout(d: int, hidden: int, layers: int, vocab: int = 0) -> list:
    """GPT-like fp32 blocks: q/k/v/o of d x d, an MLP of d x hidden, layer norms; optional embeddings."""
    out = []
    if vocab:
        out.append(("embed.weight", [vocab, d], "float32"))
    for i in range(layers):
        p = f"blocks.{i}."
        out += [(p + "ln1.weight", [d], "float32"), (p + "ln1.bias", [d], "float32")]
        out += [(p + f"attn.{m}.weight", [d, d], "float32") for m in ("q", "k", "v", "o")]
        out += [(p + "ln2.weight", [d], "float32"), (p + "ln2.bias", [d], "float32")]
        out += [(p + "mlp.fc1.weight", [hidden, d], "float32"), (p + "mlp.fc1.bias", [hidden], "float32")]
        out += [(p + "mlp.fc2.weight", [d, hidden], "float32"), (p + "mlp.fc2.bias", [d], "float32")]
    out += [("ln_f.weight", [d], "float32"), ("ln_f.bias", [d], "float32")]
    if vocab:
        out.append(("lm_head.weight", [vocab, d], "float32"))
    return out


def resnet_layout(width: int) -> list:
    """ResNet-50's layout (bottlenecks [3, 4, 6, 3]) with a base width; 64 gives ResNet-50 itself."""

    def bn(prefix: str, c: int) -> list:
        return [(prefix + "weight", [c], "float32"), (prefix + "bias", [c], "float32"),
                (prefix + "running_mean", [c], "float32"), (prefix + "running_var", [c], "float32"),
                (prefix + "num_batches_tracked", [], "int64")]

    out = [("conv1.weight", [width, 3, 7, 7], "float32")] + bn("bn1.", width)
    in_c = width
    for stage, (blocks, mult) in enumerate(zip([3, 4, 6, 3], [1, 2, 4, 8]), start=1):
        mid, out_c = width * mult, width * mult * 4
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            out += [(p + "conv1.weight", [mid, in_c, 1, 1], "float32")] + bn(p + "bn1.", mid)
            out += [(p + "conv2.weight", [mid, mid, 3, 3], "float32")] + bn(p + "bn2.", mid)
            out += [(p + "conv3.weight", [out_c, mid, 1, 1], "float32")] + bn(p + "bn3.", out_c)
            if b == 0:
                out += [(p + "downsample.0.weight", [out_c, in_c, 1, 1], "float32")]
                out += bn(p + "downsample.1.", out_c)
            in_c = out_c
    return out + [("fc.weight", [1000, in_c], "float32"), ("fc.bias", [1000], "float32")]


def llm_layout(d: int, ffn: int, layers: int, vocab: int) -> list:
    """Llama-like bf16 model: embeddings, q/k/v/o, gated MLP, RMSNorm weights, untied lm_head."""
    out = [("model.embed_tokens.weight", [vocab, d], "bfloat16")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", [d], "bfloat16"))
        out += [(p + f"self_attn.{m}_proj.weight", [d, d], "bfloat16") for m in "qkvo"]
        out.append((p + "post_attention_layernorm.weight", [d], "bfloat16"))
        out += [(p + f"mlp.{m}_proj.weight", [ffn, d], "bfloat16") for m in ("gate", "up")]
        out.append((p + "mlp.down_proj.weight", [d, ffn], "bfloat16"))
    return out + [("model.norm.weight", [d], "bfloat16"), ("lm_head.weight", [vocab, d], "bfloat16")]


def tensor_bytes(shape: list, dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * DTYPE_BYTES[dtype]


# Shapes per mode; "scale" multiplies model size (transformer/LLM: layers; ResNet: width by sqrt).
# Default: about 96 MiB per checkpoint at x1 (x4 = 384 MiB), largest tensor 16 MiB; quick: 24-32 MiB.
SHAPES = {
    "default": {
        "transformer": lambda s: transformer_layout(d=2048, hidden=2048, layers=s),
        "resnet": lambda s: resnet_layout(width=int(64 * s**0.5)),  # x1 is ResNet-50's state dict
        "llm-bf16": lambda s: llm_layout(d=2048, ffn=4096, layers=s, vocab=2048),
        # The issue's reference point: 512 MiB fp32 per checkpoint, largest tensor 16 MiB.
        "reference": lambda s: transformer_layout(d=2048, hidden=2048, layers=5 * s, vocab=2048),
        # The reliability issue's case: 100,000 four-element fp32 tensors (1.6 MB of data).
        "tiny100k": lambda s: [(f"layer.{i}.w", [4], "float32") for i in range(100_000 * s)],
    },
    "quick": {
        "transformer": lambda s: transformer_layout(d=1024, hidden=2048, layers=s),
        "resnet": lambda s: resnet_layout(width=int(36 * s**0.5)),
        "llm-bf16": lambda s: llm_layout(d=1024, ffn=2816, layers=s, vocab=2048),
        "reference": lambda s: transformer_layout(d=2048, hidden=2048, layers=5 * s, vocab=2048),
        "tiny100k": lambda s: [(f"layer.{i}.w", [4], "float32") for i in range(100_000 * s)],
    },
}

# --------------------------------------------------------------------------------------------------
# 2. Cases: which set of checkpoints, how many, which input and output format.
# --------------------------------------------------------------------------------------------------

EXT = {"pt": ".pt", "st": ".safetensors"}


@dataclass
class Case:
    shape: str
    scale: int
    n: int
    in_fmt: str  # "pt" or "st"
    out_fmt: str
    groups: list = field(default_factory=list)  # "shapes", "scaling-n", "scaling-size", "reference"
    layout: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.shape}-x{self.scale}-n{self.n}-{self.in_fmt}>{self.out_fmt}"

    @property
    def model_bytes(self) -> int:
        return sum(tensor_bytes(shape, dtype) for _, shape, dtype in self.layout)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(tensor_bytes(shape, dtype) for _, shape, dtype in self.layout)


def build_cases(quick: bool, reference: bool, many_small: bool = False) -> list[Case]:
    """The case matrix. Cases that coincide (e.g. N=8 in the shape and N-scaling groups) run once."""
    n_shapes = 4 if quick else 8
    wanted = [
        ("shapes", "transformer", 1, n_shapes, "pt", "pt"),
        ("shapes", "transformer", 1, n_shapes, "st", "st"),
        ("shapes", "resnet", 1, n_shapes, "pt", "pt"),
        ("shapes", "llm-bf16", 1, n_shapes, "st", "st"),
    ]
    if not quick:  # the quick run keeps only the shapes: it is a smoke test of the whole pipeline
        wanted += [("scaling-n", "transformer", 1, n, "pt", "pt") for n in (2, 4, 8, 16)]
        wanted += [("scaling-size", "transformer", s, 4, "pt", "pt") for s in (1, 2, 4)]
    if reference:
        wanted.append(("reference", "reference", 1, 8, "pt", "pt"))
    if many_small:
        wanted += [("many-small", "tiny100k", 1, 2, "st", "st"), ("many-small", "tiny100k", 1, 2, "pt", "pt")]
    shapes = SHAPES["quick" if quick else "default"]
    cases: dict[str, Case] = {}
    for group, shape, scale, n, in_fmt, out_fmt in wanted:
        case = Case(shape, scale, n, in_fmt, out_fmt, layout=shapes[shape](scale))
        cases.setdefault(case.name, case).groups.append(group)
    return list(cases.values())


def select_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    if not patterns:
        return cases
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cases if any(fnmatch.fnmatch(c.name, g) or g in c.name for g in globs)]


# --------------------------------------------------------------------------------------------------
# 3. Operations that run in child processes: `bench.py _generate|_cat|_write|_forward ...`.
#    _cat and _write use the standard library only; _generate and _forward import torch lazily.
# --------------------------------------------------------------------------------------------------


def op_generate(spec_path: str) -> None:
    """Write every checkpoint set described in the spec (sets already complete are skipped)."""
    import torch
    from safetensors.torch import save_file

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    for s in spec["sets"]:
        folder = Path(s["dir"])
        first = generated_count(folder)
        if first >= s["count"]:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(s["seed"])
        base = {}
        for name, shape, dtype in s["layout"]:
            if dtype != "int64":
                base[name] = torch.empty(shape, dtype=torch.float32).uniform_(-0.1, 0.1, generator=gen)
        for i in range(first, s["count"]):
            state = {}
            for name, shape, dtype in s["layout"]:
                if dtype == "int64":
                    state[name] = torch.full(shape, 1000 * (i + 1), dtype=torch.int64)
                else:  # every checkpoint differs, so the average is a real computation
                    state[name] = base[name].add(0.001 * i).to(getattr(torch, dtype))
            path = folder / f"ckpt_{i:03d}{EXT[s['fmt']]}"
            if s["fmt"] == "st":
                save_file(state, str(path))
            else:
                torch.save(state, path)
            del state
            (folder / "complete").write_text(f"{i + 1}\n")
    if spec.get("bn"):
        generate_bn_files(spec["bn"])
    print(json.dumps({"seconds": time.perf_counter() - t0, "torch": torch.__version__,
                      "cuda": torch.cuda.is_available()}))


def generated_count(folder: Path) -> int:
    """How many checkpoints of a set exist already (written by an earlier run kept with --keep)."""
    marker = folder / "complete"
    return int(marker.read_text()) if marker.exists() else 0


def drop_from_cache(paths: list[str]) -> None:
    """Evict the files' pages from the page cache (``posix_fadvise`` ``DONTNEED``: clean pages of
    these files only, no root needed, other files' cached pages untouched)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def op_cat(paths: list[str]) -> None:
    """Read every input once with large reads into one reused buffer; print the seconds it took."""
    buf = bytearray(16 * MiB)
    total = 0
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": total}))


def op_write(path: str, size: int) -> None:
    """Write `size` incompressible bytes the way ckptavg writes: temp file, fsync, rename, fsync dir."""
    block = os.urandom(MiB) * 16
    tmp = path + ".tmp"
    t0 = time.perf_counter()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    t3 = time.perf_counter()
    print(json.dumps({"seconds": t3 - t0, "write_seconds": t1 - t0, "fsync_seconds": t2 - t1}))


# --- BatchNorm recalibration workload (issue 5 point 5), used by --bn ---------------------------

BN_MODULE = '''"""Model and loader for the ckptavg bn benchmark (generated by benchmarks/bench.py)."""
import torch
from torch import nn


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def build():
    return nn.Sequential(block(3, 16, 1), block(16, 16, 1), block(16, 32, 2), block(32, 32, 1),
                         block(32, 64, 2), block(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(64, 10))


def loader(batches, batch_size, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 3, size, size, generator=gen) for _ in range(batches)]
'''

BN_SPEC = """[model]
factory = "bnbench_model:build"

[data]
loader = "bnbench_model:loader"
kwargs = {{ batches = {batches}, batch_size = {batch_size} }}

[run]
device = "cpu"
"""


def generate_bn_files(bn: dict) -> None:
    """Write the model module, the spec and a model file for `ckptavg bn` (needs torch: child only)."""
    import torch

    folder = Path(bn["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bnbench_model.py").write_text(BN_MODULE)
    (folder / "bn.toml").write_text(BN_SPEC.format(batches=bn["batches"], batch_size=bn["batch_size"]))
    sys.path.insert(0, str(folder))
    import bnbench_model

    torch.manual_seed(0)
    torch.save(bnbench_model.build().state_dict(), folder / "model.pt")


def op_forward(folder: str, model_path: str, mode: str, batches: int, batch_size: int) -> None:
    """The bare forward pass `ckptavg bn` is compared with: same model, same loader, no statistics."""
    import torch

    sys.path.insert(0, folder)
    import bnbench_model

    model = bnbench_model.build()
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    model.train(mode == "train")
    with torch.no_grad():
        for batch in bnbench_model.loader(batches=batches, batch_size=batch_size):
            model(batch)


# --------------------------------------------------------------------------------------------------
# 4. Measuring one child process.
# --------------------------------------------------------------------------------------------------


# Torch's import takes 3-6 s here and varies by +-20 % between processes, and interpreter teardown
# with torch loaded adds 0.3-1.5 s and faults in ~120 MiB of library pages (RssFile). That would swamp
# a net time of a second, and the teardown spike would hide any working set smaller than itself in
# "peak RSS - import-only peak RSS". So every command that imports torch runs through this wrapper:
# it times `import torch` in that very process, runs the tool exactly as `python -m MODULE` (or
# `python SCRIPT`) would, and an atexit handler -- registered first, so it runs last, after non-daemon
# threads were joined -- records the seconds from the end of the import to the end of the program and
# the peak RSS so far (VmHWM), before teardown. Both go to $BENCH_TIMES_FILE. --plain turns it off.
IMPORT_TORCH = """
import atexit, os, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
bench_times = open(os.environ["BENCH_TIMES_FILE"], "w")
print(t1 - t0, file=bench_times, flush=True)

def bench_end():
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(time.perf_counter() - t1, hwm, file=bench_times, flush=True)

atexit.register(bench_end)
"""
WRAPPER = IMPORT_TORCH + """
import runpy, sys
target = sys.argv.pop(1)
sys.argv[0] = target
if target.startswith("-m"):
    runpy.run_module(target[2:], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def wrapped(cmd: list[str]) -> list[str]:
    """`PY -m MOD ARGS` -> `PY -c WRAPPER -mMOD ARGS`; `PY SCRIPT.py ARGS` likewise; others unchanged."""
    if len(cmd) > 2 and cmd[1] == "-m":
        return [cmd[0], "-c", WRAPPER, "-m" + cmd[2], *cmd[3:]]
    if len(cmd) > 1 and cmd[1].endswith(".py"):
        return [cmd[0], "-c", WRAPPER, *cmd[1:]]
    return cmd


@dataclass
class Run:
    wall_s: float
    maxrss_kb: int  # exact high-water mark of the child (os.wait4), includes its interpreter teardown
    anon_kb: int  # sampled peaks of RssAnon / RssFile (every few ms; can miss short spikes)
    file_kb: int
    cpu_s: float  # user + system CPU seconds of the child (> wall means it used both cores)
    import_s: float | None  # `import torch` inside the child (wrapped commands only, else None)
    work_s: float | None  # from the end of that import to the end of the program, before teardown
    hwm_kb: int | None  # peak RSS (VmHWM) at that moment: the child's peak without the teardown spike
    returncode: int
    stdout: str
    stderr_tail: str  # the last line: a click usage error, ckptavg's one-line error, an exception


class RssSampler(threading.Thread):
    """Polls /proc/PID/status for the anon and file-backed parts of RSS while the child runs."""

    def __init__(self, pid: int, times_path: Path, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.path, self.times_path, self.interval = f"/proc/{pid}/status", times_path, interval
        self.anon_kb = self.file_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with open(self.path) as f:
                    text = f.read()
                if self.times_path.exists() and self.times_path.read_text().count("\n") >= 2:
                    return  # the wrapper's atexit handler ran: what follows is interpreter teardown
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    self.anon_kb = max(self.anon_kb, int(line.split()[1]))
                elif line.startswith("RssFile:"):
                    self.file_kb = max(self.file_kb, int(line.split()[1]))
            self.done.wait(self.interval)


class Runner:
    """Runs commands as fresh child processes and measures them; remembers the running child."""

    def __init__(self, scratch: Path, env: dict, timeout: float) -> None:
        self.scratch, self.env, self.timeout = scratch, env, timeout
        self.current: subprocess.Popen | None = None

    def run(self, cmd: list[str]) -> Run:
        out_path, err_path = self.scratch / "child.out", self.scratch / "child.err"
        times_path = self.scratch / "child.times"
        times_path.unlink(missing_ok=True)
        self.env["BENCH_TIMES_FILE"] = str(times_path)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.perf_counter()
            proc = self.current = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                                   env=self.env)
            sampler = RssSampler(proc.pid, times_path)
            sampler.start()
            timer = threading.Timer(self.timeout, proc.kill)
            timer.daemon = True
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not a running max
                wall = time.perf_counter() - t0
            finally:
                timer.cancel()
                sampler.done.set()
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.current = None
            sampler.join()
        stderr = err_path.read_text(errors="replace").strip().splitlines()
        times = [float(x) for x in times_path.read_text().split()] if times_path.exists() else []
        times += [None] * (3 - len(times))
        return Run(wall, usage.ru_maxrss, sampler.anon_kb, sampler.file_kb, usage.ru_utime + usage.ru_stime,
                   times[0], times[1], times[2] and int(times[2]), proc.returncode,
                   out_path.read_text(errors="replace"), stderr[-1] if stderr else "")

    def kill_current(self) -> None:
        proc = self.current
        if proc is not None and proc.returncode is None:
            proc.kill()
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run]) -> dict:
    """Medians over the successful runs; the op's own timing (stdout JSON) when it reports one."""
    ok = [r for r in runs if r.returncode == 0]
    inner = [json.loads(r.stdout) for r in ok if r.stdout.strip().startswith("{")]
    summary = {
        "runs": len(runs), "ok": len(ok),
        "wall_s": median([r.wall_s for r in ok]), "cpu_s": median([r.cpu_s for r in ok]),
        "maxrss_mb": median([r.maxrss_kb / 1024 for r in ok]),
        "anon_mb": median([r.anon_kb / 1024 for r in ok]), "file_mb": median([r.file_kb / 1024 for r in ok]),
        "wall_all_s": [round(r.wall_s, 3) for r in runs],
    }
    if ok and all(r.work_s is not None for r in ok):
        summary["import_s"] = median([r.import_s for r in ok])
        summary["work_s"] = median([r.work_s for r in ok])
        summary["hwm_mb"] = median([r.hwm_kb / 1024 for r in ok])
    if inner:
        summary["inner_s"] = median([i["seconds"] for i in inner])
        if "fsync_seconds" in inner[0]:
            summary["fsync_s"] = median([i["fsync_seconds"] for i in inner])
    if len(ok) < len(runs):
        failed = next(r for r in runs if r.returncode != 0)
        summary["error"] = f"exit {failed.returncode}: {failed.stderr_tail or '(no stderr)'}"
    return summary


def unavailable(run: Run) -> bool:
    """A first run that shows the command does not exist yet (vs. a failure worth reporting)."""
    text = run.stderr_tail
    return run.returncode == 2 or "No module named" in text or "No such command" in text


# --------------------------------------------------------------------------------------------------
# 5. The benchmark: commands per case, interleaved rounds, medians.
# --------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, runner: Runner) -> None:
        self.args, self.work, self.runner = args, work, runner
        self.py = args.python
        self.ckptavg = [part.replace("{python}", self.py) for part in shlex.split(args.ckptavg_cmd)]
        self.cuda = False
        self.missing: dict[str, str] = {}  # command -> why it is skipped for the rest of the run
        self.notes: list[str] = []

    # --- inputs --------------------------------------------------------------------------------

    def set_dir(self, case: Case, fmt: str) -> Path:
        digest = hashlib.sha1(json.dumps([case.layout, fmt]).encode()).hexdigest()[:10]
        return self.work / "sets" / f"{case.shape}-x{case.scale}-{fmt}-{digest}"

    def inputs(self, case: Case) -> list[str]:
        folder = self.set_dir(case, case.in_fmt)
        return [str(folder / f"ckpt_{i:03d}{EXT[case.in_fmt]}") for i in range(case.n)]

    def generate(self, cases: list[Case], bn: dict | None) -> None:
        """One child writes every set: the largest N any case needs, minus files a kept run left."""
        sets: dict[Path, dict] = {}
        for case in cases:
            folder = self.set_dir(case, case.in_fmt)
            entry = sets.setdefault(folder, {"dir": str(folder), "fmt": case.in_fmt, "count": 0,
                                             "layout": case.layout, "seed": int(folder.name[-8:], 16)})
            entry["count"] = max(entry["count"], case.n)
        need = sum((e["count"] - generated_count(Path(e["dir"])))
                   * sum(tensor_bytes(s, d) for _, s, d in e["layout"]) for e in sets.values())
        need += 3 * max((c.model_bytes for c in cases), default=0)  # outputs and temp files
        free = shutil.disk_usage(self.work).free
        print(f"workdir {self.work}: {free / 2**30:.1f} GiB free, writing up to {need / 2**30:.1f} GiB")
        if need > free * 0.9:
            raise SystemExit(f"not enough disk space in {self.work}: need {need / 2**30:.1f} GiB")
        spec = self.work / "generate.json"
        spec.write_text(json.dumps({"sets": list(sets.values()), "bn": bn}))
        run = self.runner.run([self.py, str(Path(__file__).resolve()), "_generate", str(spec)])
        if run.returncode != 0:
            raise SystemExit(f"generating checkpoints failed: {run.stderr_tail}")
        info = json.loads(run.stdout)
        self.cuda, self.torch_version = info["cuda"], info["torch"]
        t0 = time.perf_counter()
        os.sync()  # let writeback of the generated files finish before anything is timed
        print(f"generated in {info['seconds']:.1f} s, synced in {time.perf_counter() - t0:.1f} s "
              f"(torch {self.torch_version}, cuda available: {self.cuda})")

    # --- commands ------------------------------------------------------------------------------

    def commands(self, case: Case, out: str) -> dict[str, list[str]]:
        ins = self.inputs(case)
        me = str(Path(__file__).resolve())
        size = os.path.getsize(ins[0])  # same format in and out: the output is about one input's size
        merge = self.merge_cmd(case, out)
        cmds = {
            "cat": self.cat_cmd(case),
            "write": [self.py, me, "_write", out, str(size)],
            "naive": self.timed([self.py, str(HERE / "naive_average.py"), *ins, "-o", out]),
            "ckptavg": self.timed(merge),
        }
        if self.args.no_naive:
            del cmds["naive"]
        for name in ("fairseq", "timm"):  # the projects' own scripts, when a local copy is given
            script = getattr(self.args, name)
            if name == "fairseq" and case.in_fmt != "pt":
                continue  # fairseq's script reads torch checkpoints only
            if script and Path(script).is_file():
                cmds[name] = self.timed([self.py, str(HERE / "script_baseline.py"), name, script, out, *ins])
            elif script:
                self.note(f"--{name} {script}: no such file; its rows are skipped")
        if self.args.device in ("cuda", "auto") and self.cuda:
            cmds["ckptavg-cuda"] = self.timed([*merge, "--device", "cuda"])
        elif self.args.device != "cpu":
            self.note("no CUDA device (torch.cuda.is_available() is False): ckptavg --device cuda rows skipped")
        return cmds

    def merge_cmd(self, case: Case, out: str) -> list[str]:
        return [*self.ckptavg, "merge", *self.inputs(case), "-o", out, "--quiet"]

    def cat_cmd(self, case: Case) -> list[str]:
        return [self.py, str(Path(__file__).resolve()), "_cat", *self.inputs(case)]

    def timed(self, cmd: list[str]) -> list[str]:
        return cmd if self.args.plain else wrapped(cmd)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print(f"note: {text}")

    def measure(self, label: str, cmds: dict[str, list[str]], repeats: dict[str, int], out: str,
                cold: list[str] | None = None) -> dict:
        """Interleaved rounds, each running every command once, so drift hits all of them alike."""
        return {name: summarize(runs) for name, runs in self.rounds(label, cmds, repeats, out, cold).items()}

    def rounds(self, label: str, cmds: dict[str, list[str]], repeats: dict[str, int], out: str,
               cold: list[str] | None = None) -> dict:
        runs: dict[str, list[Run]] = {name: [] for name in cmds}
        for rnd in range(max(repeats.values())):
            for name, cmd in cmds.items():
                if rnd >= repeats[name] or name in self.missing:
                    continue
                if runs[name] and runs[name][-1].returncode != 0:
                    continue  # it failed in this case already: report that, don't repeat it
                if cold and name != "write":
                    drop_from_cache(cold)  # untimed: every reader starts from the disk
                run = self.runner.run(cmd)
                if os.path.exists(out):
                    os.unlink(out)  # deleting is not timed; every run writes a fresh file
                runs[name].append(run)
                status = f"{run.wall_s:6.2f} s {run.maxrss_kb / 1024:7.0f} MiB" if run.returncode == 0 \
                    else f"exit {run.returncode}: {run.stderr_tail[-160:]}"
                print(f"  {label:32} {name:13} round {rnd + 1}: {status}", flush=True)
                if run.returncode != 0 and len(runs[name]) == 1 and unavailable(run) and name != "naive":
                    self.missing[name] = run.stderr_tail[-200:]
                    self.note(f"{name} is not available ({run.stderr_tail[-200:]}); its rows are skipped")
        return {name: r for name, r in runs.items() if r}

    def import_only(self, repeats: int) -> list[Run]:
        cmd = [self.py, "-c", "import torch" if self.args.plain else IMPORT_TORCH]
        runs = self.rounds("baseline", {"import-torch": cmd}, {"import-torch": repeats}, str(self.work / "x"))
        return runs["import-torch"]

    def run_case(self, case: Case) -> dict:
        out = str(self.work / f"out{EXT[case.out_fmt]}")
        cmds = self.commands(case, out)
        if not self.args.cold:
            self.runner.run(cmds["cat"])  # warm the page cache for this set (untimed)
        repeats = dict.fromkeys(cmds, self.args.repeats)
        repeats["cat"] = repeats["write"] = max(self.args.repeats, 3)  # cheap: more rounds
        if not {"shapes", "reference"} & set(case.groups):
            # Scaling rows are about how RSS and time grow; to fit the time budget they get one round
            # fewer, and the naive loop, which is only there to show its own growth, gets one.
            repeats.update((name, max(1, self.args.repeats - 1)) for name in cmds if name.startswith("ckptavg"))
            repeats["naive"] = 1
        return self.measure(case.name, cmds, repeats, out, self.inputs(case) if self.args.cold else None)

    # --- BN recalibration ----------------------------------------------------------------------

    def bn_params(self) -> dict:
        batches, batch_size = (15, 32) if self.args.quick else (50, 64)  # forward: ~0.5 s, ~2-3 s here
        return {"dir": str(self.work / "bn"), "batches": batches, "batch_size": batch_size}

    def run_bn(self, bn: dict) -> dict:
        folder, model = bn["dir"], str(Path(bn["dir"]) / "model.pt")
        out = str(Path(folder) / "out.pt")
        me = str(Path(__file__).resolve())
        spec = str(Path(folder) / "bn.toml")
        forward = [self.py, me, "_forward", folder, model, "MODE", str(bn["batches"]), str(bn["batch_size"])]
        bn_cmd = [*self.ckptavg, "bn", model, "--spec", spec, "-o", out, "--quiet", "--mode"]
        cmds = {
            "bn-precise": self.timed([*bn_cmd, "precise"]),
            "forward-eval": self.timed([part.replace("MODE", "eval") for part in forward]),
            "bn-torch": self.timed([*bn_cmd, "torch"]),
            "forward-train": self.timed([part.replace("MODE", "train") for part in forward]),
        }
        saved_env = dict(self.runner.env)
        self.runner.env["PYTHONPATH"] = os.pathsep.join([folder, self.runner.env["PYTHONPATH"]])
        if self.args.bn_threads:
            # With 2 OpenMP threads on a shared 2-core machine, any other busy process stalls every
            # parallel region: the same run took 4 s or 20 s. One thread makes the ratio repeatable.
            self.runner.env["OMP_NUM_THREADS"] = str(self.args.bn_threads)
        try:
            probe = self.runner.run(cmds["bn-precise"])  # untimed warm-up that also tells if `bn` exists
            if os.path.exists(out):
                os.unlink(out)
            if probe.returncode != 0:
                why = f"exit {probe.returncode}: {probe.stderr_tail[-200:]}"
                self.note(f"ckptavg bn is not available ({why}); BN section skipped")
                return {"skipped": why}
            return self.measure("bn", cmds, dict.fromkeys(cmds, self.args.repeats), out)
        finally:
            self.runner.env = saved_env


# --------------------------------------------------------------------------------------------------
# 6. Ratios, the table, targets, JSON.
# --------------------------------------------------------------------------------------------------

TOOLS = ("naive", "fairseq", "timm", "ckptavg", "ckptavg-cuda")


def net_time(s: dict, base: dict) -> float:
    """Time beyond importing torch. With the wrapper: from the end of `import torch` to the end of the
    program, in the same process (minus the same for the import-only process, about 0). Without it
    (--plain, or a --ckptavg-cmd that is not `PY -m MOD`): wall - the import-only process's wall."""
    if s.get("work_s") is not None and base.get("work_s") is not None:
        return s["work_s"] - base["work_s"]
    return s["wall_s"] - base["wall_s"]


def rss_above(s: dict, base: dict) -> float:
    """Peak RSS above the import-only process, in MiB. With the wrapper: VmHWM at the end of the
    program, before teardown, for both; without it: ru_maxrss (which includes teardown) for both."""
    if s.get("hwm_mb") is not None and base.get("hwm_mb") is not None:
        return s["hwm_mb"] - base["hwm_mb"]
    return s["maxrss_mb"] - base["maxrss_mb"]


def ratios(case: Case, m: dict, base: dict) -> dict:
    """Per tool: net time, net / (read once + write once), net / naive net, peak RSS above the
    import-only process and that over the largest tensor, sampled anon/file parts, CPU use, s/GiB."""
    cat, write = m.get("cat", {}).get("inner_s"), m.get("write", {}).get("inner_s")
    io = cat + write if cat is not None and write is not None else None
    gib_read = case.n * case.model_bytes / 2**30
    result = {"io_s": io}
    for tool in TOOLS:
        s = m.get(tool)
        if not s or s["wall_s"] is None:
            continue
        net, rss = net_time(s, base), rss_above(s, base)
        r = {"net_s": net, "net_over_io": net / io if io else None,
             "rss_above_mb": rss, "rss_over_largest": rss * MiB / case.largest_tensor_bytes,
             "anon_above_mb": s["anon_mb"] - base["anon_mb"], "file_above_mb": s["file_mb"] - base["file_mb"],
             "cpu_over_wall": s["cpu_s"] / s["wall_s"], "s_per_gib": net / gib_read,
             # the issue's literal definitions, noisier: whole-process wall and ru_maxrss minus import-only's
             "wall_minus_import_only_s": s["wall_s"] - base["wall_s"],
             "maxrss_minus_import_only_mb": s["maxrss_mb"] - base["maxrss_mb"]}
        naive = result.get("naive")
        if tool != "naive" and naive and naive["net_s"] > 0:
            r["net_over_naive"] = net / naive["net_s"]
        fairseq = result.get("fairseq")
        if tool.startswith("ckptavg") and fairseq and fairseq["net_s"] > 0:
            r["net_over_fairseq"] = net / fairseq["net_s"]
        result[tool] = r
    return result


def fmt(value, spec: str = ".2f", width: int = 7) -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def print_table(results: list[dict], base: dict) -> None:
    print(f"\nimport-only (python -c 'import torch'): wall {base['wall_s']:.2f} s (import itself "
          f"{fmt(base.get('import_s'), '.2f', 0)} s), peak RSS {fmt(base.get('hwm_mb'), '.0f', 0)} MiB before "
          f"teardown, {base['maxrss_mb']:.0f} MiB with it (medians)\n")
    header = (f"{'case':26} {'MiB/ck':>6} {'lgst':>4} {'cat s':>5} {'write':>5} {'fsync':>5} {'tool':>12} "
              f"{'wall s':>6} {'net s':>6} {'net/io':>6} {'/naive':>6} {'RSS+':>5} {'/lgst':>5} "
              f"{'anon+':>5} {'file+':>5} {'cpu/w':>5} {'s/GiB':>5}")
    print(header)
    print("-" * len(header))
    for res in results:
        case, m, r = res["case"], res["measured"], res["ratios"]
        first = True
        for tool in TOOLS:
            if tool not in m:
                continue
            left = (f"{case['name']:26} {case['model_bytes'] / MiB:6.0f} {case['largest_tensor_bytes'] / MiB:4.0f} "
                    f"{fmt(m['cat'].get('inner_s'), '.2f', 5)} {fmt(m['write'].get('inner_s'), '.2f', 5)} "
                    f"{fmt(m['write'].get('fsync_s'), '.2f', 5)}") if first else " " * 56
            first = False
            t = r.get(tool)
            if t is None:
                print(f"{left} {tool:>12}   {m[tool].get('error', 'no successful run')[:90]}")
                continue
            print(f"{left} {tool:>12} {fmt(m[tool]['wall_s'], '.2f', 6)} {fmt(t['net_s'], '.2f', 6)} "
                  f"{fmt(t['net_over_io'], '.2f', 6)} {fmt(t.get('net_over_naive'), '.2f', 6)} "
                  f"{fmt(t['rss_above_mb'], '.0f', 5)} {fmt(t['rss_over_largest'], '.1f', 5)} "
                  f"{fmt(t['anon_above_mb'], '.0f', 5)} {fmt(t['file_above_mb'], '.0f', 5)} "
                  f"{fmt(t['cpu_over_wall'], '.2f', 5)} {fmt(t['s_per_gib'], '.2f', 5)}")


def scaling_tables(results: list[dict]) -> None:
    """Peak RSS above import-only along N and along model size: it should be a flat line."""
    for group, key, label in (("scaling-n", "n", "N"), ("scaling-size", "scale", "size x")):
        rows = sorted((r for r in results if group in r["case"]["groups"]), key=lambda r: r["case"][key])
        if len(rows) < 2:
            continue
        print(f"\nscaling in {label} ({rows[0]['case']['shape']}): RSS+ MiB and net s")
        print(f"{label:>7} " + " ".join(f"{t + ' RSS+':>17} {t + ' net':>16}" for t in TOOLS[:2]))
        for r in rows:
            cells = []
            for tool in TOOLS[:2]:
                t = r["ratios"].get(tool, {})
                cells.append(f"{fmt(t.get('rss_above_mb'), '.0f', 17)} {fmt(t.get('net_s'), '.2f', 16)}")
            print(f"{r['case'][key]:>7} " + " ".join(cells))


def targets(results: list[dict], bn: dict | None) -> list[dict]:
    """The issue's targets, evaluated on ckptavg's rows (worst case over the cases)."""

    def worst(key: str) -> tuple[float | None, str]:
        # the many-small cases have their own target (seconds, not ratios): printed in their rows
        vals = [(r["ratios"]["ckptavg"][key], r["case"]["name"]) for r in results
                if r["ratios"].get("ckptavg", {}).get(key) is not None and "many-small" not in r["case"]["groups"]]
        return max(vals) if vals else (None, "")

    checks = []
    for key, limit, text in (("net_over_io", 1.2, "net time <= 1.2 x (read once + write once)"),
                             ("net_over_naive", 0.35, "net time <= 0.35 x naive net time"),
                             ("net_over_fairseq", 0.45, "net time <= 0.45 x fairseq's script's net time"),
                             ("rss_over_largest", 4.0, "peak RSS above import-only <= 4 x largest tensor")):
        value, where = worst(key)
        checks.append({"target": text, "limit": limit, "worst": value, "where": where})
    per_gib = {}
    for r in results:
        c = r["case"]
        if "shapes" in c["groups"] and c["in_fmt"] == "pt" and "ckptavg" in r["ratios"]:
            per_gib[c["shape"]] = r["ratios"]["ckptavg"]["s_per_gib"]
    ratio = per_gib["resnet"] / per_gib["transformer"] if {"resnet", "transformer"} <= per_gib.keys() \
        and per_gib["transformer"] > 0 else None
    checks.append({"target": "ResNet-like s/GiB <= 2 x transformer-like s/GiB", "limit": 2.0, "worst": ratio,
                   "where": "shapes, .pt"})
    if bn and "ratios" in bn:
        for mode, value in bn["ratios"].items():
            checks.append({"target": f"ckptavg bn --mode {mode} net <= 1.05 x bare forward net",
                           "limit": 1.05, "worst": value, "where": "bn"})
    return checks


def print_targets(checks: list[dict]) -> None:
    print("\ntargets (ckptavg, worst case over the cases):")
    for c in checks:
        if c["worst"] is None:
            verdict = "not measured"
        else:
            verdict = f"{c['worst']:.2f} ({'ok' if c['worst'] <= c['limit'] else 'MISSED'}, {c['where']})"
        print(f"  {c['target']:58} {verdict}")


def bn_ratios(bn: dict, base: dict) -> dict:
    """precise mode runs the model in eval mode (BN layers collect statistics): compared with an eval
    forward; torch mode (update_bn) runs it in train mode: compared with a train forward."""
    out = {}
    for mode, ref in (("precise", "forward-eval"), ("torch", "forward-train")):
        a, b = bn.get(f"bn-{mode}", {}), bn.get(ref, {})
        if a.get("wall_s") and b.get("wall_s"):
            out[mode] = net_time(a, base) / net_time(b, base)
    return out


def print_bn(bn: dict, base: dict) -> None:
    if "skipped" in bn:
        print(f"\nBN recalibration: skipped ({bn['skipped']})")
        return
    print("\nBN recalibration (net s = wall - import-only):")
    for name, s in bn.items():
        if isinstance(s, dict) and "wall_s" in s:
            net = net_time(s, base) if s["wall_s"] is not None else None
            rss = rss_above(s, base) if s["wall_s"] is not None else None
            print(f"  {name:14} net {fmt(net)} s  RSS+ {fmt(rss, '.0f')} MiB"
                  + (f"   {s['error']}" if "error" in s else ""))
    for mode, value in bn.get("ratios", {}).items():
        ref = "eval" if mode == "precise" else "train"
        print(f"  ckptavg bn --mode {mode} / bare {ref}-mode forward (net times): {value:.2f}")


def compare(previous: dict, current: dict) -> None:
    """This run's ckptavg ratios next to an earlier run's (e.g. the previous commit's JSON)."""
    old = {r["case"]["name"]: r["ratios"] for r in previous.get("cases", [])}
    print(f"\ncompared with {previous.get('when', '?')} ({previous.get('git', '?')}):  old -> new")
    for r in current["cases"]:
        name, new = r["case"]["name"], r["ratios"]
        if name not in old:
            continue
        for tool in TOOLS:
            if tool in new and tool in old[name]:
                a, b = old[name][tool], new[tool]
                print(f"  {name:30} {tool:12} net {a['net_s']:6.2f} -> {b['net_s']:6.2f} s   "
                      f"RSS+ {a['rss_above_mb']:6.0f} -> {b['rss_above_mb']:6.0f} MiB")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "kernel": platform.release(),
            "python": platform.python_version()}


def git_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "no commit"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# 7. Profiling one merge.
# --------------------------------------------------------------------------------------------------


def profile(bench: Bench, case: Case, out: str, profiler: str) -> None:
    """Run one `ckptavg merge` under pyinstrument (.html/.txt/.json...) or py-spy (.svg/.json)."""
    merge = bench.merge_cmd(case, str(bench.work / f"out{EXT[case.out_fmt]}"))
    if merge[1:3] != ["-m", "ckptavg"] and profiler == "pyinstrument":
        raise SystemExit("--profile with pyinstrument needs --ckptavg-cmd '{python} -m ckptavg'")
    if profiler == "pyinstrument":
        cmd = [bench.py, "-m", "pyinstrument", "-o", out, *merge[1:]]
    else:
        py_spy = shutil.which("py-spy") or str(Path(bench.py).parent / "py-spy")
        fmt_ = "speedscope" if out.endswith(".json") else "raw" if out.endswith(".txt") else "flamegraph"
        cmd = [py_spy, "record", "--threads", "--rate", "250", "--format", fmt_, "-o", out, "--", *merge]
    bench.runner.run(bench.cat_cmd(case))  # warm the page cache
    print(f"profiling {case.name} with {profiler}: {shlex.join(cmd)}")
    run = bench.runner.run(cmd)
    if run.returncode != 0:
        raise SystemExit(f"profiling failed (exit {run.returncode}): {run.stderr_tail}")
    print(f"profile written to {out} ({run.wall_s:.1f} s under the profiler)")


# --------------------------------------------------------------------------------------------------
# 8. Main.
# --------------------------------------------------------------------------------------------------


def run_benchmark(bench: Bench, cases: list[Case], bn_spec: dict | None, started: float) -> dict:
    """Import-only rounds, every case, the BN section, import-only again; then the ratios and tables."""
    args = bench.args
    early = bench.import_only(2)
    measured = [bench.run_case(case) for case in cases]
    bn = bench.run_bn(bn_spec) if bn_spec else None
    late = bench.import_only(1)  # the machine drifts: sample it again at the end
    base, base_early, base_late = summarize(early + late), summarize(early), summarize(late)
    drift = base_late["wall_s"] / base_early["wall_s"] - 1
    if abs(drift) > 0.1:
        bench.note(f"import-only wall time drifted {drift:+.0%} from the start to the end of the run")

    results = []
    for case, m in zip(cases, measured):
        info = {"name": case.name, "shape": case.shape, "scale": case.scale, "n": case.n, "in_fmt": case.in_fmt,
                "out_fmt": case.out_fmt, "groups": case.groups, "tensors": len(case.layout),
                "model_bytes": case.model_bytes, "largest_tensor_bytes": case.largest_tensor_bytes}
        results.append({"case": info, "measured": m, "ratios": ratios(case, m, base)})
    if bn and "skipped" not in bn:
        bn["ratios"] = bn_ratios(bn, base)
    elapsed = time.perf_counter() - started

    print_table(results, base)
    scaling_tables(results)
    if bn:
        print_bn(bn, base)
    checks = targets(results, bn)
    print_targets(checks)
    for n in bench.notes:
        print(f"note: {n}")
    print(f"\nbenchmark took {elapsed:.0f} s")
    return {"when": datetime.datetime.now().isoformat(timespec="seconds"), "git": git_revision(),
            "machine": machine(), "torch": bench.torch_version, "cuda": bench.cuda, "args": vars(args),
            "elapsed_s": elapsed, "import_only": base, "import_only_start": base_early,
            "import_only_end": base_late, "cases": results, "bn": bn, "targets": checks, "notes": bench.notes}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller models, fewer cases and rounds (< 1 min)")
    p.add_argument("--repeats", type=int, help="rounds per command (default 3, quick 1); medians are kept")
    p.add_argument("--cases", help="comma-separated globs or substrings of case names to run")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--reference", action="store_true", help="add the 8 x 512 MiB fp32 reference case")
    p.add_argument("--dcp", action="store_true",
                   help="the DCP case alone: 8 x 96 MiB DCP folders written by a real 2-rank dcp.save (dcp_cases.py)")
    p.add_argument("--cold", action="store_true",
                   help="evict the inputs from the page cache before every timed read (cat, naive, ckptavg...)")
    p.add_argument("--many-small", action="store_true",
                   help="add 2 checkpoints of 100,000 four-element tensors (.safetensors and .pt)")
    p.add_argument("--bn", action="store_true", help="time `ckptavg bn` against a bare forward pass")
    p.add_argument("--bn-threads", type=int, default=1,
                   help="OMP_NUM_THREADS for the BN section's children (default 1; 0 leaves it unset)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline (faster, no /naive ratio)")
    p.add_argument("--fairseq", metavar="PATH", help="fairseq's scripts/average_checkpoints.py (a local copy): "
                   "add it as a baseline")
    p.add_argument("--timm", metavar="PATH", help="timm's avg_checkpoints.py (a local copy): add it as a baseline")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, plus CUDA rows when torch.cuda.is_available()")
    p.add_argument("--workdir", help="where to generate checkpoints (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep generated inputs; reused by later --keep runs")
    p.add_argument("--json", help="write results here (default: benchmarks/results/bench-TIMESTAMP.json)")
    p.add_argument("--compare", help="an earlier JSON result to print next to this run's ratios")
    p.add_argument("--plain", action="store_true",
                   help="run commands as given (no in-process import timing): net = wall - import-only")
    p.add_argument("--python", default=sys.executable, help="interpreter for every child (default: this one)")
    p.add_argument("--ckptavg-cmd", default="{python} -m ckptavg", help="how to invoke ckptavg")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a child is killed")
    p.add_argument("--profile", metavar="OUT", help="only profile one merge; write the profile to OUT")
    p.add_argument("--profiler", choices=("pyinstrument", "py-spy"), default="pyinstrument")
    p.add_argument("--profile-case", help="case to profile (default: the first selected case)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def child_env(python: str) -> dict:
    """The repository root first on PYTHONPATH, so the checkout's ckptavg is the one measured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["TQDM_DISABLE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_dcp_case(args: argparse.Namespace) -> int:
    """DCP inputs written by a real multi-rank ``dcp.save`` (see dcp_cases.py): peak RSS above an
    import-only process and net time against reading the inputs once, for DCP and safetensors output."""
    import dcp_cases

    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckptavg-bench-dcp-", dir=root))
    try:
        n, mib = (4, 32) if args.quick else (8, 96)
        folders = dcp_cases.make_dcp_checkpoints(work / "inputs", n=n, mib=mib, world=2)
        res = dcp_cases.measure(folders, work / "outputs", repeats=args.repeats or (1 if args.quick else 3))
        print(f"dcp-n{n}: {n} x {mib} MiB DCP folders (2-rank dcp.save), cat {res['cat_seconds']:.2f} s")
        for kind in ("dcp", "safetensors"):
            r = res[kind]
            print(f"  -o {kind:12} net {r['net_seconds']:6.2f} s  net/cat {r['net_seconds'] / res['cat_seconds']:6.1f}"
                  f"  peak RSS above import {r['peak_rss_mib']:6.1f} MiB")
        json_path = Path(args.json) if args.json else \
            HERE / "results" / f"bench-dcp-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=1))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_generate":
        return op_generate(argv[1]) or 0
    if argv and argv[0] == "_cat":
        return op_cat(argv[1:]) or 0
    if argv and argv[0] == "_write":
        return op_write(argv[1], int(argv[2])) or 0
    if argv and argv[0] == "_forward":
        return op_forward(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])) or 0

    args = parse_args(argv)
    if args.dcp:
        return run_dcp_case(args)
    cases = select_cases(build_cases(args.quick, args.reference, args.many_small), args.cases)
    if args.profile:
        cases = select_cases(cases, args.profile_case)[:1]
    if args.list or not cases:
        for c in cases:
            print(f"{c.name:32} {c.model_bytes / MiB:7.0f} MiB/ckpt  largest {c.largest_tensor_bytes / MiB:4.0f} MiB"
                  f"  {len(c.layout):4} tensors  groups: {', '.join(c.groups)}")
        return 0 if cases else f"no case matches {args.cases!r} (see --list)"

    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    work = root / "ckptavg-bench" if args.keep else Path(tempfile.mkdtemp(prefix="ckptavg-bench-", dir=root))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, child_env(args.python), args.timeout)
    bench = Bench(args, work, runner)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.perf_counter()
    try:
        bn_spec = bench.bn_params() if args.bn and not args.profile else None
        bench.generate(cases, bn_spec)
        if args.profile:
            profile(bench, cases[0], args.profile, args.profiler)
            return 0
        report = run_benchmark(bench, cases, bn_spec, started)
        json_path = Path(args.json) if args.json else \
            HERE / "results" / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        print(f"results written to {json_path}")
        if args.compare:
            compare(json.loads(Path(args.compare).read_text()), report)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        runner.kill_current()
        if args.keep:
            for leftover in work.glob("out*"):
                leftover.unlink()
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

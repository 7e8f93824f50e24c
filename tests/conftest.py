"""Shared helpers: tests build their own checkpoints in temporary folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import hypothesis  # noqa: F401  (imported early: a late import inside pytest hits a CPython 3.11.7 AST bug)
import pytest
import torch
from click.testing import CliRunner

from ckptavg.cli import cli


def make_state_dicts(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, drift: float = 0.05):
    """``n`` state dicts of a small conv net, as a training run would drift them."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "bn.weight": torch.rand(8, generator=g) + 0.5,
        "bn.bias": torch.randn(8, generator=g),
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.running_var": torch.rand(8, generator=g) + 0.5,
        "fc.weight": torch.randn(10, 8, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }
    out = []
    for i in range(n):
        sd = {}
        for k, v in base.items():
            sd[k] = (v + drift * i * torch.randn(v.shape, generator=g)).to(dtype)
        sd["bn.num_batches_tracked"] = torch.tensor(100 * (i + 1), dtype=torch.int64)
        out.append(sd)
    return out


class SmallNet(torch.nn.Module):
    """The module whose state dicts :func:`make_state_dicts` produces."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns (exit code, stdout, stderr)."""
    runner = CliRunner()

    def _run(*args: str):
        res = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        return res.exit_code, res.stdout, res.stderr

    return _run


def console_script() -> list[str]:
    exe = shutil.which("ckptavg", path=os.path.dirname(sys.executable)) or shutil.which("ckptavg")
    if exe is None:
        pytest.skip("the ckptavg console script is not installed")
    return [exe]


@pytest.fixture
def run_script():
    """Run the installed console script as a subprocess; returns CompletedProcess."""

    def _run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
        return subprocess.run(console_script() + [str(a) for a in args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout)

    return _run


def slow_chunks(seconds: float) -> str:
    """Python source that holds every chunk of a merge up ``seconds`` (run before ckptavg's CLI in
    a child process): a merge that is surely still running when a test signals or stops it."""
    return ("import time\nfrom ckptavg.engine.worker import Worker\n_process = Worker.process\n"
            f"Worker.process = lambda self, job: (time.sleep({seconds}), _process(self, job))[1]\n")


def sigint_default() -> None:
    """For a child process a test sends SIGINT to: Ctrl-C's default effect, even when pytest itself
    was started in the background by a non-interactive shell (which ignores SIGINT there, and an
    ignored signal stays ignored in every child: Python then installs no KeyboardInterrupt handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fp64_mean(tensors, weights=None):
    ts = [t.double() for t in tensors]
    if weights is None:
        return sum(ts) / len(ts)
    return sum(w * t for w, t in zip(weights, ts))


def assert_close32(got, ref):
    """``got`` (float32 accumulation) equals the fp64 reference within float32 rounding."""
    torch.testing.assert_close(got.double(), ref.double(), rtol=4e-6, atol=2e-6)


# Imports first, then reset the kernel's peak-RSS mark (VmHWM) and measure the merge alone:
# the import of torch has a transient peak of its own that would hide the merge's cost.
_RSS_PROBE = """
import json, sys
import torch, ckptavg
import ckptavg.api, ckptavg.engine, ckptavg.io.hf_folder_out, ckptavg.io.safetensors_out, ckptavg.io.torch_out

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
ckptavg.merge(sys.argv[3:], sys.argv[1], **json.loads(sys.argv[2]))
print(status("VmHWM") - base)
"""


def merge_peak_rss(output, inputs, **merge_options) -> int:
    """Peak RSS (bytes) of ``ckptavg.merge(inputs, output, **merge_options)`` in a fresh
    process, above that process's RSS after its imports (Linux only)."""
    import json

    res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(output), json.dumps(merge_options),
                          *map(str, inputs)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1])

"""The digits example trains to the same weights on every CPU: runs under several ATEN_CPU_CAPABILITY
and MKL code paths give bit-identical checkpoints, while the same runs without the example's grid
rounding differ (so the settings really change the arithmetic and the test can fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
TRAIN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import model, train
if sys.argv[4] == "raw":  # the example without its rounding: torch's own init, no snapping
    model.init_exactly = lambda net: None
    model.snap_to_grid = lambda net: None
train.train(Path(sys.argv[2]), epochs=int(sys.argv[3]))
"""
SETTINGS = {
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},  # only where the CPU has it (else torch dies of SIGILL)
    "mkl-sse42": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "mkl-compatible": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
}


def _has_avx512() -> bool:
    try:
        return " avx512f " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    except OSError:
        return False


def _weights(tmp: Path, name: str, epochs: int, mode: str = "rounded") -> dict[str, torch.Tensor]:
    out = tmp / f"{name}-{mode}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **SETTINGS[name]}
    subprocess.run([sys.executable, "-c", TRAIN, str(EXAMPLE), str(out), str(epochs), mode], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    last = sorted(out.glob("epoch=*.ckpt"))[-1]
    return torch.load(last, weights_only=True)["state_dict"]


def test_training_gives_the_same_weights_on_every_cpu_code_path(tmp_path: Path) -> None:
    ref = _weights(tmp_path, "default", 3)
    for name in SETTINGS:
        if name == "default" or (name == "avx512" and not _has_avx512()):
            continue
        got = _weights(tmp_path, name, 3)
        assert got.keys() == ref.keys()
        differ = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not differ, f"{name}: {differ[:3]}"


def test_without_the_rounding_the_code_paths_give_different_models(tmp_path: Path) -> None:
    a, b = _weights(tmp_path, "default", 1, "raw"), _weights(tmp_path, "avx2", 1, "raw")
    assert any(not torch.equal(a[k], b[k]) for k in a)

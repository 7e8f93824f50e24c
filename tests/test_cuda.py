"""The CUDA path (same code as the CPU path): skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ckptavg

from .conftest import fp64_mean

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_equals_cpu_and_reference(tmp_path, dtype, monkeypatch):
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "4096")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50_000, generator=g)
    paths = []
    sds = []
    for i in range(5):
        sd = {"w": (base + 0.01 * i * torch.randn(50_000, generator=g)).to(dtype), "n": torch.tensor(i)}
        sds.append(sd)
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(sd, str(paths[-1]))
    for kwargs in ({}, {"method": "ema", "decay": 0.7}, {"dtype": "float32"}):
        cpu = ckptavg.average(paths, order="given", **kwargs)
        gpu = ckptavg.average(paths, order="given", device="cuda", **kwargs)
        assert torch.equal(gpu["n"], cpu["n"])
        assert gpu["w"].dtype == cpu["w"].dtype and gpu["w"].device.type == "cpu"
        if kwargs:  # weighted sums: a different summation order may change the last bit
            torch.testing.assert_close(gpu["w"].double(), cpu["w"].double(), rtol=1e-2, atol=1e-3)
        else:  # uniform: both are the correctly rounded mean
            assert torch.equal(gpu["w"], cpu["w"])
    ref = fp64_mean([sd["w"] for sd in sds]).to(dtype)
    assert torch.equal(ckptavg.average(paths, device="cuda")["w"], ref)

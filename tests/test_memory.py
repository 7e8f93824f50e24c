"""Peak memory stays bounded by a few times the largest tensor, whatever the input count."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from .conftest import merge_peak_rss


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("fmt,workers", [("pt", None), ("safetensors", None), ("safetensors", "4")])
def test_peak_rss_bounded_by_largest_tensor(tmp_path, monkeypatch, fmt, workers):
    if workers:  # every worker has a chunk in flight; chunks shrink so that memory does not grow
        monkeypatch.setenv("CKPTAVG_WORKERS", workers)
    largest = 4 << 20  # elements: 16 MB float32
    n_inputs = 6
    g = torch.Generator().manual_seed(0)
    base = {"big.a": torch.randn(largest, generator=g), "big.b": torch.randn(largest // 2, generator=g)}
    for i in range(200):
        base[f"small.{i}"] = torch.randn(64, 33, generator=g)
    paths = []
    for k in range(n_inputs):
        sd = {n: t + 0.01 * k for n, t in base.items()}
        p = tmp_path / f"ck{k}.{fmt}"
        if fmt == "pt":
            torch.save(sd, p)
        else:
            save_file(sd, str(p))
        paths.append(str(p))
    total_input = sum((tmp_path / f"ck{k}.{fmt}").stat().st_size for k in range(n_inputs))
    out = tmp_path / f"out.{fmt}"
    above = merge_peak_rss(out, paths)
    largest_bytes = largest * 4
    assert out.exists()
    # the whole input set is ~6x the model; loading it would cost far more than this bound
    assert total_input > 8 * largest_bytes
    print(f"peak RSS above import: {above / 2**20:.1f} MiB (largest tensor {largest_bytes / 2**20:.0f} MiB)")
    assert above <= 4 * largest_bytes


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_bf16_with_four_workers(tmp_path, monkeypatch):
    """16-bit inputs are summed in float64 (4x their size per element) and cast back: still a
    few times the largest tensor with four workers in flight."""
    monkeypatch.setenv("CKPTAVG_WORKERS", "4")
    largest = 8 << 20  # elements: 16 MB bf16
    g = torch.Generator().manual_seed(1)
    paths = []
    for k in range(4):
        sd = {"emb": torch.randn(largest, generator=g).to(torch.bfloat16),
              "norm": torch.randn(4096, generator=g).to(torch.bfloat16)}
        paths.append(tmp_path / f"ck{k}.safetensors")
        save_file(sd, str(paths[-1]))
    above = merge_peak_rss(tmp_path / "out.safetensors", paths)
    largest_bytes = largest * 2
    print(f"peak RSS above import: {above / 2**20:.1f} MiB (largest tensor {largest_bytes / 2**20:.0f} MiB)")
    assert above <= 4 * largest_bytes

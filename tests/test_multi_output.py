"""Several outputs from one pass: ``engine.run(plan, writers, weights=[...])``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptavg import engine
from ckptavg.io import open_writer
from ckptavg.io.files import InputFile
from ckptavg.options import MergeOptions
from ckptavg.planner import build_plan
from ckptavg.weights import ema, explicit, uniform

from .conftest import fp64_mean


def _inputs(tmp_path: Path, n: int = 5) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    sds = []
    paths = []
    for i in range(n):
        sd = {
            "big": torch.randn(3000, 7, generator=g),  # several chunks at the chunk size below
            "half": torch.randn(2500, generator=g).to(torch.bfloat16),
            "steps": torch.tensor(100 * i),  # integer: copied from the last input
        }
        for k in range(40):  # many small tensors, packed into shared chunks
            sd[f"small.{k}"] = torch.randn(k + 1, generator=g)
        sd["tail"] = torch.randn(5, generator=g).to(torch.float16)
        sds.append(sd)
        paths.append(tmp_path / f"ck{i}.safetensors")
        save_file(sd, str(paths[-1]))
    return paths, sds


def _run(paths, outs, weights):
    plan = build_plan(paths, MergeOptions(order="given"))
    writers = [open_writer("safetensors", o, plan.entries(), None) for o in outs]
    try:
        engine.run(plan, writers, weights=weights)
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        for i in plan.inputs:
            i.checkpoint.close()


@pytest.mark.parametrize("chunk", ["1000", "0"])
def test_three_outputs_equal_three_single_runs_and_fp64(tmp_path, monkeypatch, chunk):
    if chunk != "0":
        monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", chunk)
    paths, sds = _inputs(tmp_path)
    n = len(paths)
    ws = [uniform(n), ema(n, 0.7), explicit([3.0, 0.0, 1.0, 0.5, 2.0], n)]
    multi = [tmp_path / f"multi{m}.safetensors" for m in range(3)]
    _run(paths, multi, ws)
    for m, w in enumerate(ws):
        single = tmp_path / f"single{m}.safetensors"
        _run(paths, [single], [w])
        assert multi[m].read_bytes() == single.read_bytes(), f"output {m} differs from its single-output run"
        got = load_file(str(multi[m]))
        assert set(got) == set(sds[0])
        assert torch.equal(got["steps"], sds[-1]["steps"])
        for name, t in sds[0].items():
            if not t.is_floating_point():
                continue
            ref = fp64_mean([sd[name] for sd in sds], None if m == 0 else w.values)
            assert got[name].dtype == t.dtype
            if m == 0 and t.dtype != torch.float32:
                # uniform means of 16-bit inputs are correctly rounded: the fp64 reference, cast
                assert torch.equal(got[name], ref.to(t.dtype)), name
            elif t.dtype == torch.float32:
                torch.testing.assert_close(got[name].double(), ref, rtol=4e-6, atol=2e-6)
            else:  # weighted 16-bit: within the output dtype's rounding
                torch.testing.assert_close(got[name].double(), ref, rtol=8e-3, atol=1e-5)


def test_input_with_zero_weight_in_every_output_is_not_read(tmp_path, monkeypatch):
    paths, sds = _inputs(tmp_path, n=3)
    read: list[Path] = []
    orig = InputFile.preadv_into

    def spy(self, bufs, offset):
        read.append(self.path)
        return orig(self, bufs, offset)

    monkeypatch.setattr(InputFile, "preadv_into", spy)
    ws = [explicit([1.0, 0.0, 1.0], 3), explicit([0.0, 0.0, 1.0], 3)]
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    _run(paths, outs, ws)
    assert paths[0] in read and paths[2] in read and paths[1] not in read
    b = load_file(str(outs[1]))
    assert torch.equal(b["big"], sds[2]["big"])  # weight 1 on one input: that input exactly


def test_weights_must_match_outputs(tmp_path):
    from ckptavg.errors import OptionError

    paths, _ = _inputs(tmp_path, n=2)
    plan = build_plan(paths, MergeOptions(order="given"))
    w = open_writer("memory", None, plan.entries())
    with pytest.raises(OptionError, match="weight vector"):
        engine.run(plan, [w], weights=[uniform(2), uniform(2)])
    with pytest.raises(OptionError, match="3 values"):
        engine.run(plan, [w], weights=[uniform(3)])


_PROBE = """
import sys
from pathlib import Path
import torch, ckptavg
from ckptavg import engine
from ckptavg.io import open_writer
from ckptavg.options import MergeOptions
from ckptavg.planner import build_plan
from ckptavg.weights import ema, explicit, uniform

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

out, m, paths = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
n = len(paths)
plan = build_plan(paths, MergeOptions(order="given"))
ws = [uniform(n), ema(n, 0.8), ema(n, 0.5), explicit(list(range(1, n + 1)), n)][:m]
writers = [open_writer("safetensors", out / f"o{k}.safetensors", plan.entries(), None) for k in range(m)]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
engine.run(plan, writers, weights=ws)
for w in writers:
    w.commit()
print(status("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_with_four_outputs(tmp_path):
    largest = 2 << 20  # elements: 8 MB float32
    g = torch.Generator().manual_seed(1)
    base = {"big": torch.randn(largest, generator=g), "mid": torch.randn(largest // 4, generator=g)}
    for i in range(100):
        base[f"small.{i}"] = torch.randn(32, 17, generator=g)
    paths = []
    for k in range(6):
        p = tmp_path / f"ck{k}.safetensors"
        save_file({n: t + 0.01 * k for n, t in base.items()}, str(p))
        paths.append(str(p))
    peaks = {}
    for m in (1, 4):
        d = tmp_path / f"out{m}"
        d.mkdir()
        res = subprocess.run([sys.executable, "-c", _PROBE, str(d), str(m), *paths], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        peaks[m] = int(res.stdout.strip().splitlines()[-1])
        assert len(list(d.glob("o*.safetensors"))) == m
    largest_bytes = largest * 4
    print(f"peak RSS above start: M=1 {peaks[1] / 2**20:.1f} MiB, M=4 {peaks[4] / 2**20:.1f} MiB")
    # three read buffers plus, per output, two accumulators: a few times the largest tensor, times M
    assert peaks[1] <= 4 * largest_bytes
    assert peaks[4] <= 4 * largest_bytes * 4
    assert peaks[4] < 6 * 4 * largest_bytes  # six inputs: loading them would cost far more

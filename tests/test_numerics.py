"""The merge result against independent references: torch's AveragedModel and fp64 means."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ckptavg
from ckptavg.weights import ema_per_step, power_ema, sigma_rel_to_gamma

from .conftest import SmallNet, assert_close32, fp64_mean, make_state_dicts


def _save_run(tmp_path, sds, fmt="pt"):
    paths = []
    for i, sd in enumerate(sds):
        if fmt == "pt":
            p = tmp_path / f"epoch={i:02d}-step={(i + 1) * 100}.ckpt"
            torch.save({"epoch": i, "global_step": (i + 1) * 100, "state_dict": sd}, p)
        else:
            p = tmp_path / f"model_{(i + 1) * 100:06d}.safetensors"
            save_file(sd, str(p), metadata={"step": str((i + 1) * 100), "epoch": str(i)})
        paths.append(p)
    return paths


def _float_params(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_uniform_equals_averaged_model(tmp_path, fmt):
    sds = make_state_dicts(6)
    paths = _save_run(tmp_path, sds, fmt)
    net = SmallNet()
    avg = AveragedModel(SmallNet(), use_buffers=True)
    for sd in sds:
        net.load_state_dict(sd)
        avg.update_parameters(net)
    out = tmp_path / ("swa.pt" if fmt == "pt" else "swa.safetensors")
    report = ckptavg.merge(paths, out)
    got = torch.load(out, weights_only=True) if fmt == "pt" else load_file(out)
    for k, ref in _float_params(avg.module).items():
        torch.testing.assert_close(got[k], ref, rtol=2e-6, atol=1e-6)
        assert_close32(got[k], fp64_mean([sd[k] for sd in sds]))
    assert report.weights == pytest.approx([1 / 6] * 6)
    # SWA's result loads into the model strictly
    SmallNet().load_state_dict(got)


def test_ema_equals_averaged_model_ema(tmp_path):
    sds = make_state_dicts(7, seed=3)
    paths = _save_run(tmp_path, sds)
    decay = 0.8
    net = SmallNet()
    ema = AveragedModel(SmallNet(), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    for sd in sds:
        net.load_state_dict(sd)
        ema.update_parameters(net)
    out = tmp_path / "ema.pt"
    report = ckptavg.merge(paths, out, method="ema", decay=decay)
    got = torch.load(out, weights_only=True)
    for k, ref in _float_params(ema.module).items():
        torch.testing.assert_close(got[k], ref, rtol=1e-5, atol=1e-6)
    n = 7
    expected = [decay ** (n - 1)] + [(1 - decay) * decay ** (n - i) for i in range(2, n + 1)]
    assert report.weights == pytest.approx(expected)


def test_ema_per_step_matches_step_by_step_simulation():
    steps = [0, 3, 4, 10, 11, 25]
    d = 0.9
    w = ema_per_step(steps, d).values
    # simulate: a scalar "weight" per checkpoint; the live model is checkpoint i from step
    # t_{i-1}+1 through t_i, and the EMA (started at the first checkpoint) decays per step
    n = len(steps)
    ema_vec = [1.0] + [0.0] * (n - 1)
    for i in range(1, n):
        for _ in range(steps[i] - steps[i - 1]):
            ema_vec = [d * e for e in ema_vec]
            ema_vec[i] += 1 - d
    assert w == pytest.approx(ema_vec, rel=1e-12)
    assert math.fsum(w) == pytest.approx(1.0)


def test_ema_per_step_from_recorded_steps(tmp_path):
    sds = make_state_dicts(4, seed=5)
    paths = _save_run(tmp_path, sds)
    out = tmp_path / "o.pt"
    rep = ckptavg.merge(paths, out, method="ema", decay_per_step=0.995)
    ref_w = ema_per_step([100, 200, 300, 400], 0.995).values
    assert rep.weights == pytest.approx(ref_w)
    got = torch.load(out, weights_only=True)
    ref = fp64_mean([sd["fc.weight"] for sd in sds], ref_w)
    torch.testing.assert_close(got["fc.weight"].double(), ref, rtol=1e-6, atol=1e-6)


def test_power_ema_weights():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    steps = [100, 200, 300, 400]
    w = power_ema(steps, gamma=0.0).values  # gamma 0: uniform density on [0, T]
    assert w == pytest.approx([150 / 400, 100 / 400, 100 / 400, 50 / 400])
    w = power_ema(steps, sigma_rel=0.05).values
    assert math.fsum(w) == pytest.approx(1.0) and w[-1] > w[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_16bit_uniform_is_correctly_rounded(tmp_path, dtype, n, monkeypatch):
    """Realistic checkpoints (one weight drifts a little between checkpoints): the float32
    sum of 16-bit values is exact, so the mean is the correctly rounded fp64 mean."""
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "1000")  # many chunks, ragged last one
    g = torch.Generator().manual_seed(n)
    base = torch.randn(50_000, generator=g) * 4.0 ** torch.randint(-4, 5, (50_000,), generator=g)
    sds = [{"w": (base * (1 + 0.05 * torch.randn(50_000, generator=g))).to(dtype)} for _ in range(n)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(sd, str(paths[-1]))
    out = tmp_path / "o.safetensors"
    ckptavg.merge(paths, out, order="given")
    got = load_file(out)["w"]
    ref = fp64_mean([sd["w"] for sd in sds]).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, ref), f"{(got != ref).sum()} elements differ from the rounded fp64 mean"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_extreme_spread(tmp_path, dtype):
    """Unrelated values per checkpoint (up to 2^24 apart in one element): float32 sums are
    no longer exact; float64 accumulation still gives the correctly rounded mean and
    float32 stays within one unit in the last place."""
    g = torch.Generator().manual_seed(7)
    n = 8
    sds = [{"w": (torch.randn(40_000, generator=g) * 4.0 ** torch.randint(-6, 7, (40_000,), generator=g)).to(dtype)}
           for _ in range(n)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(sd, str(paths[-1]))
    ref = fp64_mean([sd["w"] for sd in sds]).to(dtype)
    exact = ckptavg.average(paths, accumulate="float64")["w"]
    assert torch.equal(exact, ref)
    fast = ckptavg.average(paths)["w"]
    differ = fast != ref
    assert differ.float().mean() < 1e-3
    ulp = (torch.nextafter(ref.float().abs().to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
           - ref.float().abs())
    assert bool(((fast.float() - ref.float()).abs() <= ulp)[differ].all())


def test_fp32_to_bf16_output_and_float64_accumulation(tmp_path):
    sds = make_state_dicts(5, seed=11)
    paths = _save_run(tmp_path, sds)
    out = tmp_path / "o.safetensors"
    ckptavg.merge(paths, out, dtype="bfloat16", accumulate="float64")
    got = load_file(out)
    for k in ("conv.weight", "fc.weight"):
        ref = fp64_mean([sd[k] for sd in sds]).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], ref)
    assert got["bn.num_batches_tracked"].dtype == torch.int64


def test_float64_inputs_stay_exact(tmp_path):
    sds = [{"x": torch.randn(1000, dtype=torch.float64) * (i + 1)} for i in range(3)]
    paths = _save_run(tmp_path, sds)
    got = ckptavg.average(paths)
    assert got["x"].dtype == torch.float64
    torch.testing.assert_close(got["x"], fp64_mean([s["x"] for s in sds]), rtol=1e-15, atol=1e-15)


def test_integer_and_bool_tensors_come_from_last(tmp_path):
    sds = make_state_dicts(4)
    for i, sd in enumerate(sds):
        sd["mask"] = torch.tensor([i % 2 == 0, True, False])
        sd["counter"] = torch.tensor([i, 7 * i], dtype=torch.int32)
    paths = _save_run(tmp_path, sds)
    got = ckptavg.average(paths)
    assert torch.equal(got["bn.num_batches_tracked"], sds[-1]["bn.num_batches_tracked"])
    assert torch.equal(got["mask"], sds[-1]["mask"])
    assert torch.equal(got["counter"], sds[-1]["counter"])
    assert got["counter"].dtype == torch.int32


def test_explicit_weights(tmp_path):
    sds = make_state_dicts(3, seed=2)
    paths = _save_run(tmp_path, sds)
    got = ckptavg.average(paths, weights=[5, 3, 2], normalize=True)
    ref = fp64_mean([sd["fc.weight"] for sd in sds], [0.5, 0.3, 0.2])
    torch.testing.assert_close(got["fc.weight"].double(), ref, rtol=1e-6, atol=1e-6)
    got2 = ckptavg.average(paths, weights="0.5,0.3,0.2")
    assert torch.equal(got["fc.weight"], got2["fc.weight"])
    with pytest.raises(ckptavg.CkptavgError, match="sum"):
        ckptavg.average(paths, weights=[1, -1, 0], normalize=True)
    with pytest.raises(ckptavg.CkptavgError, match="3 checkpoints"):
        ckptavg.average(paths, weights=[1, 1])


def test_explicit_weights_are_applied_as_given(tmp_path):
    """Unnormalised and negative weights (task arithmetic: base + (tuned - base) * 2) are applied exactly, with a
    warning when they do not sum to 1; --normalize opts back in."""
    sds = make_state_dicts(3, seed=3)
    paths = _save_run(tmp_path, sds)
    w = [1.0, -2.0, 2.0]  # sums to 1 (no warning): theta_0 + 2 (theta_2 - theta_1)
    got = ckptavg.average(paths, weights=w)
    for k in ("fc.weight", "conv.weight", "bn.running_var"):
        ref = sum(x * sd[k].double() for x, sd in zip(w, sds))
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.warns(ckptavg.CkptavgWarning, match="sum to 3"):
        summed = ckptavg.average(paths, weights=[1, 1, 1])
    ref = sum(sd["fc.weight"].double() for sd in sds)
    torch.testing.assert_close(summed["fc.weight"].double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(summed["bn.num_batches_tracked"], sds[-1]["bn.num_batches_tracked"])  # counters: the last
    with pytest.warns(ckptavg.CkptavgWarning, match="sum to 0"):
        diff = ckptavg.average(paths[1:], weights=[1, -1])
    torch.testing.assert_close(diff["fc.weight"].double(), sds[1]["fc.weight"].double() - sds[2]["fc.weight"].double(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ckptavg.CkptavgError, match="--normalize applies to --weights"):
        ckptavg.average(paths, normalize=True)


def test_zero_weight_input_is_not_read(tmp_path, monkeypatch):
    sds = make_state_dicts(3, seed=4)
    paths = _save_run(tmp_path, sds)
    got = ckptavg.average(paths, weights=[0, 0.5, 0.5])
    ref = fp64_mean([sds[1]["conv.weight"], sds[2]["conv.weight"]])
    torch.testing.assert_close(got["conv.weight"].double(), ref, rtol=1e-6, atol=1e-7)


def test_chunking_and_strided_views(tmp_path, monkeypatch):
    """Tensors split across many chunks, and views saved as such (transposed, sliced)."""
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "37")
    raw = []
    for i in range(3):
        big = torch.randn(40, 30) + i
        sd = {"t": big.t(), "slice": big[5:9], "whole": big, "scalar": torch.tensor(float(i))}
        raw.append(sd)
        torch.save(sd, tmp_path / f"ck{i}.pt")
    got = ckptavg.average(sorted(tmp_path.glob("*.pt")))
    for k in ("t", "slice", "whole", "scalar"):
        assert_close32(got[k], fp64_mean([r[k] for r in raw]))
        assert got[k].shape == raw[0][k].shape


def test_tied_weights_read_once_and_kept_tied(tmp_path):
    sds = []
    for i in range(3):
        emb = torch.randn(20, 6) + i
        sds.append({"embed.weight": emb, "lm_head.weight": emb, "b": torch.randn(6)})
        torch.save(sds[-1], tmp_path / f"c{i}.pt")
    paths = sorted(tmp_path.glob("c*.pt"))
    p = ckptavg.plan(paths)
    assert sum(t.alias_of is not None for t in p.tensors) == 1
    out = tmp_path / "o.pt"
    ckptavg.merge(paths, out)
    got = torch.load(out, weights_only=True)
    assert got["embed.weight"].data_ptr() == got["lm_head.weight"].data_ptr()
    assert_close32(got["embed.weight"], fp64_mean([s["embed.weight"] for s in sds]))
    out2 = tmp_path / "o.safetensors"
    ckptavg.merge(paths, out2)
    st = load_file(out2)
    assert torch.equal(st["embed.weight"], st["lm_head.weight"])
    assert torch.equal(st["embed.weight"], got["embed.weight"])


def test_nonfinite_input_is_an_error_naming_file_and_tensor(tmp_path):
    sds = make_state_dicts(3)
    sds[1]["fc.weight"][2, 3] = float("nan")
    paths = _save_run(tmp_path, sds)
    out = tmp_path / "o.pt"
    with pytest.raises(ckptavg.CkptavgError) as ei:
        ckptavg.merge(paths, out)
    msg = str(ei.value)
    assert paths[1].name in msg and "fc.weight" in msg and "[2, 3]" in msg
    assert not out.exists() and list(tmp_path.glob(".o.pt*")) == []
    rep = ckptavg.merge(paths, out, allow_nonfinite=True)
    assert out.exists() and rep.bytes_written > 0
    assert torch.isnan(torch.load(out, weights_only=True)["fc.weight"][2, 3])


def test_schedule_minus_sqrt_over_a_step_window(tmp_path, run_cli):
    """--steps A:B --schedule minus-sqrt: Megatron weighted_merge's range-mode coefficients, whose closed form is
    w_0 = sqrt(1/n), w_i = sqrt((i+1)/n) - sqrt(i/n), w_{n-1} = 1 - sqrt((n-1)/n); linear is the uniform average."""
    import json
    import math

    sds = make_state_dicts(6, seed=5)
    paths = _save_run(tmp_path, sds, fmt="safetensors")  # steps 100..600
    out = tmp_path / "wsm.safetensors"
    code, stdout, err = run_cli("merge", *paths, "--steps", "200:500", "--schedule", "minus-sqrt", "-o", out,
                                "--json", "--quiet")
    assert code == 0, err
    n = 4
    w = [math.sqrt((i + 1) / n) - math.sqrt(i / n) for i in range(n)]
    doc = json.loads(stdout)
    assert doc["method"] == "schedule minus-sqrt"
    assert [i["weight"] for i in doc["inputs"]] == pytest.approx(w, abs=1e-15)
    got = load_file(str(out))
    for k in ("fc.weight", "conv.bias"):
        ref = sum(x * sd[k].double() for x, sd in zip(w, sds[1:5]))
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-6, atol=1e-7)
    rev = ckptavg.plan(paths, steps="200:500", schedule="minus-sqrt__reverse")
    assert [i.weight for i in rev.inputs] == pytest.approx(w[::-1], abs=1e-15)
    lin = ckptavg.average(paths, schedule="linear")
    assert torch.equal(lin["fc.weight"], ckptavg.average(paths)["fc.weight"])
    with pytest.raises(ckptavg.CkptavgError, match="--schedule"):
        ckptavg.average(paths, schedule="minus-sqrt", method="ema", decay=0.9)
    code, _, err = run_cli("merge", *paths, "--schedule", "cosine", "-o", tmp_path / "x.pt")
    assert code == 2 and "cosine" in err and not (tmp_path / "x.pt").exists()

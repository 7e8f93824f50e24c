"""`merge --method power-ema` on power-EMA snapshots: the exact post-hoc EMA (EDM2) end to end.

The reference is an EMA of the target width tracked step by step during the same simulated
training run (a third PowerEMA profile, itself checked against fp64 step-by-step EMAs in
test_power_ema.py), which the merge never sees.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ckptavg
from ckptavg.power_ema import PowerEMA


def _train(folder, fmt="safetensors", steps=600, every=20, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    snaps = PowerEMA(model, sigma_rels=(0.05, 0.10))
    truth = PowerEMA(model, sigma_rels=(0.07, 0.13))  # the exact EMAs the merge should reconstruct
    drift = {n: torch.randn_like(p) * 0.02 for n, p in model.named_parameters()}
    at_300 = None
    for t in range(1, steps + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(drift[n] + torch.randn_like(p) * 0.05)
        model.train()
        model(torch.randn(32, 8))  # moves the BN running statistics like training does
        snaps.update()
        truth.update()
        if t % every == 0:
            snaps.save_snapshots(folder, format=fmt)
        if t == 300:
            at_300 = {k: v.clone() for k, v in truth.state_dict(0.07).items()}
    last = {k: v.clone() for k, v in model.state_dict().items()}
    return {s: {k: v.clone() for k, v in truth.state_dict(s).items()} for s in (0.07, 0.13)}, at_300, last


def _rel_err(got, ref, last):
    """Error relative to how far the exact EMA is from the last iterate (the scale that matters)."""
    num = sum(float((got[k].double() - ref[k].double()).norm() ** 2) for k in ref if ref[k].is_floating_point())
    den = sum(float((ref[k].double() - last[k].double()).norm() ** 2) for k in ref if ref[k].is_floating_point())
    return (num / den) ** 0.5


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_merge_reconstructs_the_exact_ema_from_snapshots(tmp_path, run_cli, fmt):
    truth, _, last = _train(tmp_path / "snaps", fmt=fmt)
    for sigma in (0.07, 0.13):
        out = tmp_path / f"ema-{sigma}.safetensors"
        code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", str(sigma),
                               "-o", out)
        assert code == 0, err
        got = load_file(out)
        assert set(got) == set(truth[sigma])
        assert _rel_err(got, truth[sigma], last) < 0.02
        # integer buffers (num_batches_tracked) come from the last snapshot, not averaged
        assert got["1.num_batches_tracked"].dtype == torch.int64


def test_plan_shows_profiles_and_the_exact_method(tmp_path):
    _train(tmp_path / "snaps", steps=200)
    p = ckptavg.plan(tmp_path / "snaps", method="power-ema", sigma_rel=0.07)
    text = p.format()
    assert "post-hoc EMA (EDM2)" in text and "sigma_rel" in text
    assert {i.sigma_rel for i in p.inputs} == {0.05, 0.10}
    assert abs(sum(i.weight for i in p.inputs) - 1) < 1e-9
    assert p.weights.fit_error is not None and p.weights.fit_error < 0.05


def test_at_picks_an_earlier_step(tmp_path):
    _, at_300, last = _train(tmp_path / "snaps")
    got = ckptavg.average(tmp_path / "snaps", method="power-ema", sigma_rel=0.07, at=300)
    assert _rel_err(got, at_300, last) < 0.05
    p = ckptavg.plan(tmp_path / "snaps", method="power-ema", sigma_rel=0.07, at=300)
    assert all(i.weight == 0 for i in p.inputs if i.step > 300)
    # the output records step 300 (it recorded the last snapshot's), and counts only the snapshots it used
    from safetensors import safe_open

    report = ckptavg.merge(tmp_path / "snaps", tmp_path / "at300.safetensors", method="power-ema", sigma_rel=0.07,
                           at=300)
    with safe_open(str(tmp_path / "at300.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "300"
    used = sum(i.weight != 0 for i in p.inputs)
    assert used < len(p.inputs) and f"{used} checkpoints (" in report.summary()


def test_snapshot_errors(tmp_path, run_cli):
    _train(tmp_path / "snaps", steps=100)
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.07",
                           "--at", "55", "-o", tmp_path / "o.pt")
    assert code == 2 and "55" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("merge", tmp_path / "snaps", "--at", "100", "-o", tmp_path / "o.pt")
    assert code == 2 and "--at applies to --method power-ema" in err
    torch.save({"step": 100, "state_dict": torch.nn.Linear(2, 2).state_dict()}, tmp_path / "plain.pt")
    code, _, err = run_cli("merge", tmp_path / "snaps", tmp_path / "plain.pt", "--method", "power-ema",
                           "--sigma-rel", "0.07", "-o", tmp_path / "o.pt")
    assert code != 0 and "plain checkpoint among power-EMA snapshots" in err
    assert not (tmp_path / "o.pt").exists()


def test_inspect_shows_each_snapshot_profile(tmp_path, run_cli):
    _train(tmp_path / "snaps", steps=40)
    report = ckptavg.inspect(tmp_path / "snaps")
    assert {c.sigma_rel for c in report.checkpoints} == {0.05, 0.10}
    assert all(c.gamma is not None and c.gamma > 0 for c in report.checkpoints)
    code, out, _ = run_cli("inspect", tmp_path / "snaps")
    assert code == 0 and "power-EMA sigma_rel 0.05" in out and "power-EMA sigma_rel 0.1" in out

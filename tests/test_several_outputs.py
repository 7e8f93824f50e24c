"""Several outputs from one pass through the CLI and the API: each output equals the merge that
asks for it alone, byte for byte; names come from the template; failures publish nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ckptavg

from .conftest import make_state_dicts


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    for e, sd in enumerate(make_state_dicts(8, seed=3), 1):
        torch.save({"epoch": e, "step": 100 * e, "state_dict": sd}, d / f"epoch={e}.ckpt")
    return d


def _same_file(a, b):
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_windows_and_methods_from_one_pass_equal_separate_merges(runs, tmp_path, run_cli):
    code, _, err = run_cli("merge", runs, "--last", "2,4,8", "-o", tmp_path / "lawa-{last}.safetensors")
    assert code == 0, err
    assert "3 outputs" in err
    for n in (2, 4, 8):
        alone = tmp_path / f"alone-{n}.safetensors"
        code, _, err = run_cli("merge", runs, "--last", str(n), "-o", alone)
        assert code == 0, err
        _same_file(tmp_path / f"lawa-{n}.safetensors", alone)
    code, _, err = run_cli("merge", runs, "--method", "ema", "--decay", "0.5,0.9", "-o", tmp_path / "ema-{decay}.pt")
    assert code == 0, err
    for d in ("0.5", "0.9"):
        ref = ckptavg.average(runs, method="ema", decay=float(d))
        got = torch.load(tmp_path / f"ema-{d}.pt", weights_only=True)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_posthoc_widths_from_one_pass(tmp_path):
    from ckptavg.power_ema import PowerEMA

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    ema = PowerEMA(model, sigma_rels=(0.05, 0.10))
    for t in range(1, 301):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.05)
        ema.update()
        if t % 15 == 0:
            ema.save_snapshots(tmp_path / "snaps")
    rep = ckptavg.merge(tmp_path / "snaps", tmp_path / "ema-{sigma_rel}.safetensors", method="power-ema",
                        sigma_rel=[0.06, 0.08, 0.12])
    assert [p.rsplit("/", 1)[-1] for p in rep.extra["outputs"]] == [
        "ema-0.06.safetensors", "ema-0.08.safetensors", "ema-0.12.safetensors"]
    for s in (0.06, 0.08, 0.12):
        ckptavg.merge(tmp_path / "snaps", tmp_path / f"alone-{s}.safetensors", method="power-ema", sigma_rel=s)
        _same_file(tmp_path / f"ema-{s}.safetensors", tmp_path / f"alone-{s}.safetensors")


def test_template_errors_and_failure_publishes_nothing(runs, tmp_path, run_cli):
    code, _, err = run_cli("merge", runs, "--last", "2,4", "-o", tmp_path / "x.pt")
    assert code == 2 and "need an output name template" in err
    code, _, err = run_cli("merge", runs, "--last", "2,4", "-o", tmp_path / "x-{decay}.pt")
    assert code == 2 and "'decay'" in err
    with pytest.raises(ckptavg.CkptavgError, match="one state dict"):
        ckptavg.average(runs, last=[2, 4])
    # a NaN in one input: no output is published, not even the ones that do not read it
    bad = runs / "epoch=8.ckpt"
    obj = torch.load(bad, weights_only=True)
    next(v for v in obj["state_dict"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(obj, bad)
    code, _, err = run_cli("merge", runs, "--epochs", "1:3,1:8", "-o", tmp_path / "w-{epochs}.safetensors")
    assert code == 1 and "nan" in err
    assert list(tmp_path.glob("w-*")) == [] and list(tmp_path.glob(".w-*")) == []


def test_keep_structure_takes_one_output(runs, tmp_path, run_cli):
    code, _, err = run_cli("merge", runs, "--last", "2,4", "--keep-structure", "-o", tmp_path / "s-{last}.ckpt")
    assert code == 2 and "--keep-structure writes one checkpoint" in err
    assert list(tmp_path.glob("s-*")) == []

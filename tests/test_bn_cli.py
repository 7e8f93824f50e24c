"""`merge --bn-spec` and `ckptavg bn`: one recalibrated file, only BN statistics changed."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg

from .conftest import fp64_mean

MODEL_PY = """
import torch

class Net(torch.nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

def build(width=6):
    return Net(width)

def loader(n=5, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, 8, 8, generator=g) * 2 + 1, torch.zeros(batch_size)) for _ in range(n)]
"""


@pytest.fixture
def bn_setup(tmp_path):
    (tmp_path / "models.py").write_text(MODEL_PY)
    spec = tmp_path / "bn.toml"
    spec.write_text(textwrap.dedent("""
        [model]
        factory = "models.py:build"
        kwargs = { width = 6 }
        prefix = "model."
        [data]
        loader = "models.py:loader"
        kwargs = { n = 5, batch_size = 8 }
        [run]
        device = "cpu"
    """))
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("bn_cli_models", tmp_path / "models.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    runs = tmp_path / "runs"
    runs.mkdir()
    sds = []
    for e in range(4):
        torch.manual_seed(e)
        net = mod.build()
        sd = {f"model.{k}": v for k, v in net.state_dict().items()}
        sds.append(sd)
        torch.save({"epoch": e, "global_step": e * 10, "state_dict": sd}, runs / f"epoch={e}-step={e * 10}.ckpt")
    return tmp_path, spec, runs, sds, mod


def _reference_stats(mod, weights):
    """torch's own update_bn on the averaged weights (the torch mode's reference)."""
    net = mod.build()
    net.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    data = mod.loader(5, 8)
    torch.optim.swa_utils.update_bn([x for x, _ in data], net)
    return net.bn.running_mean, net.bn.running_var


def test_merge_with_bn_spec_writes_one_recalibrated_file(bn_setup, run_cli):
    tmp, spec, runs, sds, mod = bn_setup
    out = tmp / "swa.pt"
    code, _, err = run_cli("merge", runs, "--epochs", "1:", "-o", out, "--bn-spec", spec, "--bn-mode", "torch",
                           "--strip-prefix", "nothing.")
    assert code == 0, err
    assert "BN recalibrated" in err
    got = torch.load(out, weights_only=True)
    assert set(got) == set(sds[0])
    # weights: the plain average; BN statistics: update_bn's on the averaged model
    ref_w = fp64_mean([s["model.conv.weight"] for s in sds[1:]])
    torch.testing.assert_close(got["model.conv.weight"].double(), ref_w, rtol=1e-6, atol=1e-6)
    mean, var = _reference_stats(mod, got)
    torch.testing.assert_close(got["model.bn.running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["model.bn.running_var"], var, rtol=1e-5, atol=1e-6)
    assert int(got["model.bn.num_batches_tracked"]) == 5
    assert list(tmp.glob(".*ckptavg-tmp")) == []


def test_bn_command_changes_only_statistics(bn_setup, run_cli):
    tmp, spec, runs, sds, mod = bn_setup
    src = tmp / "avg.safetensors"
    save_file(ckptavg.average(runs), str(src), metadata={"note": "kept"})
    out = tmp / "avg_bn.safetensors"
    code, _, err = run_cli("bn", src, "--spec", spec, "-o", out)
    assert code == 0, err
    before, after = load_file(src), load_file(out)
    assert list(before) == list(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.bn.running_mean", "model.bn.running_var", "model.bn.num_batches_tracked"}
    # precise mode: the first BN layer's statistics are the exact population statistics of its inputs
    net = mod.build()
    net.load_state_dict({k.removeprefix("model."): v for k, v in before.items()})
    with torch.no_grad():
        feats = torch.cat([net.conv(x) for x, _ in mod.loader(5, 8)]).double()
    per_channel = feats.transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(after["model.bn.running_mean"].double(), per_channel.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["model.bn.running_var"].double(), per_channel.var(1), rtol=1e-5, atol=1e-6)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "kept" and "precise" in meta["ckptavg_bn"]


def test_bn_errors_are_one_line(bn_setup, run_cli):
    tmp, spec, runs, sds, mod = bn_setup
    bad = tmp / "bad.toml"
    bad.write_text('[model]\nfactory = "models.py:biuld"\n[data]\nloader = "models.py:loader"\n')
    code, _, err = run_cli("merge", runs, "-o", tmp / "o.pt", "--bn-spec", bad)
    assert code == 1 and err.strip().count("\n") == 0 and "bad.toml" in err and "biuld" in err
    assert not (tmp / "o.pt").exists()
    noprefix = tmp / "noprefix.toml"
    noprefix.write_text(spec.read_text().replace('prefix = "model."', ""))
    code, _, err = run_cli("merge", runs, "-o", tmp / "o.pt", "--bn-spec", noprefix)
    assert code == 1 and "prefix" in err and "Traceback" not in err
    assert not (tmp / "o.pt").exists()


def test_bn_spec_works_with_folder_output_and_keep_structure(bn_setup, run_cli):
    """BN recalibration is a step of the one merge path: every output kind gets it."""
    tmp, spec, runs, sds, mod = bn_setup
    code, _, err = run_cli("merge", runs, "-o", tmp / "soup/", "--bn-spec", spec, "--bn-mode", "torch")
    assert code == 0, err
    got = load_file(tmp / "soup" / "model.safetensors")
    mean, var = _reference_stats(mod, got)
    torch.testing.assert_close(got["model.bn.running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["model.bn.running_var"], var, rtol=1e-5, atol=1e-6)

    code, _, err = run_cli("merge", runs, "-o", tmp / "swa.ckpt", "--keep-structure", "--bn-spec", spec,
                           "--bn-mode", "torch")
    assert code == 0, err
    ck = torch.load(tmp / "swa.ckpt", weights_only=True)
    assert ck["epoch"] == 3 and ck["global_step"] == 30 and "ckptavg" in ck  # the last checkpoint's structure
    ref_w = fp64_mean([s["model.conv.weight"] for s in sds])
    torch.testing.assert_close(ck["state_dict"]["model.conv.weight"].double(), ref_w, rtol=1e-6, atol=1e-6)
    mean, var = _reference_stats(mod, ck["state_dict"])
    torch.testing.assert_close(ck["state_dict"]["model.bn.running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ck["state_dict"]["model.bn.running_var"], var, rtol=1e-5, atol=1e-6)


def test_bn_command_keeps_a_structured_checkpoint(bn_setup, run_cli):
    """`ckptavg bn x.ckpt -o y.ckpt` on a Lightning-style checkpoint keeps its structure: only the BN
    statistics change; epoch, step and every other entry (optimizer state included) are kept."""
    tmp, spec, runs, sds, mod = bn_setup
    src = runs / "epoch=2-step=20.ckpt"
    obj = torch.load(src, weights_only=True)
    obj["optimizer_states"] = [{"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}]
    obj["hyper_parameters"] = {"width": 6}
    torch.save(obj, tmp / "one.ckpt")
    code, _, err = run_cli("bn", tmp / "one.ckpt", "--spec", spec, "-o", tmp / "one_bn.ckpt", "--mode", "torch")
    assert code == 0, err
    got = torch.load(tmp / "one_bn.ckpt", weights_only=True)
    assert {k for k in got if k != "ckptavg"} == set(obj)
    assert got["epoch"] == 2 and got["hyper_parameters"] == {"width": 6}
    torch.testing.assert_close(got["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.ones(3))
    for k, v in obj["state_dict"].items():
        if ".bn.running" in k or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(got["state_dict"][k], v), k  # bit-identical
    mean, var = _reference_stats(mod, got["state_dict"])
    torch.testing.assert_close(got["state_dict"]["model.bn.running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["state_dict"]["model.bn.running_var"], var, rtol=1e-5, atol=1e-6)

"""PEFT LoRA adapters averaged exactly in the space of their updates (issue 25, item 1), checked
with PEFT itself: the merged adapter loads with ``PeftModel.from_pretrained`` and its outputs equal
the base model plus the weighted mean of the inputs' updates."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ckptavg

peft = pytest.importorskip("peft")


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _adapters(tmp_path, n=3, r=4, alpha=8, rslora=False):
    base = _base()
    folders, deltas = [], []
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0", "2"], init_lora_weights=False,
                              use_rslora=rslora)
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        folder = tmp_path / f"checkpoint-{(i + 1) * 10}"
        model.save_pretrained(folder)
        merged = model.merge_and_unload()
        deltas.append({k: merged.state_dict()[k].double() - base.state_dict()[k].double()
                       for k in ("0.weight", "2.weight")})
        folders.append(folder)
    return base, folders, deltas


def _reference(base, deltas, weights):
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        for k in ("0.weight", "2.weight"):
            ref.get_parameter(k).add_(sum(w * d[k] for w, d in zip(weights, deltas)))
    return ref


def test_exact_average_loads_with_peft_and_equals_the_mean_update(tmp_path, run_cli):
    base, folders, deltas = _adapters(tmp_path, rslora=True)
    code, _o, err = run_cli("merge", tmp_path, "-o", tmp_path / "avg/")
    assert code == 0, err
    cfg = json.loads((tmp_path / "avg" / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and cfg["use_rslora"] is False
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "avg")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    ref = _reference(base, deltas, [1 / 3] * 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref(x.double()), rtol=1e-5, atol=1e-5)
    # the average of the factors (what --lora-factors gives, and what was given silently before) is another update
    naive = ckptavg.average(folders, lora_factors=True)
    naive_delta = 4.0 * (naive["base_model.model.2.lora_B.weight"].double()
                         @ naive["base_model.model.2.lora_A.weight"].double())  # rslora: 8 / sqrt(4)
    exact = sum(d["2.weight"] for d in deltas) / 3
    assert (naive_delta - exact).abs().max() > 1e-2 * exact.abs().max()
    # the API's in-memory average is the same exact adapter (never the factors' average)
    sd = ckptavg.average(folders)
    b2 = sd["base_model.model.2.lora_B.weight"].double()
    a2 = sd["base_model.model.2.lora_A.weight"].double()
    torch.testing.assert_close(b2 @ a2, exact, rtol=1e-5, atol=1e-6)
    # a weighted (EMA) average, and the rank-factored one
    w = ckptavg.plan(folders, method="ema", decay=0.5).weights.values
    code, _o, err = run_cli("merge", *folders, "--method", "ema", "--decay", "0.5", "--lora-rank", "4",
                            "-o", tmp_path / "ema4/", "--json")
    assert code == 0, err
    report = json.loads(_o)
    full = sum(wi * d["2.weight"] for wi, d in zip(w, deltas))
    s = torch.linalg.svdvals(full)
    expect = float(torch.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()))
    assert report["lora_rank"] == 4 and report["lora_rank_error"] >= expect - 1e-9
    model4 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ema4")
    merged4 = model4.merge_and_unload().state_dict()["2.weight"].double() - base.state_dict()["2.weight"].double()
    u, sv, vh = torch.linalg.svd(full)
    best4 = (u[:, :4] * sv[:4]) @ vh[:4]
    torch.testing.assert_close(merged4, best4, rtol=1e-5, atol=1e-6)


def test_adapter_folders_are_ordered_by_their_folder_step_and_layouts_must_match(tmp_path, run_cli):
    base, folders, _d = _adapters(tmp_path, n=2)
    p = ckptavg.plan(tmp_path)
    assert [(i.format, i.step) for i in p.inputs] == [("peft", 10), ("peft", 20)]
    other = tmp_path / "other"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(other)
    code, _o, err = run_cli("merge", folders[0], other, "-o", tmp_path / "bad/")
    assert code != 0 and "lora_A.weight" in err and "lacks" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_lora_merge_into_writes_the_full_weights_peft_merges(tmp_path, run_cli):
    """--lora-merge-into BASE: the base plus the weighted mean of the adapters' updates, equal to what PEFT's own
    merge_and_unload() gives for the averaged adapter (and to base + mean delta computed here); a base that does
    not match is one line, nothing written."""
    from safetensors.torch import load_file, save_file

    base, folders, deltas = _adapters(tmp_path / "runs")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    code, _o, err = run_cli("merge", tmp_path / "runs", "-o", tmp_path / "avg/")
    assert code == 0, err
    code, _o, err = run_cli("merge", tmp_path / "runs", "--lora-merge-into", tmp_path / "base.safetensors",
                            "-o", tmp_path / "merged.safetensors")
    assert code == 0, err
    got = load_file(str(tmp_path / "merged.safetensors"))
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "avg").merge_and_unload()
    ref = _reference(base, deltas, [1 / 3] * 3)
    for k, v in peft_merged.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[k].double(), ref.state_dict()[k], rtol=1e-6, atol=1e-6)
    # a base of another model
    save_file({"0.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    code, _o, err = run_cli("merge", tmp_path / "runs", "--lora-merge-into", tmp_path / "other.safetensors",
                            "-o", tmp_path / "bad.safetensors")
    assert code == 2 and err.count("\n") == 1 and "0.weight" in err and "other.safetensors" in err
    assert not (tmp_path / "bad.safetensors").exists()
    code, _o, err = run_cli("merge", tmp_path / "base.safetensors", tmp_path / "merged.safetensors",
                            "--lora-merge-into", tmp_path / "base.safetensors", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--lora-merge-into applies to PEFT adapter folders" in err


def test_rank_and_alpha_patterns(tmp_path, run_cli):
    """Adapters with per-module rank_pattern / alpha_pattern (and different ones per input): each module's update
    uses its own rank and alpha as PEFT resolves them; the output names the modules of another rank in its own
    patterns, and PEFT loads it with outputs equal to the base plus the mean update."""
    base = _base()
    folders, deltas = [], []
    for i, (rp, ap) in enumerate((({"0": 2}, {"2": 16}), ({"2": 6}, {"0": 3}), ({}, {}))):
        torch.manual_seed(200 + i)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False,
                              rank_pattern=rp, alpha_pattern=ap)
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        folder = tmp_path / "runs" / f"checkpoint-{(i + 1) * 10}"
        model.save_pretrained(folder)
        merged = model.merge_and_unload()
        deltas.append({k: merged.state_dict()[k].double() - base.state_dict()[k].double()
                       for k in ("0.weight", "2.weight")})
        folders.append(folder)
    code, _o, err = run_cli("merge", tmp_path / "runs", "-o", tmp_path / "avg/")
    assert code == 0, err
    cfg = json.loads((tmp_path / "avg" / "adapter_config.json").read_text())
    assert cfg["r"] == 14 and cfg["rank_pattern"] == {"0": 10} and cfg["alpha_pattern"] == {"0": 10}
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "avg")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(6))
    ref = _reference(base, deltas, [1 / 3] * 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref(x.double()), rtol=1e-5, atol=1e-5)

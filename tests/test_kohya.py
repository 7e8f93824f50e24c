"""kohya-ss / musubi-tuner LoRA files (issue 25, item 1): averaged exactly in the space of their updates
(``alpha / r * up @ down`` per module, linear and convolution), with ``--lora-rank`` to factor back; the average
of the factors is refused unless ``--lora-factors``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg

MODULES = {"lora_unet_down_blocks_0_attn_to_q": ("linear", 32, 24), "lora_unet_conv_in": ("conv", 16, 8),
           "lora_te_text_model_encoder_layers_0_mlp_fc1": ("linear", 20, 40)}


def _lora(path, seed, rank, alpha):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (kind, out_f, in_f) in MODULES.items():
        if kind == "linear":
            sd[f"{mod}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            sd[f"{mod}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        else:
            sd[f"{mod}.lora_down.weight"] = torch.randn(rank, in_f, 3, 3, generator=g) * 0.1
            sd[f"{mod}.lora_up.weight"] = torch.randn(out_f, rank, 1, 1, generator=g) * 0.1
        sd[f"{mod}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank)})
    return sd


def _update(sd, mod):
    down, up = sd[f"{mod}.lora_down.weight"].double(), sd[f"{mod}.lora_up.weight"].double()
    r = down.shape[0]
    return float(sd[f"{mod}.alpha"]) / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))


def test_kohya_loras_average_exactly(tmp_path, run_cli):
    sds = [_lora(tmp_path / f"lora-{e:06d}.safetensors", e, rank, alpha)
           for e, rank, alpha in ((1, 4, 1.0), (2, 8, 4.0), (3, 4, 4.0))]
    out = tmp_path / "avg.safetensors"
    code, stdout, err = run_cli("merge", *sorted(tmp_path.glob("lora-*.safetensors")), "--weights", "0.2,0.3,0.5",
                                "-o", out, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(stdout)
    assert {i["format"] for i in doc["inputs"]} == {"kohya"}
    got = load_file(str(out))
    for mod in MODULES:
        ref = sum(w * _update(sd, mod) for w, sd in zip((0.2, 0.3, 0.5), sds))
        assert got[f"{mod}.lora_down.weight"].shape[0] == 16 and float(got[f"{mod}.alpha"]) == 16.0
        torch.testing.assert_close(_update(got, mod), ref, rtol=1e-5, atol=1e-6)
    assert got["lora_unet_conv_in.lora_down.weight"].shape == (16, 8, 3, 3)
    assert ckptavg.plan([out]).inputs[0].format == "kohya"  # ckptavg reads its output back as a kohya LoRA
    assert got["lora_unet_conv_in.lora_up.weight"].shape == (16, 16, 1, 1)
    # the best rank-4 LoRA of the same updates
    code, stdout, err = run_cli("merge", *sorted(tmp_path.glob("lora-*.safetensors")), "--lora-rank", "4", "-o",
                                tmp_path / "r4.safetensors", "--json", "--quiet")
    assert code == 0, err
    r4 = load_file(str(tmp_path / "r4.safetensors"))
    mod = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    full = sum(_update(sd, mod) for sd in sds) / 3
    s = torch.linalg.svdvals(full)
    best = float(torch.sqrt((s[4:] ** 2).sum()))
    assert float(torch.linalg.matrix_norm(_update(r4, mod) - full)) == pytest.approx(best, rel=1e-6)
    # the factors' own average is refused unless asked for
    mixed = tmp_path / "plain"
    mixed.mkdir()
    save_file({"x.lora_down.weight": torch.ones(2, 3), "x.lora_up.weight": torch.ones(3, 2), "y.weight": torch.ones(2)},
              str(mixed / "a.safetensors"))
    save_file({"x.lora_down.weight": torch.ones(2, 3), "x.lora_up.weight": torch.ones(3, 2), "y.weight": torch.ones(2)},
              str(mixed / "b.safetensors"))
    code, _o, err = run_cli("merge", mixed, "-o", tmp_path / "m.safetensors")
    assert code == 2 and "is a LoRA factor" in err


def test_kohya_loras_of_different_modules_are_refused(tmp_path):
    a = _lora(tmp_path / "a.safetensors", 1, 4, 4.0)
    del a["lora_unet_conv_in.lora_down.weight"], a["lora_unet_conv_in.lora_up.weight"], a["lora_unet_conv_in.alpha"]
    save_file(a, str(tmp_path / "a.safetensors"))
    _lora(tmp_path / "b.safetensors", 2, 4, 4.0)
    with pytest.raises(ckptavg.CkptavgError, match="lora_unet_conv_in.* missing"):
        ckptavg.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()

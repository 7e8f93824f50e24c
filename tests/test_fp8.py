"""Scaled float8 checkpoints (issue 25, item 2): DeepSeek-V3 style block-scaled weights (``weight_scale_inv``)
and per-tensor / per-row ``weight_scale`` are dequantized as they are read, averaged, written in a floating
dtype; checked against torch's own dequantizing reader (``QuantizedHuggingFaceStorageReader``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg

F8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(F8 is None, reason="this torch has no float8_e4m3fn")


def _hf_folder(folder, seed):
    """A Hugging Face folder like DeepSeek-V3's: a 200 x 300 float8 weight with 2 x 3 block scales (blocks of 128,
    the last ones partial), a bf16 norm, the index torch's quantized reader needs, quantization_config."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    sd = {"layer.weight": (torch.randn(200, 300, generator=g) * 2).to(F8),
          "layer.weight_scale_inv": torch.rand(2, 3, generator=g) + 0.5,
          "norm.weight": torch.randn(300, generator=g).to(torch.bfloat16)}
    save_file(sd, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in sd}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "bfloat16",
                                                    "quantization_config": {"quant_method": "fp8",
                                                                            "weight_block_size": [128, 128]}}))
    return sd


def _torch_dequantized(folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

    out = {"layer.weight": torch.empty(200, 300)}
    dcp.load(out, storage_reader=QuantizedHuggingFaceStorageReader(str(folder)))
    return out["layer.weight"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_block_scaled_fp8_averages_the_dequantized_weights(tmp_path, run_cli):
    sds = [_hf_folder(tmp_path / "run" / f"checkpoint-{s}", i) for i, s in enumerate((100, 200))]
    refs = [_torch_dequantized(tmp_path / "run" / f"checkpoint-{s}") for s in (100, 200)]
    # torch's reader agrees with the definition: each block of 128 x 128 times its factor
    blocks = sds[0]["layer.weight_scale_inv"].repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    torch.testing.assert_close(refs[0], sds[0]["layer.weight"].to(torch.float32) * blocks, rtol=0, atol=0)
    code, out, err = run_cli("merge", tmp_path / "run", "-o", tmp_path / "avg/", "--json", "--quiet")
    assert code == 0, err
    assert any("float8" in n for n in json.loads(out)["notes"])
    got = load_file(str(tmp_path / "avg" / "model.safetensors"))
    assert set(got) == {"layer.weight", "norm.weight"} and got["layer.weight"].dtype == torch.float32
    torch.testing.assert_close(got["layer.weight"].double(), (refs[0].double() + refs[1].double()) / 2,
                               rtol=1e-7, atol=1e-7)
    back = ckptavg.average(tmp_path / "avg")  # ckptavg reads its output folder back
    assert torch.equal(back["layer.weight"], got["layer.weight"])
    cfg = json.loads((tmp_path / "avg" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"
    # --dtype bfloat16 halves it; the scales never reach the output
    code, _o, err = run_cli("merge", tmp_path / "run", "-o", tmp_path / "bf.safetensors", "--dtype", "bfloat16")
    assert code == 0, err
    bf = load_file(str(tmp_path / "bf.safetensors"))
    assert set(bf) == {"layer.weight", "norm.weight"} and bf["layer.weight"].dtype == torch.bfloat16


def test_per_tensor_and_per_row_weight_scale(tmp_path):
    g = torch.Generator().manual_seed(3)
    paths, ref = [], []
    for i in range(2):
        w = torch.randn(64, 32, generator=g).to(F8)
        s_row = torch.rand(64, 1, generator=g) + 0.5
        s_one = torch.rand((), generator=g) + 0.5
        p = tmp_path / f"m_{i}.safetensors"
        save_file({"a.weight": w, "a.weight_scale": s_row, "b.weight": w.clone(), "b.weight_scale": s_one.reshape(1)},
                  str(p))
        paths.append(p)
        ref.append({"a.weight": w.double() * s_row.double(), "b.weight": w.double() * s_one.double()})
    got = ckptavg.average(paths)
    assert set(got) == {"a.weight", "b.weight"}
    for k in ("a.weight", "b.weight"):
        torch.testing.assert_close(got[k].double(), (ref[0][k] + ref[1][k]) / 2, rtol=1e-6, atol=1e-6)


def test_keep_structure_is_refused_for_dequantized_inputs(tmp_path, run_cli):
    g = torch.Generator().manual_seed(4)
    paths = []
    for i in range(2):
        p = tmp_path / f"e{i}.pt"
        torch.save({"state_dict": {"a.weight": torch.randn(8, 8, generator=g).to(F8),
                                   "a.weight_scale": torch.tensor([0.5])}, "epoch": i}, p)
        paths.append(p)
    code, _o, err = run_cli("merge", *paths, "-o", tmp_path / "o.pt", "--keep-structure")
    assert code == 2 and "float8" in err and not (tmp_path / "o.pt").exists()

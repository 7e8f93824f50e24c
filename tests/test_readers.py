"""Readers: finding the state dict, keys, prefixes, legacy files, headers only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.io import open_checkpoint

from .conftest import assert_close32, fp64_mean, make_state_dicts


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "model_state_dict", "net", None])
def test_state_dict_found_automatically(tmp_path, key):
    sd = make_state_dicts(1)[0]
    obj = sd if key is None else {key: sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    torch.save(obj, tmp_path / "c.pt")
    c = open_checkpoint(tmp_path / "c.pt")
    assert c.weights_key == key
    assert list(c.tensors) == list(sd)
    for k, ref in c.tensors.items():
        assert torch.equal(ref.materialize(), sd[k])
    c.close()


def test_explicit_dotted_key_and_candidates_error(tmp_path):
    a, b = make_state_dicts(2)
    torch.save({"ema": {"model_ema": a}, "weights": {"main": b}}, tmp_path / "c.pt")
    with pytest.raises(ckptavg.CkptavgError) as ei:
        open_checkpoint(tmp_path / "c.pt")
    msg = str(ei.value)
    assert "candidates: ema.model_ema, weights.main" in msg and "--key" in msg
    c = open_checkpoint(tmp_path / "c.pt", key="ema.model_ema")
    assert torch.equal(c.tensors["fc.weight"].materialize(), a["fc.weight"])
    with pytest.raises(ckptavg.CkptavgError, match="key 'ema.nope' not found: ema has no 'nope'"):
        open_checkpoint(tmp_path / "c.pt", key="ema.nope")


def test_strip_prefix_ddp_and_compile(tmp_path):
    sds = make_state_dicts(2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sds[0].items()}}, tmp_path / "a.pt")
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in sds[1].items()}}, tmp_path / "b.pt")
    got = ckptavg.average([tmp_path / "a.pt", tmp_path / "b.pt"], strip_prefix=["module.", "_orig_mod."],
                          order="given")
    assert set(got) == set(sds[0])
    assert_close32(got["fc.weight"], fp64_mean([s["fc.weight"] for s in sds]))


def test_legacy_torch_format_warns_and_works(tmp_path):
    sds = make_state_dicts(2)
    for i, sd in enumerate(sds):
        torch.save({"epoch": i, "state_dict": sd}, tmp_path / f"old{i}.pt", _use_new_zipfile_serialization=False)
    with pytest.warns(ckptavg.CkptavgWarning, match="legacy .* cannot be streamed"):
        got = ckptavg.average(tmp_path)
    assert_close32(got["conv.weight"], fp64_mean([s["conv.weight"] for s in sds]))


def test_metadata_read_without_loading_weights(tmp_path, monkeypatch):
    sd = make_state_dicts(1)[0]
    torch.save({"epoch": 4, "global_step": 999, "metrics": {"val_acc": torch.tensor(0.75), "loss": 1.5},
                "state_dict": sd}, tmp_path / "c.ckpt")
    from ckptavg.io import files as readers_files

    reads = []
    orig = readers_files.InputFile.pread_into

    def spy(self, mv, offset):
        reads.append(len(mv))
        return orig(self, mv, offset)

    monkeypatch.setattr(readers_files.InputFile, "pread_into", spy)
    c = open_checkpoint(tmp_path / "c.ckpt")
    assert (c.meta.epoch, c.meta.step) == (4, 999)
    assert c.meta.metrics["val_acc"] == pytest.approx(0.75)
    assert c.meta.metrics["loss"] == 1.5
    # only headers, the pickle and the 4-byte metric tensor were read: no weight data
    weight_bytes = sum(r.nbytes for r in c.tensors.values())
    assert sum(reads) < weight_bytes


def test_safetensors_and_torch_inputs_mix(tmp_path):
    sds = make_state_dicts(3)
    torch.save(sds[0], tmp_path / "a_1.pt")
    save_file(sds[1], str(tmp_path / "a_2.safetensors"))
    torch.save({"model": sds[2]}, tmp_path / "a_3.pth")
    got = ckptavg.average(tmp_path)
    assert_close32(got["fc.bias"], fp64_mean([s["fc.bias"] for s in sds]))


def test_mismatches_name_file_and_tensor(tmp_path):
    sds = make_state_dicts(3)
    del sds[1]["fc.bias"]
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"c{i}.pt")
    with pytest.raises(ckptavg.CkptavgError, match=r"c1.pt: tensor 'fc.bias' missing \(present in .*c2.pt\)"):
        ckptavg.plan(tmp_path)
    sds = make_state_dicts(2)
    sds[0]["fc.weight"] = torch.zeros(3, 3)
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"s{i}.pt")
    shape_msg = r"s0.pt: tensor 'fc.weight' has shape \[3, 3\] but .*s1.pt has \[10, 8\]"
    with pytest.raises(ckptavg.CkptavgError, match=shape_msg):
        ckptavg.plan([tmp_path / "s0.pt", tmp_path / "s1.pt"])
    sds = make_state_dicts(2)
    sds[0]["conv.bias"] = sds[0]["conv.bias"].long()
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"k{i}.pt")
    with pytest.raises(ckptavg.CkptavgError, match=r"k0.pt: tensor 'conv.bias' is int64 but .*k1.pt has float32"):
        ckptavg.plan([tmp_path / "k0.pt", tmp_path / "k1.pt"])


def test_mixed_float_dtypes_average_and_output_as_last(tmp_path):
    a, b = make_state_dicts(2)
    torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in a.items()}, tmp_path / "c1.pt")
    torch.save(b, tmp_path / "c2.pt")
    got = ckptavg.average(tmp_path)
    assert got["fc.weight"].dtype == torch.float32
    ref = fp64_mean([a["fc.weight"].bfloat16(), b["fc.weight"]])
    torch.testing.assert_close(got["fc.weight"].double(), ref, rtol=1e-6, atol=1e-6)

"""``ckptavg inspect``: the table and the differences for every format, from headers only."""

from __future__ import annotations

import json
import re
import struct
import time

import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.io import files as readers_files

from .conftest import make_state_dicts
from .test_formats import _fairseq_run, _timm_run, lightning_run  # noqa: F401  (fixture)
from .test_hf import GPT2LMHeadModel, _config, finetunes  # noqa: F401  (fixture)


def _rows(out: str) -> list[list[str]]:
    """Table rows (after the header), split on runs of two or more spaces."""
    lines = out.split("\n\n")[0].splitlines()
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines[1:] if not ln.startswith("note:")]


def test_inspect_lightning_run(lightning_run, run_cli):  # noqa: F811
    folder, files, seen = lightning_run
    code, out, err = run_cli("inspect", folder)
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["#", "file", "format", "weights", "epoch", "step", "tensors", "params", "dtypes", "size",
                      "metrics"]
    rows = _rows(out)
    assert len(rows) == 5
    for row, (epoch, step, loss), f in zip(rows, seen, files):
        assert row[1] == str(f) and row[2] == "torch (lightning)" and row[3] == "state_dict"
        assert (row[4], row[5]) == (str(epoch), str(step))
        assert row[-1] == f"val_loss={loss:.6g}"
    assert "note: all checkpoints also hold optimizer_states, lr_schedulers" in out
    assert "differences: none (5 checkpoints, same 9 tensor names, shapes and dtypes)" in out

    code, out, _ = run_cli("inspect", folder, "--json")
    rep = json.loads(out)
    sd = torch.load(files[0], weights_only=True)["state_dict"]
    c = rep["checkpoints"][0]
    assert c["tensors"] == len(sd) == 9
    assert c["parameters"] == sum(v.numel() for v in sd.values() if v.is_floating_point())
    assert c["dtypes"] == {"float32": 8, "int64": 1}
    assert c["bytes"] == files[0].stat().st_size
    assert (c["epoch"], c["epoch_from"], c["step"], c["framework"]) == (0, "recorded", seen[0][1], "lightning")
    assert c["training_state"] == ["optimizer_states", "lr_schedulers"]
    assert rep["consistent"] is True and rep["order"] == "by step (recorded)"


def test_inspect_timm_prefixes_and_ema(tmp_path, run_cli):
    run = tmp_path / "timm"
    _timm_run(run, prefixes=("module.", "_orig_mod.", "module.", "module.", "module."))
    report = ckptavg.inspect(run)
    assert [c.framework for c in report.checkpoints] == ["timm"] * 5
    c = report.checkpoints[1]
    assert c.other_weight_sets == ["state_dict_ema"] and c.metrics["metric"] == 0.74 and c.epoch == 1
    assert c.prefix == "_orig_mod." and report.checkpoints[0].prefix == "module."
    text = report.format()
    assert "state_dict +state_dict_ema" in text
    assert f"note: {run / 'checkpoint-1.pth.tar'} has every tensor name starting with '_orig_mod.'" in text
    assert f"9 tensor(s) only in {run / 'checkpoint-1.pth.tar'}: '_orig_mod.conv.weight'" in text
    assert "9 tensor(s) missing from" in text and "checkpoint-1.pth.tar" in text
    assert len(report.missing) == 18
    # with the prefixes stripped, as merge would open them, they agree
    code, out, err = run_cli("inspect", run, "--strip-prefix", "module.", "--strip-prefix", "_orig_mod.",
                             "--key", "state_dict_ema")
    assert code == 0, err
    assert "differences: none (5 checkpoints" in out and "state_dict_ema +state_dict" in out


def test_inspect_fairseq(tmp_path):
    run = tmp_path / "fs"
    _fairseq_run(run)
    report = ckptavg.inspect(run)
    assert [(c.path.name, c.epoch, c.step) for c in report.checkpoints] == [
        ("checkpoint1.pt", 1, 250), ("checkpoint2.pt", 2, 500), ("checkpoint3.pt", 3, 750),
        ("checkpoint4.pt", 4, 1000), ("checkpoint_5_1100.pt", 5, 1100)]
    c = report.checkpoints[0]
    assert (c.framework, c.weights_key, c.training_state) == ("fairseq", "model", ["last_optimizer_state"])
    assert c.metrics["val_loss"] == 3.1
    assert any("checkpoint_best.pt" in n and "checkpoint_last.pt" in n for n in report.notes)


def test_inspect_hf_folders_and_tied_weights(finetunes, tmp_path):  # noqa: F811
    root, _ = finetunes
    ref_params = GPT2LMHeadModel(_config()).num_parameters()  # tied embeddings counted once
    report = ckptavg.inspect([root / "ft1", root / "ft2", root / "ft3"])
    for c in report.checkpoints:
        assert c.format == "hf-folder" and c.shards == len(list(c.path.glob("*.safetensors"))) > 1
        assert c.parameters == ref_params and c.tied == 0 and c.dtypes == {"float32": 28}
    assert report.consistent
    assert "hf-folder, " in report.format() and " shards" in report.format()
    torch.manual_seed(0)
    torch.save(GPT2LMHeadModel(_config()).state_dict(), tmp_path / "gpt2.pt")
    (c,) = ckptavg.inspect(tmp_path / "gpt2.pt").checkpoints
    assert c.tensors == 29 and c.tied == 1 and c.parameters == ref_params
    assert "29 (1 tied)" in ckptavg.inspect(tmp_path / "gpt2.pt").format()


def test_inspect_differences_missing_shape_dtype(tmp_path, run_cli):
    a, b, c = make_state_dicts(3)
    del a["fc.bias"]
    b["fc.weight"] = torch.zeros(12, 8)
    c["conv.weight"] = c["conv.weight"].bfloat16()
    torch.save(a, tmp_path / "a.pt")
    torch.save({"model": b}, tmp_path / "b.pt")
    save_file(c, str(tmp_path / "c.safetensors"))
    files = [tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.safetensors"]
    report = ckptavg.inspect(files, order="given")
    assert report.missing == [{"name": "fc.bias", "missing_from": [str(files[0])]}]
    assert report.shapes == [{"name": "fc.weight", "values": {str(files[0]): [10, 8], str(files[1]): [12, 8],
                                                              str(files[2]): [10, 8]}}]
    assert report.dtypes == [{"name": "conv.weight", "values": {str(files[0]): "float32",
                                                                str(files[1]): "float32",
                                                                str(files[2]): "bfloat16"}}]
    assert not report.consistent
    code, out, err = run_cli("inspect", *files, "--order", "given")
    assert code == 0, err
    assert f"1 tensor(s) missing from {files[0]}: 'fc.bias'" in out
    assert f"shape of 'fc.weight': [10, 8] in {files[0]}, {files[2]}; [12, 8] in {files[1]}" in out
    assert f"dtype of 'conv.weight': float32 in {files[0]}, {files[1]}; bfloat16 in {files[2]}" in out
    rows = _rows(out)
    assert [r[2] for r in rows] == ["torch", "torch", "safetensors"]
    assert [r[3] for r in rows] == ["(top level)", "model", "-"]


def test_inspect_reads_headers_only_and_is_instant_on_large_files(tmp_path, monkeypatch):
    # a 40 GB safetensors file (sparse: no disk used) and a torch checkpoint
    n = 10 * 10**9
    header = json.dumps({"__metadata__": {"step": "5000"},
                         "big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(tmp_path / "big.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    sd = make_state_dicts(1)[0] | {"proj.weight": torch.randn(512, 512)}
    torch.save({"epoch": 3, "state_dict": sd, "metrics": {"acc": torch.tensor(0.5)}}, tmp_path / "small.pt")

    reads: list[int] = []
    orig = readers_files.InputFile.pread_into

    def spy(self, mv, offset):
        reads.append(len(mv))
        return orig(self, mv, offset)

    monkeypatch.setattr(readers_files.InputFile, "pread_into", spy)
    t0 = time.perf_counter()
    report = ckptavg.inspect([tmp_path / "big.safetensors", tmp_path / "small.pt"], order="given")
    assert time.perf_counter() - t0 < 5
    big, small = report.checkpoints
    assert big.parameters == n and big.size == 8 + len(header) + 4 * n and big.step == 5000
    assert small.epoch == 3 and small.metrics["acc"] == 0.5
    assert sum(reads) < 64 * 1024  # headers, the pickle and one 4-byte metric; the weights are > 1 MB


def test_unreadable_checkpoint_is_a_row_and_exit_1(tmp_path, run_cli):
    sds = make_state_dicts(2)
    torch.save({"epoch": 0, "state_dict": sds[0]}, tmp_path / "ep0.pt")
    torch.save({"epoch": 1, "state_dict": sds[1]}, tmp_path / "ep1.pt")
    raw = (tmp_path / "ep1.pt").read_bytes()
    (tmp_path / "ep1.pt").write_bytes(raw[: len(raw) // 2])
    code, out, err = run_cli("inspect", tmp_path)
    assert code == 1
    assert "ep0.pt" in out and "torch" in out
    assert re.search(rf"^2  {re.escape(str(tmp_path / 'ep1.pt'))}\s+error\s+damaged or truncated", out, re.M), out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: ") and "ep1.pt" in lines[0]
    report = ckptavg.inspect(tmp_path)
    assert [c.path.name for c in report.errors] == ["ep1.pt"] and not report.consistent


def test_inspect_help_and_api_export(run_cli):
    code, out, _ = run_cli("inspect", "--help")
    assert code == 0 and "ckptavg inspect runs/" in out and "--json" in out
    assert ckptavg.inspect.__doc__ and "Example" in ckptavg.inspect.__doc__
    assert "inspect" in ckptavg.__all__

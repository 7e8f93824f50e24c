"""Hugging Face model folders in and out: sharded safetensors written by ``save_pretrained``,
the older ``pytorch_model.bin`` layouts, a three-fine-tune soup that ``from_pretrained``
loads, and the folder output's atomicity and destination rules."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.io.hf_folder_layout import is_folder_output
from ckptavg.units import parse_size

from .conftest import assert_close32, fp64_mean, make_state_dicts, merge_peak_rss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402


def _config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=True)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """Three fine-tunes of one tiny GPT-2 (tied embeddings), saved by save_pretrained in
    20KB shards; the last one also has its tokenizer saved."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(_config())
    sds = []
    for i in range(3):
        m = GPT2LMHeadModel(_config())
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(0.02 * torch.randn(prm.shape, generator=g))
        m.save_pretrained(root / f"ft{i + 1}", max_shard_size="20KB")
        sds.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    _tokenizer().save_pretrained(root / "ft3")
    return root, sds


def _shards(folder):
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_three_folder_soup_loads_with_from_pretrained(finetunes, tmp_path, run_cli):
    root, sds = finetunes
    assert len(_shards(root / "ft1")) > 3  # the inputs really are sharded
    soup = tmp_path / "soup"
    code, _, err = run_cli("merge", root / "ft1", root / "ft2", root / "ft3", "-o", f"{soup}/",
                           "--shard-size", "30KB")
    assert code == 0, err
    assert "shards" in err and "copied config.json" in err
    index = json.loads((soup / "model.safetensors.index.json").read_text())
    shards = _shards(soup)
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for name in shards:
        with safe_open(str(soup / name), "pt") as f:
            assert f.metadata()["format"] == "pt" and "ckptavg_inputs" in f.metadata()
            keys = list(f.keys())
        sd = load_file(soup / name)
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        assert nbytes <= 30_000 or len(keys) == 1, (name, nbytes)  # at most the shard size
        assert all(index["weight_map"][k] == name for k in keys)
        total += nbytes
    assert index["metadata"]["total_size"] == total
    inputs = json.loads(index["metadata"]["ckptavg_inputs"])
    assert [os.path.basename(i["file"]) for i in inputs] == ["ft1", "ft2", "ft3"]

    model = GPT2LMHeadModel.from_pretrained(soup)
    got = model.state_dict()
    for k in sds[0]:
        assert_close32(got[k], fp64_mean([sd[k] for sd in sds]))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # config and tokenizer came along, unchanged
    assert (soup / "config.json").read_bytes() == (root / "ft3" / "config.json").read_bytes()
    assert (soup / "generation_config.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(soup)
    assert tok("w1 w5")["input_ids"] == [1, 5]
    # no temporary folders left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


def test_single_shard_is_model_safetensors_and_dtype_updates_config(finetunes, tmp_path):
    root, sds = finetunes
    rep = ckptavg.merge([root / "ft1", root / "ft2"], tmp_path / "soup", dtype="bfloat16")
    assert _shards(tmp_path / "soup") == ["model.safetensors"]
    assert not (tmp_path / "soup" / "model.safetensors.index.json").exists()
    assert rep.extra["shards"] == ["model.safetensors"]
    cfg = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "soup", dtype=torch.float32)
    ref = fp64_mean([sd["transformer.h.0.mlp.c_fc.weight"] for sd in sds[:2]])
    got = model.transformer.h[0].mlp.c_fc.weight.detach()
    assert torch.equal(got, ref.to(torch.bfloat16).float())


def _bin_shards(folder, sd):
    """The older sharded layout: two pytorch_model-0000k-of-00002.bin files and their index."""
    folder.mkdir()
    names = list(sd)
    # both shards start with a [8] tensor: each is storage "0" of its file, and must not look tied
    part1 = {k: sd[k] for k in names[1:4]}  # conv.bias, bn.weight, bn.bias
    part2 = {k: sd[k] for k in names[4:] + names[:1]}  # bn.running_mean, ..., conv.weight
    assert next(iter(part1.values())).shape == next(iter(part2.values())).shape == (8,)
    wmap = {}
    for k, part in enumerate((part1, part2), 1):
        torch.save(part, folder / f"pytorch_model-0000{k}-of-00002.bin")
        wmap.update({n: f"pytorch_model-0000{k}-of-00002.bin" for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def test_pytorch_model_bin_folders_single_and_sharded(tmp_path):
    sds = make_state_dicts(4, seed=7)
    # a: one pytorch_model.bin; b1, b2: two .bin shards with an index; c: model.safetensors
    (tmp_path / "a").mkdir()
    torch.save(sds[0], tmp_path / "a" / "pytorch_model.bin")
    _bin_shards(tmp_path / "b1", sds[1])
    _bin_shards(tmp_path / "b2", sds[2])
    (tmp_path / "c").mkdir()
    save_file(sds[3], str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    folders = [tmp_path / n for n in ("a", "b1", "b2", "c")]
    p = ckptavg.plan(folders)
    assert [i.format for i in p.inputs] == ["hf-folder"] * 4
    for chosen in ([1, 2], [0, 1, 2, 3]):
        got = ckptavg.average([folders[i] for i in chosen], order="given")
        for k, v in sds[0].items():
            if v.is_floating_point():
                assert_close32(got[k], fp64_mean([sds[i][k] for i in chosen]))


def test_folder_of_checkpoint_folders_vs_one_model_folder(finetunes, tmp_path, run_cli):
    """A Hugging Face Trainer output_dir: checkpoint-N/ folders with trainer_state.json and
    training state. The run folder is a folder of checkpoints; each checkpoint-N/ is one."""
    root, sds = finetunes
    run = tmp_path / "run"
    run.mkdir()
    for step, i in ((300, 2), (100, 0), (200, 1)):
        ck = run / f"checkpoint-{step}"
        ck.mkdir()
        for f in (root / f"ft{i + 1}").iterdir():
            (ck / f.name).write_bytes(f.read_bytes())
        (ck / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "epoch": step / 100, "log_history": [{"eval_loss": 3.0 - step / 200}]}))
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        torch.save({"last_epoch": 1}, ck / "scheduler.pt")
    (run / "training_args.bin").write_bytes(b"\x80\x04not weights")
    p = ckptavg.plan(run)
    assert [(i.path.name, i.step) for i in p.inputs] == [("checkpoint-100", 100), ("checkpoint-200", 200),
                                                         ("checkpoint-300", 300)]
    assert any("training_args.bin" in n for n in p.notes)
    assert ckptavg.plan(run, best=1, metric="eval_loss", lower_is_better=True).inputs[0].step == 300
    one = ckptavg.plan(run / "checkpoint-200")
    assert len(one.inputs) == 1 and one.inputs[0].format == "hf-folder"
    code, _, err = run_cli("merge", run, "-o", tmp_path / "soup", "--steps", "200:")
    assert code == 0, err
    out = tmp_path / "soup"
    assert not (out / "trainer_state.json").exists() and not (out / "optimizer.pt").exists()
    model = GPT2LMHeadModel.from_pretrained(out)
    assert_close32(model.transformer.wpe.weight.detach(),
                   fp64_mean([sds[1]["transformer.wpe.weight"], sds[2]["transformer.wpe.weight"]]))
    # an output_dir holding the final model and its checkpoint folders is the folder of those
    # checkpoints (it was taken as the final model alone: `--last 3` then "averaged" one model)
    for f in (root / "ft1").iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    p = ckptavg.plan(run, last=3)
    assert [i.path.name for i in p.inputs] == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert any("holds checkpoint folders (checkpoint-100, checkpoint-200, checkpoint-300) and a final model" in n
               for n in p.notes)
    assert len(ckptavg.plan(f"{run}/*/").inputs) == 3


def test_tied_state_dict_to_folder_writes_one_copy_per_name(tmp_path):
    sds = []
    for i in range(2):
        torch.manual_seed(i)
        m = GPT2LMHeadModel(_config())
        sd = m.state_dict()
        assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
        torch.save(sd, tmp_path / f"m{i}.pt")
        sds.append(sd)
    p = ckptavg.plan([tmp_path / "m0.pt", tmp_path / "m1.pt"])
    assert sum(t.alias_of is not None for t in p.tensors) == 1  # read and averaged once
    ckptavg.merge([tmp_path / "m0.pt", tmp_path / "m1.pt"], tmp_path / "out/", shard_size="25KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] != index["weight_map"]["transformer.wte.weight"]
    w = load_file(out / index["weight_map"]["lm_head.weight"])["lm_head.weight"]
    e = load_file(out / index["weight_map"]["transformer.wte.weight"])["transformer.wte.weight"]
    assert torch.equal(w, e)
    assert_close32(w, fp64_mean([sd["lm_head.weight"] for sd in sds]))
    assert not (out / "config.json").exists()  # no input model folder: nothing to copy


def test_sharding_with_tiny_chunks_streams_across_shard_boundaries(finetunes, tmp_path, monkeypatch):
    root, sds = finetunes
    from ckptavg.io import checkpoint as readers

    def boom(self):
        raise AssertionError("a whole tensor was materialised")

    monkeypatch.setattr(readers.TensorRef, "materialize", boom)
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "100")
    ckptavg.merge([root / "ft1", root / "ft2", root / "ft3"], tmp_path / "soup", shard_size="9KB")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "soup")
    for k in ("transformer.h.1.attn.c_attn.weight", "transformer.ln_f.bias"):
        assert_close32(model.state_dict()[k], fp64_mean([sd[k] for sd in sds]))


def test_existing_destination_rules(finetunes, tmp_path, run_cli):
    root, _ = finetunes
    inputs = [root / "ft1", root / "ft2"]
    # a folder with other files is refused, untouched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", *inputs, "-o", busy)
    assert code == 1 and "busy: the folder exists and holds other files ('notes.txt')" in err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # an empty folder is filled
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli("merge", *inputs, "-o", empty)
    assert code == 0, err
    assert (empty / "config.json").is_file()
    # an earlier ckptavg output with a file added since is refused, untouched (issue 23, item 7);
    # without that file it is replaced as a whole
    (empty / "stale.txt").write_text("x")
    before = {q.name: q.read_bytes() for q in empty.iterdir()}
    code, _, err = run_cli("merge", root / "ft3", root / "ft1", "-o", empty, "--order", "given")
    assert code == 1 and "also holds 'stale.txt', not one of the files ckptavg wrote there" in err
    assert {q.name: q.read_bytes() for q in empty.iterdir()} == before
    (empty / "stale.txt").unlink()
    code, _, err = run_cli("merge", root / "ft3", root / "ft1", "-o", empty, "--order", "given")
    assert code == 0, err
    with safe_open(str(empty / "model.safetensors"), "pt") as f:
        inputs_meta = json.loads(f.metadata()["ckptavg_inputs"])
    assert [os.path.basename(i["file"]) for i in inputs_meta] == ["ft3", "ft1"]
    # shards only: another node's part of a merge across ranks is replaced, shards of another
    # program are not
    for who, meta, code_wanted in (("other", {"format": "pt"}, 1), ("node", {"ckptavg_version": "0"}, 0)):
        part = tmp_path / who
        part.mkdir()
        save_file({"w": torch.zeros(2)}, str(part / "model-00002-of-00002.safetensors"), metadata=meta)
        code, _, err = run_cli("merge", *inputs, "-o", part)
        assert code == code_wanted, err
        assert (part / "model-00002-of-00002.safetensors").exists() == (code_wanted == 1)
    # a file where the folder should go
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("merge", *inputs, "-o", f"{tmp_path / 'file'}/")
    assert code == 1 and "exists and is not a folder" in err
    # an input folder as the output
    code, _, err = run_cli("merge", *inputs, "-o", root / "ft2")
    assert code == 2 and "the output is also an input" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "file", "node", "other"]


def test_failure_leaves_nothing_at_the_destination(tmp_path, run_cli):
    sds = make_state_dicts(2)
    sds[1]["fc.weight"][3, 2] = float("nan")
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"c{i}.pt")
    code, _, err = run_cli("merge", tmp_path / "c0.pt", tmp_path / "c1.pt", "-o", tmp_path / "out/",
                           "--shard-size", "1KB")
    assert code == 1 and "c1.pt: tensor 'fc.weight' holds nan" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.pt", "c1.pt"]


@pytest.mark.parametrize("args, needle", [
    (["-o", "out/", "--shard-size", "lots"], "--shard-size must be a size such as 5GB"),
    (["-o", "out/", "--shard-size", "0MB"], "--shard-size must be positive"),
    (["-o", "o.pt", "--shard-size", "1GB"], "--shard-size applies to folder output"),
    (["-o", "o.txt"], "or name a folder (ending in /)"),
])
def test_folder_option_errors(tmp_path, run_cli, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    for i, sd in enumerate(make_state_dicts(2)):
        torch.save(sd, tmp_path / f"c{i}.pt")
    code, _, err = run_cli("merge", "c0.pt", "c1.pt", *args)
    assert code == 2 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.pt", "c1.pt"]


def test_parse_size_and_folder_detection():
    assert parse_size(None) == 5 * 10**9
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("100kb") == 10**5
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5GB") == 1_500_000_000 and parse_size(4096) == 4096
    for name, folder in [("soup/", True), ("soup", True), ("llama-3.1-8b-soup", True), ("out.txt", False),
                         ("x.safetensors", False), ("x.pt", False), ("x.pth.tar", False), ("runs/model.v2", False)]:
        assert is_folder_output(name) is folder, name


def test_index_and_shards_match_safetensors_format(finetunes, tmp_path):
    """Every shard is a valid safetensors file by the format's own rules (8-aligned header)."""
    root, _ = finetunes
    ckptavg.merge([root / "ft1", root / "ft2"], tmp_path / "soup", shard_size="20KB")
    for name in _shards(tmp_path / "soup"):
        raw = (tmp_path / "soup" / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8 : 8 + n])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert 8 + n + end == len(raw)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads /proc/self/status")
def test_folder_output_peak_rss_bounded_by_largest_tensor(tmp_path):
    """Sharded folder in, sharded folder out: the process never holds a model's worth of data."""
    largest = 1 << 20  # elements: 4 MB float32
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(largest // 2, generator=g) for i in range(24)}  # 48 MB
    base["embed.weight"] = torch.randn(largest, generator=g)
    folders = []
    for k in range(3):
        f = tmp_path / f"ft{k}"
        f.mkdir()
        sd = {n: t + 0.01 * k for n, t in base.items()}
        names = list(sd)
        for j, part in enumerate((names[:13], names[13:]), 1):
            save_file({n: sd[n] for n in part}, str(f / f"model-0000{j}-of-00002.safetensors"),
                      metadata={"format": "pt"})
        (f / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f"model-0000{1 if i < 13 else 2}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}))
        folders.append(str(f))
    out = tmp_path / "soup"
    above = merge_peak_rss(out, folders, shard_size="10MB")
    model_bytes = sum(t.numel() * 4 for t in base.values())
    assert len(list(out.glob("model-*.safetensors"))) == 7  # 4 x 2 MiB per 10 MB shard, then the 4 MiB one
    print(f"peak RSS above import: {above / 2**20:.1f} MiB (model {model_bytes / 2**20:.0f} MiB)")
    assert above <= 4 * largest * 4 < model_bytes / 3

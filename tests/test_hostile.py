"""Hostile and damaged inputs: hand-made pickles (hostile tensor geometry, shadowed methods,
globals that run code), hostile JSON (safetensors headers, HF index and trainer state),
ambiguous zips, interrupts while replacing a folder output, overflow to float16, and the
harmless classes real frameworks put into checkpoints. Each bad input goes through the CLI:
one line on stderr, exit 1 or 2, no traceback."""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import CkptavgError, NonFiniteError, OptionError
from ckptavg.io import files, hf_folder_out, open_checkpoint

from ._hostile_files import Build, Deep, Global, TensorSpec, safetensors_raw, torch_zip
from .conftest import make_state_dicts


def _fails(run_cli, *args, codes=(1, 2)):
    code, _, err = run_cli("merge", *map(str, args))
    lines = err.strip().splitlines()
    assert code in codes, (code, err)
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def good_pt(tmp_path):
    p = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(4)}, p)
    return p


# -- 1, 2: tensor views that run past their storage


@pytest.mark.parametrize("spec", [
    TensorSpec(offset=2, size=(4,)),                         # offset + size past the record
    TensorSpec(size=(2, 2), stride=(-1, 1), offset=2),       # a negative stride
    TensorSpec(size=(), stride=(), offset=4),                # a 0-d tensor past the end
    TensorSpec(size=(2,), stride=(1 << 40,)),                # a huge stride
    TensorSpec(numel=1 << 40, size=(4,), record_bytes=16),   # a storage bigger than its record
], ids=["offset", "negative-stride", "0-d", "huge-stride", "big-storage"])
def test_view_past_storage_is_refused(tmp_path, run_cli, good_pt, spec):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(torch_zip({"w": spec}))
    with pytest.raises(RuntimeError):
        torch.load(bad, weights_only=True)  # torch refuses it too
    msg = _fails(run_cli, good_pt, bad, "-o", tmp_path / "o.pt")
    assert "bad.pt: " in msg and "tensor 'w'" in msg
    assert not (tmp_path / "o.pt").exists()


def test_in_bounds_hand_made_views_read_like_torch(tmp_path):
    """The builder's files are real checkpoints: in-bounds views read as torch reads them."""
    obj = {"a": TensorSpec(numel=12, size=(3, 2), stride=(1, 3), offset=1, key="0"),
           "b": TensorSpec(numel=12, size=(), stride=(), offset=11, key="0")}
    p = tmp_path / "ok.pt"
    p.write_bytes(torch_zip(obj))
    ref = torch.load(p, weights_only=True)
    with open_checkpoint(p) as c:
        for k in ("a", "b"):
            assert torch.equal(c.tensors[k].materialize(), ref[k])


_RSS_READ = """
import sys
from ckptavg.io import open_checkpoint
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = hwm()
try:
    open_checkpoint(sys.argv[1])
except Exception as e:
    print(type(e).__name__)
print(hwm() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_huge_stride_file_allocates_nothing(tmp_path):
    bad = tmp_path / "stride.pt"
    bad.write_bytes(torch_zip({"w": TensorSpec(size=(2, 2), stride=(1 << 45, 1 << 44))}))
    assert bad.stat().st_size < 1000  # a few hundred bytes claiming a view spanning petabytes
    res = subprocess.run([sys.executable, "-c", _RSS_READ, str(bad)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert res.returncode == 0, res.stderr
    kind, peak = res.stdout.split()
    assert kind == "CheckpointReadError"
    assert int(peak) < 50 << 20


# -- 4: crafted inputs that ended in tracebacks


def _st_good(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(4)}, str(p))
    return p


_W = b'"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'
_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("header", [
    b"{" + _W + b',"x":' + _DEEP + b"}",
    b'{"__metadata__":{"a":' + _DEEP + b"}," + _W + b"}",
    b'{"__metadata__":' + _DEEP + b"," + _W + b"}",
    b'{"w":{"dtype":["F32"],"shape":[4],"data_offsets":[0,16]}}',
    b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16' + b"0" * 400 + b"]}}",
], ids=["deep-header", "deep-metadata-value", "deep-metadata", "list-dtype", "400-digit-offset"])
def test_hostile_safetensors_json(tmp_path, run_cli, header):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(safetensors_raw(header, b"\0" * 16))
    msg = _fails(run_cli, _st_good(tmp_path), bad, "-o", tmp_path / "o.pt")
    assert "bad.safetensors: corrupt safetensors header" in msg


@pytest.mark.parametrize("attr", ["items", "values", "keys", "get", "__getitem__", "__contains__", "__iter__"])
@pytest.mark.parametrize("where", ["top", "state_dict", "metadata"])
def test_ordered_dict_with_shadowed_methods(tmp_path, good_pt, attr, where):
    """A pickle's BUILD can set ``items = 5`` on an OrderedDict: ckptavg still calls the real method."""
    od = Build(collections.OrderedDict(w=TensorSpec()), {attr: 5})
    obj = {"top": od, "state_dict": {"state_dict": od, "epoch": 1},
           "metadata": {"state_dict": collections.OrderedDict(w=TensorSpec()), "metrics": od, "extra_state": od,
                        "callbacks": od}}[where]
    p = tmp_path / "od.pt"
    p.write_bytes(torch_zip(obj))
    ref = torch.load(p, weights_only=True)
    ref_w = ref["w"] if where == "top" else ref["state_dict"]["w"]
    got = ckptavg.average([p, good_pt])
    torch.testing.assert_close(got["w"], ref_w / 2)


@pytest.mark.parametrize("attr", ["stride", "storage_offset", "untyped_storage", "is_contiguous", "numel",
                                  "element_size", "reshape", "item"])
def test_tensor_with_shadowed_methods(tmp_path, good_pt, attr):
    """``_rebuild_from_type_v2`` sets attributes on a tensor (``stride = 5``): the checks use the real methods."""
    p = tmp_path / "t.pt"
    p.write_bytes(torch_zip({"w": TensorSpec(state={attr: 5}),
                             "epoch": TensorSpec(key="1", dtype=torch.int64, numel=1, size=(), stride=(),
                                                 state={attr: 5})}))
    ref = torch.load(p, weights_only=True)
    with open_checkpoint(p) as c:
        assert torch.equal(c.tensors["w"].materialize(), ref["w"])
    # geometry hidden behind a fake stride is still checked
    p.write_bytes(torch_zip({"w": TensorSpec(size=(2,), stride=(1 << 40,), state={attr: 5})}))
    with pytest.raises(CkptavgError, match="tensor 'w'"):
        open_checkpoint(p)


def _folder(root, name, *, index=None, trainer=None):
    f = root / name
    f.mkdir()
    if index is not None:
        save_file({"w": torch.ones(4)}, str(f / "model-1.safetensors"))
        (f / "model.safetensors.index.json").write_bytes(index)
    else:
        save_file({"w": torch.ones(4)}, str(f / "model.safetensors"))
    if trainer is not None:
        (f / "trainer_state.json").write_bytes(trainer)
    return f


@pytest.mark.parametrize("index, needle", [
    (json.dumps({"weight_map": {"w": ""}}).encode(), "tensor 'w': shard name ''"),
    (json.dumps({"weight_map": {"w": "."}}).encode(), "tensor 'w': shard name '.'"),
    (b'{"weight_map":' + _DEEP + b"}", "invalid index file"),
    (b'{"weight_map":{"w":"model-1.safetensors"},"x":' + _DEEP + b"}", "invalid index file"),
    (b'{"weight_map": 5}', "weight_map is not a name->file object"),
    (b'{"weight_map": {"w": ["a"]}}', "weight_map is not a name->file object"),
    (b"[1, 2]", "weight_map"),
    (b'{"weight_map": {}}', "weight_map lists no tensors"),
    (b'{"weight_map": "\xff"}', "invalid index file"),
], ids=["empty-name", "dot", "deep", "deep-sibling", "int", "list-value", "list", "empty",
                                               "bad-utf8"])
def test_hostile_index_json(tmp_path, run_cli, index, needle):
    good = _folder(tmp_path, "good", index=json.dumps({"weight_map": {"w": "model-1.safetensors"}}).encode())
    bad = _folder(tmp_path, "bad", index=index)
    msg = _fails(run_cli, good, bad, "-o", tmp_path / "o.pt")
    assert "bad/model.safetensors.index.json: " in msg and needle in msg


@pytest.mark.parametrize("state, needle", [
    (b'{"log_history": 5}', "'log_history' is 5, not a list"),
    (b'{"epoch": 1' + b"0" * 400 + b"}", "'epoch' is an integer of 401 digits"),
    (b'{"epoch": 1' + b"0" * 400 + b".5}", "'epoch' is inf"),
    (b'{"global_step": "12"}', "'global_step' is '12'"),
    (b'{"global_step": -3}', "'global_step' is -3"),
    (b'{"log_history":' + _DEEP + b"}", "nested too deeply"),
    (b'{"log_history": [{"eval_loss": 1}, 3]}', "'log_history[1]' is 3"),
    (b"[]", "a JSON list, not an object"),
    (b"\xff\xfe", "not valid JSON"),
], ids=["log-history-int", "epoch-400-digits", "epoch-inf", "step-str", "step-negative", "deep", "entry-int",
        "list", "bad-utf8"])
def test_hostile_trainer_state(tmp_path, run_cli, state, needle):
    good = _folder(tmp_path, "checkpoint-1", trainer=b'{"global_step": 1, "epoch": 0.5, "log_history": []}')
    bad = _folder(tmp_path, "checkpoint-2", trainer=state)
    msg = _fails(run_cli, good, bad, "-o", tmp_path / "o.pt")
    assert "checkpoint-2/trainer_state.json: invalid trainer state: " in msg and needle in msg


def test_huge_explicit_weights(tmp_path, run_cli, good_pt):
    other = tmp_path / "other.pt"
    torch.save({"w": torch.ones(4)}, other)
    msg = _fails(run_cli, good_pt, other, "-o", tmp_path / "o.pt", "--weights", "1e308,1e308")
    assert "--weights" in msg or "explicit weights" in msg
    with pytest.raises(OptionError):
        ckptavg.merge([good_pt, other], tmp_path / "o.pt", weights=[1e308, 1e308])


# -- 5: ambiguous zips


def test_zip_with_two_members_of_one_name(tmp_path, run_cli, good_pt):
    raw = torch_zip({"w": TensorSpec()})
    bad = tmp_path / "dup.pt"
    with zipfile.ZipFile(bad, "w") as out, zipfile.ZipFile(__import__("io").BytesIO(raw)) as src:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr("archive/data/0", b"\xff" * 16)
    msg = _fails(run_cli, good_pt, bad, "-o", tmp_path / "o.pt")
    assert "dup.pt: ambiguous torch checkpoint: the zip holds two members named 'archive/data/0'" in msg


def test_zip_with_two_top_level_folders(tmp_path, run_cli, good_pt):
    bad = tmp_path / "two.pt"
    bad.write_bytes(torch_zip({"w": TensorSpec()}, extra={"other/data.pkl": b"\x80\x02N."}))
    msg = _fails(run_cli, good_pt, bad, "-o", tmp_path / "o.pt")
    assert "two.pt: ambiguous torch checkpoint: the zip has 2 top-level folders" in msg


# -- 6: replacing a folder output, interrupted


def _folder_runs(tmp_path):
    paths = []
    for i, sd in enumerate(make_state_dicts(2)):
        p = tmp_path / f"ck_{i}.pt"
        torch.save(sd, p)
        paths.append(p)
    return paths


def _hidden(folder):
    return sorted(q.name for q in folder.iterdir() if q.name.startswith("."))


@pytest.mark.parametrize(("exchange", "step"), [(True, 1), (False, 1), (False, 2), (False, 3)])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupt_between_the_renames_of_a_replacement(tmp_path, monkeypatch, exchange, step, exc):
    # with renameat2's exchange a replacement is one rename and one exchange; without, three renames
    from ckptavg.io import folders

    if not exchange:
        monkeypatch.setattr(folders, "_renameat2", None)
    paths = _folder_runs(tmp_path)
    dest = tmp_path / "soup"
    ckptavg.merge(paths[:1], dest)
    before = {q.name: q.read_bytes() for q in dest.iterdir()}
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == step:
            raise exc("interrupted")
        return real(a, b)

    monkeypatch.setattr(hf_folder_out.os, "rename", rename)
    with pytest.raises((KeyboardInterrupt, CkptavgError)):
        ckptavg.merge(paths, dest)
    monkeypatch.undo()
    assert len(calls) >= step  # the step was reached (the renames back are counted too)
    assert {q.name: q.read_bytes() for q in dest.iterdir()} == before
    assert _hidden(tmp_path) == []


def test_second_interrupt_during_cleanup_leaves_no_temporary(tmp_path, monkeypatch):
    paths = _folder_runs(tmp_path)
    dest = tmp_path / "soup"
    ckptavg.merge(paths[:1], dest)
    before = {q.name: q.read_bytes() for q in dest.iterdir()}
    real_rmtree = hf_folder_out.shutil.rmtree

    def publish(self):
        raise KeyboardInterrupt  # the first Ctrl-C

    def rmtree(path, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # the second one, in the middle of the cleanup
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(hf_folder_out.ShardedSafetensorsWriter, "_publish", publish)
    monkeypatch.setattr(hf_folder_out.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckptavg.merge(paths, dest)
    monkeypatch.undo()
    assert _hidden(tmp_path) == []
    assert {q.name: q.read_bytes() for q in dest.iterdir()} == before


@pytest.mark.parametrize("out", ["soup", "o.pt", "o.safetensors"])
def test_interrupt_after_the_output_was_published_says_so(tmp_path, monkeypatch, run_cli, out):
    """A Ctrl-C held back during the final rename is delivered once the output is complete:
    the message must name that output, not claim that nothing was written."""
    paths = _folder_runs(tmp_path)
    dest = tmp_path / out
    if out == "soup":
        ckptavg.merge(paths[:1], dest)  # replaced by the interrupted command
        real_publish = hf_folder_out.ShardedSafetensorsWriter._publish

        def publish(self):
            real_publish(self)
            raise KeyboardInterrupt  # as signals_blocked() delivers it after the renames

        monkeypatch.setattr(hf_folder_out.ShardedSafetensorsWriter, "_publish", publish)
    else:
        real_fsync_path = files.fsync_path

        def fsync_path(path, directory=False):
            real_fsync_path(path, directory)
            if directory and path == dest.parent and dest.exists():
                raise KeyboardInterrupt  # right after the rename into place

        monkeypatch.setattr(files, "fsync_path", fsync_path)
    code, _, err = run_cli("merge", *paths, "-o", dest)
    monkeypatch.undo()
    assert code == 130
    said = f"ckptavg: interrupted; already complete before the interrupt: {dest}; nothing else was written"
    assert err.strip() == said
    assert ckptavg.average(dest).keys() == ckptavg.average(paths).keys()
    for name, t in ckptavg.average(dest).items():  # the complete average of both inputs
        assert torch.equal(t, ckptavg.average(paths)[name])
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("out", ["o.pt", "o.safetensors", "soup/"])
def test_failed_merge_removes_the_folders_it_created(tmp_path, out):
    sds = make_state_dicts(2)
    sds[1]["fc.bias"][0] = float("nan")  # found while writing, after the writer made the folders
    paths = []
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"c_{i}.pt")
        paths.append(tmp_path / f"c_{i}.pt")
    with pytest.raises(NonFiniteError):
        ckptavg.merge(paths, str(tmp_path / "new" / "deeper") + "/" + out)
    assert not (tmp_path / "new").exists()


# -- 7: overflow to float16


def test_float16_overflow_is_an_error(tmp_path, run_cli):
    for i in range(2):
        torch.save({"w": torch.tensor([1.0, 70000.0 + i])}, tmp_path / f"c_{i}.pt")
    files = [tmp_path / "c_0.pt", tmp_path / "c_1.pt"]
    msg = _fails(run_cli, *files, "-o", tmp_path / "o.pt", "--dtype", "float16", codes=(1,))
    assert "tensor 'w'" in msg and "--allow-nonfinite" in msg and "inf" in msg
    assert not (tmp_path / "o.pt").exists()
    code, _, err = run_cli("merge", *files, "-o", tmp_path / "o.pt", "--dtype", "float16", "--allow-nonfinite")
    assert code == 0, err
    assert torch.load(tmp_path / "o.pt", weights_only=True)["w"].tolist() == [1.0, float("inf")]


# -- 11: harmless classes from real frameworks; code is still refused


def test_timm_style_namespace_and_numpy_metric(tmp_path):
    args = argparse.Namespace(model="resnet50", lr=0.1, data_dir=pathlib.Path("/data"))
    p = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": {"w": torch.ones(2)}, "args": args,
                "metric": np.float64(0.75), "version": 2}, p)
    with open_checkpoint(p) as c:
        assert c.meta.epoch == 3 and c.meta.metrics["metric"] == 0.75
        assert torch.equal(c.tensors["w"].materialize(), torch.ones(2))
        assert c.obj["args"] == args


def test_lightning_checkpoint_with_hyperparameters(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, args, path, cfg):
            super().__init__()
            self.save_hyperparameters()
            self.lin = torch.nn.Linear(2, 2)

        def training_step(self, batch, i):
            return self.lin(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m = Module(argparse.Namespace(lr=0.1), pathlib.Path("/data/x"), {"layers": [1, 2], "name": "n"})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(m, torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2))
    p = tmp_path / "last-epoch.ckpt"
    trainer.save_checkpoint(p)
    with open_checkpoint(p) as c:
        assert c.meta.epoch == 1 and c.meta.step == 2
        assert torch.equal(c.tensors["lin.weight"].materialize(), m.lin.weight.detach())
        assert c.obj["hyper_parameters"]["path"] == pathlib.Path("/data/x")


@pytest.mark.parametrize("module, name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                          ("builtins", "exec"), ("subprocess", "Popen"), ("builtins", "getattr")])
def test_globals_that_run_code_are_still_refused(tmp_path, run_cli, good_pt, module, name):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    bad.write_bytes(torch_zip({"w": TensorSpec(), "x": Global(module, name, (f"touch {marker}",))}))
    msg = _fails(run_cli, good_pt, bad, "-o", tmp_path / "o.pt", codes=(1,))
    assert "evil.pt: refusing to load" in msg and name in msg
    assert not marker.exists()


def test_deeply_nested_pickle(tmp_path, good_pt):
    p = tmp_path / "deep.pt"
    p.write_bytes(torch_zip({"state_dict": {"w": TensorSpec()}, "junk": Deep(200_000, 1)}))
    ref = torch.load(p, weights_only=True)
    got = ckptavg.average([p, good_pt])
    torch.testing.assert_close(got["w"], ref["state_dict"]["w"] / 2)


# -- 14: the numerics the README states


def test_float64_accumulation_is_correctly_rounded_under_cancellation(tmp_path):
    vals = [2.0**30, 1.0, -(2.0**30)]
    paths = []
    for i, v in enumerate(vals):
        torch.save({"w": torch.tensor([v], dtype=torch.bfloat16)}, tmp_path / f"c_{i}.pt")
        paths.append(tmp_path / f"c_{i}.pt")
    exact = torch.tensor([sum(vals) / 3], dtype=torch.float64).bfloat16()  # 1/3 rounded once
    assert ckptavg.average(paths, accumulate="float64")["w"].item() == exact.item() == 0.333984375
    # 16-bit inputs are accumulated in float64 by default: the same correctly rounded mean
    assert ckptavg.average(paths)["w"].item() == exact.item()
    # float32 inputs accumulated in float32 absorb the 1 (2^30 + 1 rounds to 2^30): the documented
    # cancellation case; --accumulate float64 gives the correctly rounded mean
    for i, v in enumerate(vals):
        torch.save({"w": torch.tensor([v], dtype=torch.float32)}, tmp_path / f"f_{i}.pt")
    f32 = [tmp_path / f"f_{i}.pt" for i in range(3)]
    assert ckptavg.average(f32)["w"].item() == 0.0
    assert ckptavg.average(f32, accumulate="float64")["w"].item() == torch.tensor(1 / 3, dtype=torch.float32).item()

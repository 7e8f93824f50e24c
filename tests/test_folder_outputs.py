"""Folder outputs (issue 23, items 7-9): files a user added to an earlier output folder are never
deleted, files copied from an input model folder are only its own regular files and keep their
permissions, and a replacement killed half-way is restored or cleaned by the next run."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import CkptavgError, CkptavgWarning
from ckptavg.io import folders, hf_folder_out
from ckptavg.io.files import umask

from .conftest import make_state_dicts

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {q.name: q.read_bytes() for q in sorted(folder.iterdir()) if q.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(q.name for q in parent.iterdir() if q.name.startswith("."))


def _inputs_of(folder: Path) -> list[str]:
    """The input file names an HF folder output records (its provenance), independently read."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return [os.path.basename(i["file"]) for i in json.loads(f.metadata()["ckptavg_inputs"])]


@pytest.fixture
def runs(tmp_path):
    paths = []
    for i, sd in enumerate(make_state_dicts(3)):
        p = tmp_path / f"ck_{i}.pt"
        torch.save(sd, p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """Two real Hugging Face folders written by transformers' save_pretrained."""
    root = tmp_path_factory.mktemp("hfm")
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    for i in range(2):
        torch.manual_seed(i)
        GPT2LMHeadModel(cfg).save_pretrained(root / f"ft{i}")
    return root / "ft0", root / "ft1"


def _copy_model(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for q in src.iterdir():
        (dest / q.name).write_bytes(q.read_bytes())
    return dest


# -- item 7: files added to an earlier output folder


@pytest.mark.parametrize("out", ["soup", "avg.dcp"])
def test_a_file_added_to_an_earlier_output_is_never_deleted(runs, tmp_path, run_cli, out):
    dest = tmp_path / out
    ckptavg.merge(runs[:2], dest)
    (dest / "eval_results.json").write_text('{"acc": 0.9}')
    before = _snapshot(dest)
    code, _, err = run_cli("merge", *runs, "-o", dest)
    assert code == 1
    assert err.strip().count("\n") == 0  # one line
    assert f"{dest}: the folder is an earlier ckptavg output but also holds 'eval_results.json'" in err
    assert _snapshot(dest) == before  # the old output and the added file, byte for byte
    assert _hidden(tmp_path) == []
    # the documented way on: move the file out; the folder is then replaced
    (dest / "eval_results.json").unlink()
    code, _, err = run_cli("merge", *runs, "-o", dest)
    assert code == 0, err
    assert "eval_results.json" not in os.listdir(dest)
    assert _snapshot(dest) != before


def test_a_sub_folder_or_symlink_added_is_refused_too(runs, tmp_path):
    dest = tmp_path / "soup"
    ckptavg.merge(runs[:2], dest)
    (dest / "plots").mkdir()
    with pytest.raises(CkptavgError, match="also holds 'plots'"):
        ckptavg.merge(runs, dest)
    (dest / "plots").rmdir()
    # an own name, but a symlink (to the weights moved elsewhere): not a file ckptavg wrote there
    moved = tmp_path / "kept.safetensors"
    os.rename(dest / "model.safetensors", moved)
    os.symlink(moved, dest / "model.safetensors")
    with pytest.raises(CkptavgError, match="also holds 'model.safetensors'"):
        ckptavg.merge(runs, dest)
    assert moved.is_file() and (dest / "model.safetensors").is_symlink()


def test_copied_files_are_ckptavgs_own_and_replaced(hf_model, tmp_path):
    dest = tmp_path / "soup"
    ckptavg.merge(list(hf_model), dest)
    assert (dest / "config.json").is_file() and (dest / "generation_config.json").is_file()
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        listed = json.loads(f.metadata()["ckptavg_files"])
    assert sorted(listed) == sorted(os.listdir(dest))
    ckptavg.merge([hf_model[0]], dest)  # replaces: every file is one ckptavg wrote
    assert len(_inputs_of(dest)) == 1


def test_a_file_added_while_merging_is_not_deleted(runs, tmp_path, monkeypatch):
    dest = tmp_path / "soup"
    ckptavg.merge(runs[:2], dest)
    real_finish = hf_folder_out.ShardedSafetensorsWriter.finish

    def finish(self):
        real_finish(self)
        (dest / "notes.txt").write_text("written during the merge")

    monkeypatch.setattr(hf_folder_out.ShardedSafetensorsWriter, "finish", finish)
    before = _snapshot(dest)
    with pytest.raises(CkptavgError, match="now also holds 'notes.txt'"):
        ckptavg.merge(runs, dest)
    after = _snapshot(dest)
    assert after.pop("notes.txt") == b"written during the merge" and after == before
    assert _hidden(tmp_path) == []


def test_a_folder_swapped_in_during_the_merge_is_not_replaced(runs, tmp_path, monkeypatch):
    dest = tmp_path / "soup"
    ckptavg.merge(runs[:2], dest)
    real_finish = hf_folder_out.ShardedSafetensorsWriter.finish

    def finish(self):
        real_finish(self)
        os.rename(dest, tmp_path / "moved")
        dest.mkdir()
        (dest / "thesis.tex").write_text("not ckptavg's")

    monkeypatch.setattr(hf_folder_out.ShardedSafetensorsWriter, "finish", finish)
    with pytest.raises(CkptavgError, match="no longer an earlier ckptavg output"):
        ckptavg.merge(runs, dest)
    assert _snapshot(dest) == {"thesis.tex": b"not ckptavg's"}
    assert _hidden(tmp_path) == []


# -- item 8: what is copied from an input model folder


def test_only_regular_files_inside_the_input_folder_are_copied(hf_model, tmp_path, run_cli):
    ft = _copy_model(hf_model[1], tmp_path / "ft")
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "secret.json"
    secret.write_text('{"token": "hunter2"}')
    secret.chmod(0o600)
    os.symlink(secret, ft / "tokenizer_config.json")  # leads outside the model folder
    os.symlink("config.json", ft / "alias_config.json")  # leads inside it
    (ft / "vocab.txt").write_text("a\nb\n")
    (ft / "vocab.txt").chmod(0o600)
    (ft / "config.json").chmod(0o640)
    os.mkfifo(ft / "special_tokens_map.json")
    with pytest.warns(CkptavgWarning) as caught:  # the CLI prints these as "ckptavg: warning: ..." on stderr
        code, _, err = run_cli("merge", hf_model[0], ft, "-o", tmp_path / "soup", "--order", "given")
    assert code == 0, err
    out = tmp_path / "soup"
    assert not (out / "tokenizer_config.json").exists()
    assert not (out / "special_tokens_map.json").exists()
    notes = sorted(str(w.message) for w in caught)
    assert notes == [f"{ft / 'special_tokens_map.json'}: not a regular file (a FIFO, socket or device), not copied",
                     f"{ft / 'tokenizer_config.json'}: a symlink to {secret}, outside the model folder, not copied"]
    assert b"hunter2" not in b"".join(q.read_bytes() for q in out.iterdir())
    mask = umask()
    assert (out / "vocab.txt").read_text() == "a\nb\n"
    assert stat.S_IMODE((out / "vocab.txt").stat().st_mode) == 0o600 & ~mask
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o640 & ~mask
    assert (out / "alias_config.json").read_bytes() == (ft / "config.json").read_bytes()
    assert (out / "config.json").read_bytes() == (ft / "config.json").read_bytes()
    assert transformers.AutoConfig.from_pretrained(out).n_embd == 16


def test_config_rewritten_for_dtype_keeps_its_mode(hf_model, tmp_path):
    ft = _copy_model(hf_model[1], tmp_path / "ft")
    (ft / "config.json").chmod(0o600)
    ckptavg.merge([hf_model[0], ft], tmp_path / "soup", dtype="bfloat16", order="given")
    cfg = tmp_path / "soup" / "config.json"
    assert json.loads(cfg.read_text()).get("torch_dtype", json.loads(cfg.read_text()).get("dtype")) == "bfloat16"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600 & ~umask()


def test_hub_cache_snapshot_links_into_blobs_are_copied(hf_model, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for k, q in enumerate(sorted(hf_model[1].iterdir())):
        blob = repo / "blobs" / f"blob{k}"
        blob.write_bytes(q.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / q.name)
    ckptavg.merge([hf_model[0], snap], tmp_path / "soup", order="given")
    assert (tmp_path / "soup" / "config.json").read_bytes() == (hf_model[1] / "config.json").read_bytes()


# -- item 9: atomic replacement, and what a killed replacement leaves


def _kill_at_step(dest: Path, inputs: list[Path], exchange: bool) -> subprocess.CompletedProcess[str]:
    """Run a merge in a child process that SIGKILLs itself between the steps of the replacement."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        import ckptavg
        from ckptavg.io import folders
        folders._step = lambda point: os.kill(os.getpid(), signal.SIGKILL)
        if not {exchange!r}:
            folders._renameat2 = None
        ckptavg.merge({[os.fspath(p) for p in inputs]!r}, {os.fspath(dest)!r})
        print("not killed")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(folders._renameat2 is None, reason="no renameat2 here")
def test_killed_after_the_exchange_the_destination_is_complete(runs, tmp_path):
    dest = tmp_path / "soup"
    ckptavg.merge(runs[:1], dest)
    old = _snapshot(dest)
    res = _kill_at_step(dest, runs, exchange=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    # at the kill point the destination is the complete new output; the old one is hidden beside it
    assert _inputs_of(dest) == [p.name for p in runs]
    (left,) = _hidden(tmp_path)
    assert left.startswith(".soup.") and left.endswith(".ckptavg-new")
    assert _snapshot(tmp_path / left) == old
    new = _snapshot(dest)
    with pytest.warns(CkptavgWarning, match=f"removed {left}"):
        notes = folders.recover_leftovers(dest)
    assert len(notes) == 1 and _hidden(tmp_path) == [] and _snapshot(dest) == new


def test_killed_between_two_renames_the_next_run_restores_the_output(runs, tmp_path):
    dest = tmp_path / "soup"
    ckptavg.merge(runs[:1], dest)
    old = _snapshot(dest)
    res = _kill_at_step(dest, runs, exchange=False)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert not dest.exists()  # the gap the fallback has
    assert sorted(n.rsplit("-", 1)[1] for n in _hidden(tmp_path)) == ["new", "old"]
    # the next run restores the earlier output before it reads anything (a dry run here)
    with pytest.warns(CkptavgWarning) as caught:
        ckptavg.merge(runs[:2], dest, dry_run=True)
    notes = sorted(str(w.message).split(": ", 1)[1].split(" ", 1)[0] for w in caught)
    assert notes == ["removed", "restored"]
    assert _snapshot(dest) == old and _hidden(tmp_path) == []
    ckptavg.merge(runs[:2], dest)
    assert _inputs_of(dest) == [p.name for p in runs[:2]] and _hidden(tmp_path) == []


def test_leftovers_of_another_destination_are_left_alone(tmp_path):
    for name in (".soup2.abcdefgh.ckptavg-old", ".soup.abcdefgh.ckptavg-tmp", ".soup.x.ckptavg-old"):
        (tmp_path / name).mkdir()
    assert folders.recover_leftovers(tmp_path / "soup") == []
    assert len(_hidden(tmp_path)) == 3


def _fake_output(folder: Path, value: float) -> None:
    folder.mkdir()
    save_file({"w": torch.full((4,), value)}, str(folder / "model.safetensors"),
              metadata={"ckptavg_version": "test", "ckptavg_files": '["model.safetensors"]'})


@pytest.mark.skipif(folders._renameat2 is None, reason="no renameat2 here")
def test_the_destination_never_disappears_during_replacements(tmp_path):
    dest = tmp_path / "soup"
    _fake_output(dest, 0.0)
    stop = threading.Event()
    misses = []
    seen = [0]

    def watch():
        while not stop.is_set():
            seen[0] += 1
            if not os.path.exists(dest / "model.safetensors"):
                misses.append(seen[0])

    t = threading.Thread(target=watch)
    t.start()
    try:
        for k in range(200):
            tmp = tmp_path / f".soup.{k:08d}.ckptavg-tmp"
            _fake_output(tmp, float(k + 1))
            folders.publish_folder(tmp, dest, "replace")
    finally:
        stop.set()
        t.join()
    assert misses == [] and seen[0] > 200
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert f.get_tensor("w")[0].item() == 200.0
    assert _hidden(tmp_path) == []


def test_a_file_system_without_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    calls = []

    def refuse(*args):
        calls.append(args)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(folders, "_renameat2", refuse)
    dest = tmp_path / "soup"
    _fake_output(dest, 1.0)
    _fake_output(tmp_path / ".soup.new1.ckptavg-tmp", 2.0)
    folders.publish_folder(tmp_path / ".soup.new1.ckptavg-tmp", dest, "replace")
    assert len(calls) == 1
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert f.get_tensor("w")[0].item() == 2.0
    assert _hidden(tmp_path) == []

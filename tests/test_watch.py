"""`ckptavg watch`: OUTPUT equals a fresh `merge` of the complete checkpoints, byte for byte, after
each step of a slow writer; a checkpoint still being written never enters it."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

import ckptavg
from ckptavg.events import SCHEMAS, schema_of, validate
from ckptavg.watcher.complete import LocalSource, judge

from .conftest import make_state_dicts, sigint_default
from .test_bn_cli import bn_setup  # noqa: F401  (fixture)

SDS = make_state_dicts(8, seed=3)


def _st_bytes(i: int) -> bytes:
    return save(SDS[i], metadata={"step": str(100 * (i + 1))})


def _pt_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"step": 100 * (i + 1), "state_dict": SDS[i]}, buf)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:  # in place, as torch.save and save_file write
        f.write(data)


def _watch_once(inputs, out: Path, **kw):
    events: list[dict] = []
    res = ckptavg.watch(inputs, out, once=True, settle=0, on_event=events.append, **kw)
    for ev in events:
        assert validate(ev, schema_of(ev)) == [], ev
    return res, events


def _fresh(paths, out: Path, tmp: Path, **kw) -> bytes:
    ref = tmp / ("ref-" + out.name)
    if ref.exists():
        ref.unlink()
    ckptavg.merge([Path(p) for p in paths], ref, **kw)
    return ref.read_bytes()


def _published_inputs(events) -> list[list[str]]:
    return [[i["path"] for i in e["inputs"]] for e in events if e["event"] == "published"]


def _no_temporaries(*folders: Path) -> None:
    for folder in folders:
        left = [p for p in folder.rglob("*") if "ckptavg-tmp" in p.name or p.name.endswith(".tmp")]
        assert not left, left


def test_partial_files_never_enter_and_output_equals_fresh_merge(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "avg.safetensors"
    names = [runs / "step-1.safetensors", runs / "step-2.pt", runs / "step-3.safetensors"]
    blobs = [_st_bytes(0), _pt_bytes(1), _st_bytes(2)]
    _write(names[0], blobs[0])
    for k in (1, 2):
        for cut in (5, len(blobs[k]) // 2, len(blobs[k]) - 1):  # the writer is part way
            _write(names[k], blobs[k][:cut])
            _res, events = _watch_once([str(runs)], out)
            assert all(str(names[k]) not in ins for ins in _published_inputs(events))
            assert any(e["event"] == "skipped" and e["path"] == str(names[k]) and e["reason"] == "incomplete"
                       for e in events)
            assert out.read_bytes() == _fresh(names[:k], out, tmp_path)
        _write(names[k], blobs[k])
        _res, events = _watch_once([str(runs)], out)
        assert _published_inputs(events) == [[str(n) for n in names[: k + 1]]]
        assert out.read_bytes() == _fresh(names[: k + 1], out, tmp_path)
    _res, events = _watch_once([str(runs)], out)  # nothing new: no update
    assert [e["event"] for e in events][-2:] == ["unchanged", "stopped"]
    ckptavg.merge(str(runs), tmp_path / "folder.safetensors")  # the merge of the folder itself
    assert out.read_bytes() == (tmp_path / "folder.safetensors").read_bytes()
    _no_temporaries(tmp_path)


def test_dcp_folder_counts_once_metadata_appears(tmp_path):
    import torch.distributed.checkpoint as dcp

    runs, staging, out = tmp_path / "runs", tmp_path / "staging", tmp_path / "avg.pt"
    runs.mkdir()
    folders = []
    for i in range(3):
        dcp.save({"net": SDS[i]}, checkpoint_id=staging / f"step-{i}")
        folders.append(runs / f"step-{i}")
    for i, f in enumerate(folders):
        f.mkdir()
        for p in sorted((staging / f"step-{i}").iterdir()):
            if p.name != ".metadata":
                shutil.copy(p, f / p.name)
        _res, events = _watch_once([str(runs)], out)
        assert all(str(f) not in ins for ins in _published_inputs(events))
        assert any(e["event"] == "skipped" and e["path"] == str(f) and e["reason"] == "incomplete" for e in events)
        if i:
            assert out.read_bytes() == _fresh(folders[:i], out, tmp_path)
        shutil.copy(staging / f"step-{i}" / ".metadata", f / ".metadata")  # dcp.save writes it last
        _res, events = _watch_once([str(runs)], out)
        assert _published_inputs(events)[-1] == [str(x) for x in folders[: i + 1]]
        assert out.read_bytes() == _fresh(folders[: i + 1], out, tmp_path)


def test_file_overwritten_in_place_and_folder_recreated(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "last2.safetensors"
    runs.mkdir()
    names = [runs / f"step-{i}.safetensors" for i in range(3)]
    for i, n in enumerate(names):
        _write(n, _st_bytes(i))
    _watch_once([str(runs)], out, last=2)
    assert out.read_bytes() == _fresh(names, out, tmp_path, last=2)
    # step-2 is saved again, in place: while partial it is left out, then the new content is used
    new = save(SDS[5], metadata={"step": "300"})
    _write(names[2], new[: len(new) // 3])
    _res, events = _watch_once([str(runs)], out, last=2)
    assert _published_inputs(events) == [[str(names[0]), str(names[1])]]
    assert out.read_bytes() == _fresh(names[:2], out, tmp_path, last=2)
    _write(names[2], new)
    _watch_once([str(runs)], out, last=2)
    assert out.read_bytes() == _fresh(names, out, tmp_path, last=2)
    # the folder goes away: the output stays as it was (no empty or partial update)
    before = out.read_bytes()
    shutil.rmtree(runs)
    _res, events = _watch_once([str(runs)], out, last=2)
    assert out.read_bytes() == before and not _published_inputs(events)
    # ... and comes back with other checkpoints
    runs.mkdir()
    again = [runs / f"step-{i}.safetensors" for i in (6, 7)]
    for n, i in zip(again, (6, 7)):
        _write(n, _st_bytes(i))
    _watch_once([str(runs)], out, last=2)
    assert out.read_bytes() == _fresh(again, out, tmp_path, last=2)


def test_unreadable_checkpoint_is_skipped_until_it_changes(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "avg.safetensors"
    runs.mkdir()
    good = runs / "a-1.safetensors"
    _write(good, _st_bytes(0))
    bad = runs / "a-2.pt"
    import zipfile

    with zipfile.ZipFile(bad, "w") as z:  # a complete zip, but not a torch checkpoint
        z.writestr("hello.txt", "not a model")
    _res, events = _watch_once([str(runs)], out)
    assert any(e["event"] == "skipped" and e["reason"] == "unreadable" and e["path"] == str(bad) for e in events)
    assert out.read_bytes() == _fresh([good], out, tmp_path)
    _write(bad, _pt_bytes(1))
    _watch_once([str(runs)], out)
    assert out.read_bytes() == _fresh([good, bad], out, tmp_path)


def test_every_new_templates_and_prune(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    names = [runs / f"s-{i}.safetensors" for i in range(5)]
    for i in range(2):
        _write(names[i], _st_bytes(i))
    tpl = str(tmp_path / "ema-{decay}.safetensors")
    kw = {"method": "ema", "decay": "0.5,0.9", "every_new": 2}
    _watch_once([str(runs)], tpl, **kw)
    _write(names[2], _st_bytes(2))
    _res, events = _watch_once([str(runs)], tpl, **kw)
    assert not _published_inputs(events)  # one new checkpoint: not yet
    _write(names[3], _st_bytes(3))
    _res, events = _watch_once([str(runs)], tpl, **kw)
    assert _published_inputs(events) == [[str(n) for n in names[:4]]]
    for d in ("0.5", "0.9"):
        o = tmp_path / f"ema-{d}.safetensors"
        assert o.read_bytes() == _fresh(names[:4], o, tmp_path, method="ema", decay=float(d))
    # --prune: only what --last 2 can never select again, only checkpoints matched by CHECKPOINTS
    (runs / "notes.txt").write_text("keep me")
    _write(names[4], _st_bytes(4))
    out = tmp_path / "last2.safetensors"
    _res, events = _watch_once([str(runs)], out, last=2, prune=True)
    assert [e["paths"] for e in events if e["event"] == "pruned"] == [[str(n) for n in names[:3]]]
    assert sorted(p.name for p in runs.iterdir()) == ["notes.txt", "s-3.safetensors", "s-4.safetensors"]
    assert out.read_bytes() == _fresh(names[3:], out, tmp_path, last=2)
    with pytest.raises(ckptavg.CkptavgError, match="--prune"):
        _watch_once([str(runs)], out, every=2, prune=True)


@pytest.mark.parametrize("poll", [True, False])
def test_running_watcher_follows_a_slow_writer(tmp_path, poll):
    if not poll:
        pytest.importorskip("inotify_simple")
    runs, out = tmp_path / "runs", tmp_path / "avg.safetensors"
    runs.mkdir()
    events: list[dict] = []
    stop = threading.Event()
    t = threading.Thread(target=ckptavg.watch, args=([str(runs)], out), daemon=True,
                         kwargs={"interval": 0.2 if poll else 0.5, "settle": 0.3, "poll": poll, "stop": stop,
                                 "on_event": events.append})
    t.start()
    names = [runs / f"step-{i}.safetensors" for i in range(3)]
    try:
        for k, n in enumerate(names):
            data = _st_bytes(k)
            with open(n, "wb") as f:  # slowly: a few pieces with pauses
                for j in range(0, len(data), len(data) // 3 + 1):
                    f.write(data[j: j + len(data) // 3 + 1])
                    f.flush()
                    time.sleep(0.15)
            deadline = time.monotonic() + 8
            while len(_published_inputs(events)) < k + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _published_inputs(events)[-1] == [str(x) for x in names[: k + 1]]
            assert out.read_bytes() == _fresh(names[: k + 1], out, tmp_path)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert events[0]["mode"] == ("poll" if poll else "inotify") and events[-1]["event"] == "stopped"
    for ins in _published_inputs(events):  # every update used only whole checkpoints
        assert ins == [str(x) for x in names[: len(ins)]]
    for n in names:  # a checkpoint being written is reported once, not at every scan
        assert sum(e["event"] == "skipped" and e["path"] == str(n) for e in events) <= 1
    for ev in events:
        assert validate(ev, SCHEMAS[f"watch.{ev['event']}"]) == []


def test_stop_abandons_an_update_in_progress(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "avg.safetensors"
    runs.mkdir()
    _write(runs / "a.safetensors", _st_bytes(0))
    stop = threading.Event()
    events: list[dict] = []

    def on_event(ev):
        events.append(ev)
        if ev["event"] == "seen":
            stop.set()  # asked to stop after the update began

    res = ckptavg.watch([str(runs)], out, settle=0, stop=stop, on_event=on_event, interval=0.1)
    assert res.updates == 0 and not out.exists() and events[-1]["event"] == "stopped"
    _no_temporaries(tmp_path)


def test_completeness_judged_per_format(tmp_path):
    src = LocalSource()
    data = _st_bytes(0)
    f = tmp_path / "x.safetensors"
    for cut in (1, 8, 9, len(data) // 2, len(data) - 1):
        _write(f, data[:cut])
        assert not judge(src, f).complete
    _write(f, data)
    assert judge(src, f).complete
    pt = _pt_bytes(0)
    g = tmp_path / "x.pt"
    for cut in range(1, len(pt), max(1, len(pt) // 40)):
        _write(g, pt[:cut])
        assert not judge(src, g).complete, cut
    _write(g, pt)
    assert judge(src, g).complete
    # HF folder: index and every shard; a Trainer checkpoint-N also needs trainer_state.json
    hf = tmp_path / "model"
    hf.mkdir()
    save_file(SDS[0], hf / "model-00001-of-00002.safetensors")
    (hf / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", '
        '"b": "model-00002-of-00002.safetensors"}}')
    assert "shard" in judge(src, hf).reason
    save_file(SDS[1], hf / "model-00002-of-00002.safetensors")
    assert judge(src, hf).complete
    hf = hf.rename(tmp_path / "checkpoint-10")
    assert "trainer_state.json" in judge(src, hf).reason
    (hf / "trainer_state.json").write_text("{}")
    assert judge(src, hf).complete
    # Megatron: an iter_ folder counts once latest_checkpointed_iteration.txt names it
    it = tmp_path / "mg" / "iter_0000200"
    it.mkdir(parents=True)
    (it / ".metadata").write_bytes(b"x")
    (tmp_path / "mg" / "latest_checkpointed_iteration.txt").write_text("100")
    assert not judge(src, it).complete
    (tmp_path / "mg" / "latest_checkpointed_iteration.txt").write_text("200")
    assert judge(src, it).complete


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_watch_json_lines_and_signal_exit_0(tmp_path, sig):
    runs = tmp_path / "runs"
    runs.mkdir()
    _write(runs / "step-1.safetensors", _st_bytes(0))
    out = tmp_path / "avg.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg", "watch", str(runs), "-o", str(out), "--json",
                             "--interval", "0.2", "--settle", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_default)
    try:
        import json

        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if lines[-1]["event"] == "published":
                break
        assert lines and lines[-1]["event"] == "published", lines
        t0 = time.monotonic()
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += [json.loads(x) for x in rest.splitlines()]
    assert lines[-1]["event"] == "stopped" and lines[-1]["reason"] == "signal"
    for ev in lines:
        assert validate(ev, schema_of(ev)) == [], ev
    assert out.read_bytes() == _fresh([runs / "step-1.safetensors"], out, tmp_path)
    _no_temporaries(tmp_path)


def test_a_checkpoint_rewritten_between_scan_and_update_is_not_published(tmp_path):
    from ckptavg.options import MergeOptions
    from ckptavg.watcher import Watcher

    runs, out = tmp_path / "runs", tmp_path / "avg.safetensors"
    runs.mkdir()
    names = [runs / f"s-{i}.safetensors" for i in range(2)]
    for i, n in enumerate(names):
        _write(n, _st_bytes(i))
    events: list[dict] = []
    w = Watcher([str(runs)], str(out), MergeOptions(), on_event=events.append, settle=0)
    complete, files, _settling = w.scan()
    assert list(complete) == names
    time.sleep(0.01)
    _write(names[1], _st_bytes(4))  # complete again, but not the bytes that were judged complete
    assert not w.update(complete, files)
    assert not out.exists() and "changed after it was judged complete" in events[-1]["message"]
    _no_temporaries(tmp_path)
    complete, files, _settling = w.scan()  # the next scan judges the new file and uses it
    assert w.update(complete, files)
    assert out.read_bytes() == _fresh(names, out, tmp_path)


def test_watch_refuses_bad_options_and_a_partial_torchrun_environment(tmp_path, monkeypatch, run_cli):
    runs = tmp_path / "runs"
    runs.mkdir()
    code, _out, err = run_cli("watch", runs, "-o", tmp_path / "a.pt", "--once", "--dry-run")
    assert code == 2 and "--dry-run" in err
    code, _out, err = run_cli("watch", runs, "-o", tmp_path / "a.pt", "--every-new", "0")
    assert code == 2 and "every-new" in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ckptavg.CkptavgError, match="needs torchrun.*MASTER_ADDR"):  # no rendezvous to join
        ckptavg.watch(str(runs), tmp_path / "a.pt", once=True)


def test_trainer_folders_count_once_trainer_state_is_written(tmp_path):
    runs, out = tmp_path / "output_dir", tmp_path / "avg.safetensors"
    folders = [runs / f"checkpoint-{s}" for s in (100, 200)]
    for i, f in enumerate(folders):
        f.mkdir(parents=True)
        save_file(SDS[i], f / "model.safetensors")
    (folders[0] / "trainer_state.json").write_text('{"global_step": 100}')
    _res, events = _watch_once([str(runs)], out)
    assert _published_inputs(events) == [[str(folders[0])]]
    assert out.read_bytes() == _fresh(folders[:1], out, tmp_path)
    (folders[1] / "trainer_state.json").write_text('{"global_step": 200}')
    _watch_once([str(runs)], out)
    assert out.read_bytes() == _fresh(folders, out, tmp_path)


def test_watch_with_bn_spec_equals_merge_with_bn_spec(bn_setup, tmp_path):  # noqa: F811
    _tmp, spec, runs, _sds, _mod = bn_setup
    out = tmp_path / "swa.pt"
    _res, events = _watch_once([str(runs)], out, bn_spec=str(spec), last=3)
    assert len(_published_inputs(events)[0]) == 3
    assert out.read_bytes() == _fresh(sorted(runs.iterdir()), out, tmp_path, bn_spec=str(spec), last=3)


def test_interval_limits_how_often_it_reaverages(tmp_path):
    pytest.importorskip("inotify_simple")  # polling is spaced by the interval anyway; inotify wakes at once
    runs, out = tmp_path / "runs", tmp_path / "avg.safetensors"
    runs.mkdir()
    names = [runs / f"step-{i}.safetensors" for i in range(3)]
    _write(names[0], _st_bytes(0))
    published: list[tuple[float, int]] = []
    stop = threading.Event()

    def on_event(ev):
        if ev["event"] == "published":
            published.append((time.monotonic(), len(ev["inputs"])))

    t = threading.Thread(target=ckptavg.watch, args=([str(runs)], out), daemon=True,
                         kwargs={"interval": 1.5, "settle": 0.1, "stop": stop, "on_event": on_event})
    t.start()
    try:
        deadline = time.monotonic() + 8
        while not published and time.monotonic() < deadline:
            time.sleep(0.02)
        _write(names[1], _st_bytes(1))
        time.sleep(0.4)
        _write(names[2], _st_bytes(2))
        while (not published or published[-1][1] < 3) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(5)
    assert [n for _t, n in published] == [1, 3]  # the two new checkpoints: one update, not two
    assert published[1][0] - published[0][0] >= 1.5
    assert out.read_bytes() == _fresh(names, out, tmp_path)

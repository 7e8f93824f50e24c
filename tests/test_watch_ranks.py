"""`ckptavg watch` across ranks: rank 0 watches, every update is split as `merge` splits one under
torchrun, and a stop on any rank stops every rank (exit status 0, nothing half-published).

In-process tests use a process group of one (gloo, a HashStore: the code path of the ranks without a
spawn); two tests run torchrun with 2 gloo ranks: a watcher following a writer and stopped by a
signal to one rank, and a stop (SIGINT to torchrun, which forwards it) in the middle of an update.
Every published output is compared tensor by tensor, byte for byte, with a single-process merge.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save, save_file

import ckptavg
from ckptavg.engine.worker import Worker
from ckptavg.errors import OptionError
from ckptavg.events import schema_of, validate

from .conftest import make_state_dicts, slow_chunks
from .test_distributed import _children, _finish, _free_port, _signal, _start, _torchrun_cmd, read_folder

SDS = make_state_dicts(4, seed=5)


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _same_as_merge(out: Path, inputs: list[Path], tmp: Path) -> None:
    ref = tmp / "ref"
    if ref.exists():
        import shutil

        shutil.rmtree(ref)
    ckptavg.merge(inputs, ref / "", distributed=False)
    got, want = read_folder(out), read_folder(ref)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "ckptavg-tmp" in p.name]


def test_watch_in_a_group_publishes_the_split_merge_and_refuses_a_single_file(tmp_path, group_of_one):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    with pytest.raises(OptionError, match="writes a folder"):  # before any checkpoint exists
        ckptavg.watch(runs, tmp_path / "avg.safetensors", once=True, settle=0)
    names = [runs / f"step-{i}.safetensors" for i in (1, 2)]
    for i, n in enumerate(names):
        save_file(SDS[i], n)
    events: list[dict] = []
    res = ckptavg.watch(runs, f"{out}/", once=True, settle=0, on_event=events.append)
    assert res.updates == 1 and [e["event"] for e in events][-2:] == ["published", "stopped"]
    assert all(validate(e, schema_of(e)) == [] for e in events)
    _same_as_merge(out, names, tmp_path)
    events.clear()
    res = ckptavg.watch(runs, f"{out}/", once=True, settle=0, on_event=events.append)
    assert res.updates == 0 and events[-2]["event"] == "unchanged"
    bad = {k: v.clone() for k, v in SDS[2].items()}
    next(v for v in bad.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(bad, runs / "step-3.safetensors")
    before = read_folder(out)
    res = ckptavg.watch(runs, f"{out}/", once=True, settle=0, on_event=events.append)
    assert res.errors == 1 and "nan" in events[-2]["message"].lower() and read_folder(out) == before
    assert not ckptavg.distributed.failing()  # the ranks agreed on the failure and went on
    save_file(SDS[2], runs / "step-3.safetensors")
    res = ckptavg.watch(runs, f"{out}/", once=True, settle=0, on_event=events.append)
    assert res.updates == 1
    _same_as_merge(out, names + [runs / "step-3.safetensors"], tmp_path)
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("across_ranks", [False, True], ids=["one-process", "ranks"])
def test_a_stop_during_an_update_abandons_it_within_a_second(tmp_path, monkeypatch, group_of_one, across_ranks):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    g = torch.Generator().manual_seed(0)
    names = [runs / f"step-{i}.safetensors" for i in (1, 2)]
    for n in names:
        save_file({f"w{k}": torch.randn(1 << 16, generator=g) for k in range(4)}, n)
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "1024")  # 256 chunks of 20 ms: the update lasts seconds
    slow = Worker.process

    def process(self, job):
        time.sleep(0.02)
        slow(self, job)

    monkeypatch.setattr(Worker, "process", process)
    stop = threading.Event()
    stopped_at: list[float] = []

    def stop_once_averaging() -> None:
        deadline = time.monotonic() + 60  # (a watch that never starts averaging is stopped too, and fails below)
        while not _temporaries(tmp_path) and time.monotonic() < deadline:  # its temporary output: averaging
            time.sleep(0.01)
        time.sleep(0.2)
        stopped_at.append(time.monotonic())
        stop.set()

    threading.Thread(target=stop_once_averaging, daemon=True).start()
    events: list[dict] = []
    res = ckptavg.watch(runs, f"{out}/", settle=0, interval=0.1, stop=stop, on_event=events.append,
                        distributed=across_ranks)
    assert time.monotonic() - stopped_at[0] < 1.5
    assert res.updates == 0 and res.errors == 0, events
    assert events[-1]["event"] == "stopped" and events[-1]["reason"] == "stop"
    assert not out.exists() and _temporaries(tmp_path) == []


def _worker_script(tmp: Path) -> Path:
    """The CLI, recording each rank's exit status in rc-RANK (the CLI ends a run across ranks with os._exit)."""
    script = tmp / "ckptavg_rank.py"
    script.write_text(
        "import os, sys\n"
        "real = os._exit\n"
        "def record(code):\n"
        "    open(f\"rc-{os.environ['RANK']}\", 'w').write(str(code))\n"
        "    real(code)\n"
        "os._exit = record\n"
        "from ckptavg.cli import main\n"
        "sys.argv = ['ckptavg'] + sys.argv[1:]\n"
        "main()\n")
    return script


def _next_event(proc, lines: list[dict], kind: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            lines.append(json.loads(line))
            if lines[-1]["event"] == kind:
                return lines[-1]
    raise AssertionError(f"no {kind} event: {lines}")


def _ranks(proc) -> dict[int, int]:
    """pid of each rank (its RANK variable) among torchrun's children."""
    found = {}
    for pid in _children(proc.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0][5:])] = pid
    return found


def test_torchrun_watch_follows_a_writer_and_stops_when_one_rank_is_signalled(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    names = [runs / f"step-{i}.safetensors" for i in (1, 2, 3)]
    save_file(SDS[0], names[0])
    data = save(SDS[1])
    names[1].write_bytes(data[: len(data) // 2])  # being written: never read into the output
    proc = _start(_torchrun_cmd(2, _free_port(), _worker_script(tmp_path), "watch", runs, "-o", f"{out}/", "--json",
                                "--interval", "0.3", "--settle", "0.3"), tmp_path)
    lines: list[dict] = []
    try:
        _next_event(proc, lines, "published")
        _same_as_merge(out, names[:1], tmp_path)
        assert any(e["event"] == "skipped" and e["reason"] == "incomplete" for e in lines)
        names[1].write_bytes(data)
        save_file(SDS[2], names[2])
        ev = _next_event(proc, lines, "published")
        while len(ev["inputs"]) < 3:  # the two may land in one update or two
            ev = _next_event(proc, lines, "published")
        _same_as_merge(out, names, tmp_path)
        t0 = time.monotonic()
        _signal(_ranks(proc)[1], signal.SIGTERM)  # rank 1 only: rank 0 stops with it
        rc, text = _finish([proc])[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, text
    assert time.monotonic() - t0 < 15
    lines += [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert lines[-1]["event"] == "stopped" and lines[-1]["reason"] == "signal", lines
    assert all(validate(e, schema_of(e)) == [] for e in lines)
    assert sum(e["event"] == "start" for e in lines) == 1  # rank 0 reports, the other ranks say nothing
    assert (tmp_path / "rc-0").read_text() == "0" and (tmp_path / "rc-1").read_text() == "0"
    _same_as_merge(out, names, tmp_path)
    assert _temporaries(tmp_path) == []



def test_torchrun_watch_interrupted_mid_update_publishes_nothing(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in (1, 2):
        save_file({f"w{k}": torch.randn(1 << 16, generator=g) for k in range(4)}, runs / f"step-{i}.safetensors")
    script = _worker_script(tmp_path)
    script.write_text(slow_chunks(0.02) + script.read_text())
    proc = _start(_torchrun_cmd(2, _free_port(), script, "watch", runs, "-o", f"{out}/", "--json", "--settle", "0"),
                  tmp_path, {"CKPTAVG_CHUNK_ELEMS": "1024"})  # 256 chunks of 20 ms on each rank
    try:
        deadline = time.monotonic() + 60
        while not _temporaries(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert _temporaries(tmp_path), "the update did not start"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: torchrun forwards it to every rank
        rc, text = _finish([proc])[0]
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0 and "SignalException" in text  # torchrun itself reports the signal it received
    assert (tmp_path / "rc-0").read_text() == "0" and (tmp_path / "rc-1").read_text() == "0", text
    assert took < 15, text
    events = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert [e["event"] for e in events if e["event"] in ("published", "error")] == [], events
    assert events[-1]["event"] == "stopped", events
    assert not out.exists() and _temporaries(tmp_path) == []


def test_watch_in_a_group_polls_urls(tmp_path, group_of_one):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    for i in (1, 2):
        mem.pipe(f"/watchranks/run/step-{i}.safetensors", save(SDS[i]))
    events: list[dict] = []
    res = ckptavg.watch("memory://watchranks/run/", f"{tmp_path / 'out'}/", once=True, settle=0,
                        on_event=events.append)
    assert res.updates == 1 and events[0]["mode"] == "poll", events
    local = tmp_path / "local"
    local.mkdir()
    for i in (1, 2):
        save_file(SDS[i], local / f"step-{i}.safetensors")
    _same_as_merge(tmp_path / "out", sorted(local.iterdir()), tmp_path)

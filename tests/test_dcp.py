"""PyTorch Distributed Checkpoint (DCP) folders: reading (ckptavg.io.dcp_in) and writing
(ckptavg.io.dcp_out), against folders written and read by torch.distributed.checkpoint itself."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptavg
from ckptavg.errors import CheckpointReadError, CkptavgError, UnsafePickleError
from ckptavg.io import dcp_in, open_checkpoint
from ckptavg.io.dcp_in import is_dcp_folder, open_dcp
from tests._dcp_worker import full_tensors

WORKER = Path(__file__).with_name("_dcp_worker.py")


def _save(sd: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... uninitialized, assuming ... a single process"
        dcp.save(sd, checkpoint_id=folder)
    return folder


def _variant(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {k: (v.double() + 0.1 * (i + 1) * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            for k, v in full_tensors().items()}


def _mean(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(sd[k].double() for sd in sds) / len(sds) for k in sds[0]}


def _load_plain(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    target = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=folder)
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """Three single-process DCP folders, their merge into a DCP folder, and one 2-rank gloo run that
    saves sharded DTensors and loads the merged folder into DTensors sharded on dim 0."""
    root = tmp_path_factory.mktemp("dcp")
    sds = [_variant(i) for i in range(3)]
    singles = []
    for i, sd in enumerate(sds):
        model = dict(sd, **{"bn.num_batches_tracked": torch.tensor(10 * (i + 1))})
        singles.append(_save({"model": model, "step": 100 * (i + 1), "note": "not a tensor"}, root / f"run{i}"))
    merged = root / "avg.dcp"
    ckptavg.merge(singles, merged)
    sharded, out = root / "sharded", root / "loaded"
    out.mkdir()
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port), str(sharded), str(merged),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], logs
    return {"root": root, "sds": sds, "singles": singles, "merged": merged, "sharded": sharded, "loaded": out}


# --------------------------------------------------------------------------------------
# reading


def test_single_process_folders_read_and_average(dcp_run):
    sds, singles = dcp_run["sds"], dcp_run["singles"]
    ckpt = open_checkpoint(singles[1])
    assert ckpt.format == "dcp" and ckpt.weights_key == "model"
    assert ckpt.meta.step == 200 and ckpt.meta.step_from == "recorded"
    assert {k: (r.shape, r.dtype) for k, r in ckpt.tensors.items()} == {
        **{k: (tuple(v.shape), v.dtype) for k, v in sds[1].items()}, "bn.num_batches_tracked": ((), torch.int64)}
    for k, v in sds[1].items():
        assert torch.equal(ckpt.tensors[k].materialize(), v)
    ckpt.close()

    avg = ckptavg.average(singles)
    for k, ref in _mean(sds).items():
        assert avg[k].dtype == sds[0][k].dtype
        if avg[k].dtype == torch.bfloat16:  # fp32 accumulation, one rounding: the correctly rounded mean
            assert torch.equal(avg[k], ref.to(torch.bfloat16)), k
        else:
            torch.testing.assert_close(avg[k].double(), ref, rtol=1e-6, atol=1e-7)
    assert avg["bn.num_batches_tracked"].item() == 30  # integers come from the last checkpoint


def test_multi_rank_sharded_folder_reads_exactly(dcp_run, monkeypatch):
    folder = dcp_run["sharded"]
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ckpt = open_checkpoint(folder)
    md = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    assert len(md["model.rows.weight"].chunks) == 2 and len(md["model.cols.weight"].chunks) == 2
    assert len(md["model.rep.bias"].chunks) == 1  # replicated: stored once
    assert ckpt.meta.step == 1000
    for k, v in full_tensors().items():
        assert torch.equal(ckpt.tensors[k].materialize(), v), k
    ckpt.close()
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "3")  # engine reads of 3 elements straddle the shard boundaries
    out = ckptavg.average(folder)
    for k, v in full_tensors().items():
        assert torch.equal(out[k], v), k


def test_random_byte_ranges_match_the_full_tensor(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(7)
    sd = {"t": torch.randn(6, 9, generator=g).t(),  # saved as is: a chunk stored transposed
          "b": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16), "s": torch.tensor(2.5),
          "e": torch.empty(0, 3), "i": torch.arange(10, dtype=torch.int16)}
    folder = _save(sd, tmp_path / "c")
    monkeypatch.setattr(dcp_in, "_MIN_BUDGET", 16)  # force the bounded, split gather of the strided chunk
    ckpt = open_dcp(folder)
    rnd = random.Random(0)
    for k, v in sd.items():
        ref = bytes(v.contiguous().reshape(-1).view(torch.uint8).numpy()) if v.numel() else b""
        ref_ = ckpt.tensors[k]
        assert ref_.nbytes == len(ref)
        assert torch.equal(ref_.materialize(), v), k
        for _ in range(40):
            a = rnd.randrange(0, len(ref) + 1)
            b = rnd.randrange(a, len(ref) + 1)
            buf = bytearray(b - a)
            ref_.read_into(a, memoryview(buf))
            assert bytes(buf) == ref[a:b], (k, a, b)
    ckpt.close()


def test_torchtitan_layout_and_folder_of_step_folders(tmp_path):
    g = torch.Generator().manual_seed(3)
    run = tmp_path / "checkpoint"
    for step in (20, 10):
        _save({"tok.weight": torch.randn(4, 3, generator=g), "out.weight": torch.randn(2, 3, generator=g),
               "optimizer": {"state": {"tok.weight": {"exp_avg": torch.randn(4, 3, generator=g)}}},
               "train_state": {"step": torch.tensor(step, dtype=torch.int32)}}, run / f"step-{step}")
    (run / "step-30").mkdir()  # an unfinished save: no .metadata, not a checkpoint
    _save({"w": torch.ones(2)}, tmp_path / "named" / "epoch_3-step-7")
    assert is_dcp_folder(run / "step-10") and not is_dcp_folder(run / "step-30")
    p = ckptavg.plan(run)
    assert [i.path.name for i in p.inputs] == ["step-10", "step-20"]
    assert [i.step for i in p.inputs] == [10, 20]  # from train_state.step
    ckpt = open_checkpoint(run / "step-10")
    assert sorted(ckpt.tensors) == ["out.weight", "tok.weight"]  # no optimizer or train_state tensors
    ckpt.close()
    ckpt = open_checkpoint(tmp_path / "named" / "epoch_3-step-7")
    assert (ckpt.meta.epoch, ckpt.meta.step, ckpt.meta.step_from) == (3, 7, "name")
    ckpt.close()
    ckpt = open_checkpoint(run / "step-10", key="optimizer")
    assert list(ckpt.tensors) == ["state.tok.weight.exp_avg"]
    ckpt.close()


# --------------------------------------------------------------------------------------
# writing


def test_dcp_output_loads_plain_and_sharded(dcp_run):
    merged, expected = dcp_run["merged"], _mean(dcp_run["sds"])
    assert sorted(p.name for p in merged.iterdir()) == [".metadata", "__0_0.distcp", "ckptavg.json"]
    like = dict(full_tensors(), **{"bn.num_batches_tracked": torch.tensor(0)})
    got = _load_plain(merged, like)
    assert got["bn.num_batches_tracked"].item() == 30
    for k, ref in expected.items():
        torch.testing.assert_close(got[k].double(), ref.to(got[k].dtype).double(), rtol=1e-6, atol=1e-7)
    # the 2-rank run loaded the same folder into DTensors sharded on dim 0
    ranks = [torch.load(dcp_run["loaded"] / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k in expected:
        assert torch.equal(ranks[0]["full"][k], got[k])
        assert ranks[0]["local"][k].shape[0] < got[k].shape[0]  # each rank holds a part
        assert torch.equal(torch.cat([ranks[0]["local"][k], ranks[1]["local"][k]]), got[k])
    # and ckptavg reads its own output back
    ckpt = open_checkpoint(merged)
    for k in expected:
        assert torch.equal(ckpt.tensors[k].materialize(), got[k])
    ckpt.close()


def test_dcp_output_rules(tmp_path, dcp_run, run_cli):
    singles = dcp_run["singles"]
    code, out, err = run_cli("merge", *singles, "-o", tmp_path / "a.dcp/")
    assert code == 0, err
    first = (tmp_path / "a.dcp" / "__0_0.distcp").read_bytes()
    code, out, err = run_cli("merge", singles[0], singles[2], "-o", tmp_path / "a.dcp")  # replaces its own output
    assert code == 0, err
    assert (tmp_path / "a.dcp" / "__0_0.distcp").read_bytes() != first
    other = tmp_path / "other.dcp"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, out, err = run_cli("merge", *singles, "-o", other)
    assert code == 1 and "Traceback" not in err and "holds other files" in err
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if "ckptavg-tmp" in p.name]


# --------------------------------------------------------------------------------------
# bad inputs


def _break(kind: str, folder: Path) -> str:
    """Damage a copy of the 2-rank folder; returns the tensor key the error must name."""
    if kind == "missing":
        (folder / "__1_0.distcp").unlink()
    elif kind == "truncated":
        f = folder / "__1_0.distcp"
        f.write_bytes(f.read_bytes()[:-100])
    elif kind == "gap":
        md = dcp.FileSystemReader(folder).read_metadata()
        md.state_dict_metadata["model.rows.weight"].chunks.pop()
        with open(folder / ".metadata", "wb") as fh:
            pickle.dump(md, fh)
        return "model.rows.weight"
    elif kind == "overlap":
        md = dcp.FileSystemReader(folder).read_metadata()
        c = md.state_dict_metadata["model.cols.weight"].chunks[1]
        c.offsets, c.sizes = torch.Size([0, 3]), torch.Size([3, 4])  # columns 3..6 overlap chunk 0's 0..3
        with open(folder / ".metadata", "wb") as fh:
            pickle.dump(md, fh)
        return "model.cols.weight"
    return "model."


@pytest.mark.parametrize("kind", ["missing", "truncated", "gap", "overlap"])
def test_damaged_folders_fail_with_one_line(kind, tmp_path, dcp_run, run_cli):
    folder = tmp_path / "sharded"
    shutil.copytree(dcp_run["sharded"], folder)
    name = _break(kind, folder)
    with pytest.raises(CheckpointReadError) as ei:
        ckpt = open_checkpoint(folder)
        for r in ckpt.tensors.values():
            r.materialize()
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{folder}: tensor '") and name in msg
    assert {"missing": "missing", "truncated": "truncated", "gap": "gap", "overlap": "overlap"}[kind] in msg
    out = tmp_path / "out.pt"
    code, _, err = run_cli("merge", folder, dcp_run["singles"][0], "-o", out)
    assert code == 1 and "Traceback" not in err and str(folder) in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "ckptavg-tmp" in p.name]


def test_metadata_pickle_is_restricted(tmp_path, dcp_run):
    folder = tmp_path / "evil"
    shutil.copytree(dcp_run["singles"][0], folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafePickleError, match="refusing"):
        open_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()
    (folder / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CkptavgError, match="unreadable DCP metadata"):
        open_checkpoint(folder)

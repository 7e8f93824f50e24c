"""PowerEMA on a model sharded with FSDP2 ``fully_shard`` (2 gloo ranks on CPU): each rank keeps the
EMA of its own shards, snapshots are DCP folders, and ``ckptavg merge --method power-ema`` over them
equals the reconstruction from whole-model snapshots of the same run; the merged DCP output loads
with ``dcp.load`` into the sharded model. Plus the DCP snapshot format in one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptavg
from ckptavg import PowerEMA
from ckptavg.errors import CheckpointReadError

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_fsdp_ema_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_on_two_ranks(worker: Path, out: Path) -> None:
    """``torchrun --nproc-per-node 2 WORKER OUT`` (gloo on CPU), which must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0", str(worker), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, text[-3000:]


def test_sharded_power_ema_equals_whole_model_snapshots(tmp_path: Path) -> None:
    _run_on_two_ranks(WORKER, tmp_path)
    # each rank kept only its shard: the EMA is a DTensor whose local part has the parameter's local shape
    facts = json.loads((tmp_path / "facts.json").read_text())
    for name, (kind, ema_local, param_local) in facts.items():
        assert kind == "DTensor" and ema_local == param_local, name
    assert facts["2.weight"][1] == [8, 16]  # half of (16, 16) on each of the 2 ranks
    snaps = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert snaps == [f"ema-{s}-{t:08d}" for s in ("0.050", "0.100") for t in (8, 16, 24)]  # no leftovers
    sharded, whole = load_file(tmp_path / "sharded.safetensors"), load_file(tmp_path / "whole.safetensors")
    assert sharded.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(sharded[k], whole[k], rtol=1e-6, atol=1e-7)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    for k in sharded:
        assert torch.equal(loaded[k], sharded[k]), k


def test_dcp_snapshots_in_one_process_read_as_profiles(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = PowerEMA(model, sigma_rels=(0.05, 0.10))
    twin = PowerEMA(model, sigma_rels=(0.05, 0.10))
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.add_(torch.randn(3, 4) * 0.1)
        ema.update(step)
        twin.update(step)
        if step % 3 == 0:
            ema.save_snapshots(tmp_path / "dcp", format="dcp")
            twin.save_snapshots(tmp_path / "st")
    assert not [p for p in (tmp_path / "dcp").iterdir() if p.name.startswith(".")]
    infos = {Path(c.path).name: (c.step, c.sigma_rel) for c in ckptavg.inspect([tmp_path / "dcp"]).checkpoints}
    assert infos["ema-0.100-00000006"] == (6, 0.1)
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    ckptavg.merge([tmp_path / "dcp"], a, method="power-ema", sigma_rel=0.07)
    ckptavg.merge([tmp_path / "st"], b, method="power-ema", sigma_rel=0.07)
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("value", [float("nan"), -0.1, 0.5])
def test_a_dcp_snapshot_with_a_bad_profile_is_an_error_naming_it(tmp_path: Path, value: float) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "snap-00000010"
    dcp.save({"w": torch.ones(2), "step": 10, "sigma_rel": value}, checkpoint_id=str(folder))
    with pytest.raises(CheckpointReadError, match=r"snap-00000010.*sigma_rel"):
        ckptavg.merge([folder], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- Lightning's sharded strategies

LIGHTNING_WORKER = Path(__file__).with_name("_lightning_mp_worker.py")


def _single(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    ckptavg.merge([folder], out, progress=False)  # one DCP snapshot as a whole-model file
    return load_file(out)


def test_lightning_model_parallel_callback_keeps_shards_and_resumes_exactly(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    _run_on_two_ranks(LIGHTNING_WORKER, tmp_path)
    a, b, whole = tmp_path / "a", tmp_path / "b", tmp_path / "whole"
    # every rank wrote its part of each snapshot (a DCP folder), nothing gathered
    for s in ("0.050", "0.100"):
        for t in (4, 8):
            snap = a / f"ema-{s}-{t:08d}"
            assert sorted(p.name for p in snap.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
            got = _single(snap, tmp_path / "got.safetensors")
            want = load_file(whole / f"ema-{s}-{t:08d}.safetensors")
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
        # resumed from the step-4 Lightning checkpoint: the EMAs continue exactly
        resumed = _single(b / f"ema-{s}-00000008", tmp_path / "resumed.safetensors")
        straight = _single(a / f"ema-{s}-00000008", tmp_path / "straight.safetensors")
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # the reconstruction from the sharded snapshots equals the one from the whole-model reference
    ckptavg.merge([a], tmp_path / "ra.safetensors", method="power-ema", sigma_rel=0.07)
    ckptavg.merge([whole], tmp_path / "rw.safetensors", method="power-ema", sigma_rel=0.07)
    ra, rw = load_file(tmp_path / "ra.safetensors"), load_file(tmp_path / "rw.safetensors")
    for k in rw:
        torch.testing.assert_close(ra[k], rw[k], rtol=1e-6, atol=1e-7)


def test_lightning_callback_refuses_flat_parameter_strategies_and_a_missing_sharded_state(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from ckptavg.errors import OptionError
    from ckptavg.lightning_callback import PowerEMACallback

    model = torch.nn.Linear(3, 2)
    for strategy in (FSDPStrategy, DeepSpeedStrategy):
        fake = SimpleNamespace(strategy=object.__new__(strategy), is_global_zero=True, default_root_dir=tmp_path)
        with pytest.raises(OptionError, match=f"{strategy.__name__}.*ModelParallelStrategy"):
            PowerEMACallback().on_fit_start(fake, model)
    with pytest.raises(OptionError, match="format='dcp' is for sharded models"):
        PowerEMACallback(format="dcp").on_fit_start(SimpleNamespace(strategy=None, is_global_zero=True,
                                                                    default_root_dir=tmp_path), model)
    cb = PowerEMACallback(dirpath=tmp_path)
    cb.on_fit_start(SimpleNamespace(strategy=None, is_global_zero=True, default_root_dir=tmp_path), model)
    state = {"step": 4, "gammas": list(cb.ema.gammas), "sharded_state": str(tmp_path / "gone"), "last_saved_step": 4}
    with pytest.raises(OptionError, match="is sharded; this run's model is not"):
        cb.load_state_dict(state)
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # a sharded model (DTensor parameters on a mesh of one) whose checkpoint names a state that is gone
        fully_shard(model)
        for fmt, match in (("safetensors", "would gather them"), (None, "gone: the sharded EMA state .* missing")):
            cb = PowerEMACallback(dirpath=tmp_path, format=fmt)
            cb.load_state_dict(state)
            with pytest.raises(OptionError, match=match):
                cb.on_fit_start(SimpleNamespace(strategy=None, is_global_zero=True, default_root_dir=tmp_path), model)
    finally:
        dist.destroy_process_group()

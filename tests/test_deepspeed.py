"""DeepSpeed ZeRO checkpoint folders (ckptavg.io.deepspeed_in), against checkpoints DeepSpeed itself writes
(a 2-rank gloo run on its CPU accelerator, tests/_deepspeed_worker.py) and DeepSpeed's own consolidation
(``get_fp32_state_dict_from_zero_checkpoint``, run in the worker). The test process never imports deepspeed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptavg.errors import CheckpointReadError, UnsafePickleError
from ckptavg.io import open_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

WORKER = Path(__file__).with_name("_deepspeed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory) -> Path:
    """``z1/``, ``z2/``, ``z3/``: DeepSpeed roots with global_step1..3 (ZeRO stages 1-3) and reference.pt."""
    out = tmp_path_factory.mktemp("deepspeed")
    port = _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), "1", "2", "3"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env))
    try:
        logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    return out


def _reference_mean(root: Path, tags: list[str]) -> dict[str, torch.Tensor]:
    ref = torch.load(root / "reference.pt", weights_only=True)
    return {k: sum(ref[t][k].double() for t in tags) / len(tags) for k in ref[tags[0]]}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_checkpoint_equals_zero_to_fp32(ds_run, stage):
    root = ds_run / f"z{stage}"
    ref = torch.load(root / "reference.pt", weights_only=True)
    for tag, sd in ref.items():
        with open_checkpoint(root / tag) as ckpt:
            assert ckpt.format == "deepspeed" and ckpt.meta.step == int(tag.removeprefix("global_step"))
            # (under stage 1 DeepSpeed saves no frozen parameter: its own consolidation has no net.3.bias either)
            assert ("net.3.bias" in sd) == (stage != 1)
            assert list(ckpt.tensors) == [f"net.{k}" for k in ["0.weight", "0.bias", "1.weight", "1.bias",
                                                               "1.running_mean", "1.running_var",
                                                               "1.num_batches_tracked", "3.weight", "3.bias"]
                                          if f"net.{k}" in sd] + ["skip.weight"]
            assert ckpt.tensors["skip.weight"].alias_key == ckpt.tensors["net.0.weight"].alias_key
            for k, v in sd.items():
                assert torch.equal(ckpt.tensors[k].materialize(), v), (tag, k)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_merge_root_last_2_equals_mean_of_zero_to_fp32(ds_run, tmp_path, run_cli, stage):
    root = ds_run / f"z{stage}"
    out = tmp_path / "avg.safetensors"
    code, _o, text = run_cli("merge", root, "--last", "2", "-o", out)
    assert code == 0, text
    got = load_file(out)
    want = _reference_mean(root, ["global_step2", "global_step3"])
    assert set(got) == set(want)
    for k, v in want.items():
        if k != "net.1.num_batches_tracked":
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-7)
    ref = torch.load(root / "reference.pt", weights_only=True)
    assert torch.equal(got["net.1.num_batches_tracked"], ref["global_step3"]["net.1.num_batches_tracked"])


def test_missing_optim_states_is_one_line_naming_the_folder(ds_run, tmp_path, run_cli):
    root = tmp_path / "z2"
    shutil.copytree(ds_run / "z2", root)
    (root / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "avg.safetensors"
    code, _o, text = run_cli("merge", root, "-o", out)
    assert code != 0 and not out.exists()
    line = text.strip()
    assert "\n" not in line and f"{root / 'global_step2'}: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" \
        in line, text
    for f in (root / "global_step3").glob("*_optim_states.pt"):
        f.unlink()
    with pytest.raises(CheckpointReadError, match="global_step3: no zero_pp_rank"):
        open_checkpoint(root / "global_step3")


class NotAllowed:
    pass


def test_unsafe_pickle_refused_and_latest_checked(ds_run, tmp_path, run_cli):
    root = tmp_path / "z3"
    shutil.copytree(ds_run / "z3", root)
    bad = root / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": NotAllowed()}}, bad)
    with pytest.raises(UnsafePickleError, match=f"{bad}: refusing to load.*NotAllowed"):
        open_checkpoint(root / "global_step1")
    (root / "latest").write_text("global_step9")
    code, _o, text = run_cli("merge", root, "-o", tmp_path / "avg.safetensors")
    assert code != 0 and "'latest' names 'global_step9'" in text, text


@pytest.mark.parametrize("stage", [2, 3])
def test_param_shapes_larger_than_the_partitions_refused_before_reading(ds_run, tmp_path, stage):
    folder = tmp_path / "global_step1"
    shutil.copytree(ds_run / f"z{stage}" / "global_step1", folder)
    states = folder / ("mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt")
    obj = torch.load(states, weights_only=True)
    obj["param_shapes"][0]["net.3.weight"] = torch.Size([30, 5])
    torch.save(obj, states)
    with pytest.raises(CheckpointReadError, match="hold .* elements.*damaged or mismatched"):
        open_checkpoint(folder)


def test_trainer_run_of_deepspeed_checkpoint_folders(ds_run, tmp_path, run_cli):
    """A Hugging Face Trainer under ZeRO-3 without gathered weights: out/checkpoint-N/ holds global_stepN/,
    latest and trainer_state.json; each is one checkpoint (metrics from the trainer state)."""
    run = tmp_path / "out"
    for n, loss in ((2, 0.5), (3, 0.25)):
        ck = run / f"checkpoint-{n}"
        shutil.copytree(ds_run / "z3" / f"global_step{n}", ck / f"global_step{n}")
        (ck / "latest").write_text(f"global_step{n}")
        (ck / "trainer_state.json").write_text(
            f'{{"global_step": {n}, "epoch": 1.0, "log_history": [{{"eval_loss": {loss}, "step": {n}}}]}}')
    with open_checkpoint(run / "checkpoint-3") as ckpt:
        assert ckpt.format == "deepspeed" and ckpt.meta.step == 3 and ckpt.meta.metrics["eval_loss"] == 0.25
    code, plan, text = run_cli("merge", run / "checkpoint-3", "-o", tmp_path / "one.safetensors", "--dry-run")
    assert code == 0 and "final model" not in plan + text and "checkpoint-3/global_step3" in plan, plan + text
    out = tmp_path / "avg.safetensors"
    code, _o, text = run_cli("merge", run, "-o", out)
    assert code == 0, text
    got, want = load_file(out), _reference_mean(ds_run / "z3", ["global_step2", "global_step3"])
    torch.testing.assert_close(got["net.0.weight"].double(), want["net.0.weight"], rtol=0, atol=1e-7)


def test_reading_imports_no_deepspeed(ds_run):
    code = ("import sys; from ckptavg.io import open_checkpoint\n"
            f"c = open_checkpoint({str(ds_run / 'z3' / 'global_step3')!r}); c.tensors['net.0.weight'].materialize()\n"
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

"""Sharded training checkpoint folders (issue 21, item 3): accelerate's FSDP ``checkpoint-N/`` folders and
Lightning's sharded ``epoch=E-step=S.ckpt/`` folders are checkpoints in every command; where a folder holds
several models, the plan says which one is averaged and how to pick another."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import ckptavg

from .conftest import fp64_mean, make_state_dicts

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _accelerate_fsdp_run(root, steps=(100, 1000, 200)):
    """Folders laid out as accelerate's ``save_state`` writes them under FSDP with SHARDED_STATE_DICT: its
    ``save_fsdp_model`` calls ``dcp.save({"model": state_dict})`` into ``pytorch_model_fsdp_K/`` (one per model),
    its ``save_fsdp_optimizer`` into ``optimizer_K/``; plus the scheduler and RNG files."""
    models = {}
    for i, step in enumerate(steps):
        a, b = make_state_dicts(2, seed=10 + i)
        ck = root / f"checkpoint-{step}"
        dcp.save({"model": a}, checkpoint_id=str(ck / "pytorch_model_fsdp_0"))
        dcp.save({"model": b}, checkpoint_id=str(ck / "pytorch_model_fsdp_1"))
        dcp.save({"optimizer": {"state": {"fc.weight": {"exp_avg": torch.ones(10, 8)}}}},
                 checkpoint_id=str(ck / "optimizer_0"))
        torch.save({"last_epoch": 1}, ck / "scheduler.bin")
        models[step] = (a, b)
    return models


def test_accelerate_fsdp_checkpoint_folders(tmp_path, run_cli):
    models = _accelerate_fsdp_run(tmp_path / "out")
    out = tmp_path / "avg.safetensors"
    code, stdout, err = run_cli("merge", tmp_path / "out", "--last", "2", "-o", out, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [(i["step"], i["path"].split("/")[-2:]) for i in doc["inputs"]] == [
        (200, ["checkpoint-200", "pytorch_model_fsdp_0"]), (1000, ["checkpoint-1000", "pytorch_model_fsdp_0"])]
    assert any("2 models" in n and "pytorch_model_fsdp_1" in n for n in doc["notes"])
    got = load_file(str(out))
    assert set(got) == set(models[100][0])  # the model's names, without the "model." of the DCP entry
    for k in ("conv.weight", "fc.bias"):
        torch.testing.assert_close(got[k].double(), fp64_mean([models[s][0][k] for s in (200, 1000)]),
                                   rtol=1e-6, atol=1e-7)
    # the other model: named sub-folders, the step still from checkpoint-N
    p = ckptavg.plan(str(tmp_path / "out" / "checkpoint-*" / "pytorch_model_fsdp_1"), last=2)
    assert [i.step for i in p.inputs] == [200, 1000]
    avg1 = ckptavg.average(str(tmp_path / "out" / "checkpoint-*" / "pytorch_model_fsdp_1"), last=2)
    torch.testing.assert_close(avg1["fc.weight"].double(), fp64_mean([models[s][1]["fc.weight"] for s in (200, 1000)]),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model_key", ["model", "state_dict"])
def test_lightning_sharded_ckpt_folders(tmp_path, run_cli, model_key):
    """Lightning's FSDPStrategy (``model``) and ModelParallelStrategy (``state_dict``) with sharded state dicts save
    a folder named like the .ckpt file: the model and ``optimizer_K`` entries through Lightning's own
    ``_distributed_checkpoint_save``, everything else (epoch, global_step, loops...) in ``meta.pt``."""
    pytest.importorskip("lightning")
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    sds = make_state_dicts(3, seed=3)
    for i, sd in enumerate(sds):
        folder = tmp_path / "ckpts" / f"epoch={i}-step={(i + 1) * 50}.ckpt"
        converted = {model_key: sd, "optimizer_0": {"state": {"fc.weight": {"exp_avg": torch.zeros(10, 8)}}}}
        _distributed_checkpoint_save(converted, folder)
        # meta.pt records the global step (as Lightning does, from the trainer); a different one than the name's
        # shows it is read
        torch.save({"epoch": i, "global_step": (i + 1) * 50 + 1, "pytorch-lightning_version": "2.6.0",
                    "loops": {}, "callbacks": {}}, folder / "meta.pt")
    out = tmp_path / "avg.safetensors"
    code, stdout, err = run_cli("merge", tmp_path / "ckpts", "--last", "2", "-o", out, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [(i["epoch"], i["step"], i["weights_key"]) for i in doc["inputs"]] == [(1, 101, model_key),
                                                                                  (2, 151, model_key)]
    got = load_file(str(out))
    assert set(got) == set(sds[0])
    torch.testing.assert_close(got["conv.weight"].double(), fp64_mean([sd["conv.weight"] for sd in sds[1:]]),
                               rtol=1e-6, atol=1e-7)


def test_accelerate_save_state_with_two_models(tmp_path, run_cli):
    """accelerate's own save_state with two prepared models writes model.safetensors and model_1.safetensors: the
    first is averaged, the plan says so; naming model_1.safetensors averages the other, ordered by the save counter
    (checkpoint_N), never by the model index."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    a, b = acc.prepare(torch.nn.Linear(3, 4), torch.nn.Linear(5, 2))
    saved = []
    for n in (0, 1, 2, 10):
        with torch.no_grad():
            for p in (*a.parameters(), *b.parameters()):
                p.add_(torch.randn_like(p))
        acc.save_state(str(tmp_path / "run" / "checkpoints" / f"checkpoint_{n}"))
        saved.append(tuple({k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)))
    code, stdout, err = run_cli("merge", tmp_path / "run" / "checkpoints", "--last", "2", "-o", tmp_path / "a.pt",
                                "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [i["path"].rsplit("/", 1)[-1] for i in doc["inputs"]] == ["checkpoint_2", "checkpoint_10"]
    assert any("2 models" in n and "model_1.safetensors" in n for n in doc["notes"])
    got = torch.load(tmp_path / "a.pt")
    torch.testing.assert_close(got["weight"].double(), fp64_mean([s[0]["weight"] for s in saved[2:]]),
                               rtol=1e-6, atol=1e-7)
    other = ckptavg.average(str(tmp_path / "run" / "checkpoints" / "checkpoint_*" / "model_1.safetensors"), last=2)
    torch.testing.assert_close(other["weight"].double(), fp64_mean([s[1]["weight"] for s in saved[2:]]),
                               rtol=1e-6, atol=1e-7)

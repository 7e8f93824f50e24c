"""Megatron/NeMo ``torch_dist`` checkpoints (issue 21, item 1), written by megatron-core itself
under torchrun on CPU: read without --trust-pickle (torch's own DCP planner classes in the restricted
unpickler), the iteration from ``common.pt``, tensor-parallel shards and replicated tensors averaged
equal to a float64 average computed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckptavg

pytest.importorskip("megatron.core")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory):
    from .test_distributed import torchrun

    root = tmp_path_factory.mktemp("megatron") / "run"
    root.mkdir()
    code, text = torchrun(2, str(HERE / "_megatron_worker.py"), str(root), "100", "200", "300", cwd=root.parent)
    assert code == 0, text
    return root


def test_torch_dist_root_is_a_folder_of_checkpoints_read_safely(megatron_run, run_cli):
    p = ckptavg.plan(megatron_run / "iter_*", last=2)  # the root's marker and refs are not checkpoints here
    assert [(i.path.name, i.step) for i in p.inputs] == [("iter_0000200", 200), ("iter_0000300", 300)]
    code, out, err = run_cli("inspect", megatron_run / "iter_0000100", "--json")
    assert code == 0, err
    row = json.loads(out)["checkpoints"][0]
    assert row["step"] == 100 and row["step_from"] == "recorded"  # from common.pt, not the folder name
    refs = [torch.load(megatron_run / f"ref_{i}.pt") for i in (200, 300)]
    out_sd = ckptavg.average(megatron_run / "iter_*", last=2)
    for name, key in (("decoder.weight", "w"), ("decoder.bias", "b"), ("decoder.layers.weight", "layers")):
        ref = (refs[0][key].double() + refs[1][key].double()) / 2
        torch.testing.assert_close(out_sd[name].double(), ref, rtol=4e-6, atol=2e-6)
    assert "decoder._extra_state" not in out_sd  # byte entries are not averaged


def test_a_truncated_distcp_is_one_line_naming_the_folder(megatron_run, tmp_path, run_cli):
    bad = tmp_path / "iter_0000400"
    shutil.copytree(megatron_run / "iter_0000300", bad)
    data = sorted(bad.glob("__*.distcp"), key=lambda q: q.stat().st_size)[-1]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, _o, err = run_cli("merge", megatron_run / "iter_0000300", bad, "-o", tmp_path / "avg.safetensors")
    assert code == 1 and str(bad) in err and err.count("\n") == 1
    assert not (tmp_path / "avg.safetensors").exists()

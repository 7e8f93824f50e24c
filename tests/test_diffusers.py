"""diffusers component folders (``unet/``, ``unet_ema/`` as ``save_pretrained`` writes them, single
file or sharded) are one checkpoint each; a training run's ``checkpoint-N/unet/`` folders are a
folder of checkpoints ordered by N; the folder output keeps diffusers' file names and config so
that ``UNet2DModel.from_pretrained`` loads the average."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import fp64_mean

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

STEPS = (100, 1000, 200)  # lexicographic order (100, 1000, 200) differs from the numeric one


def _unet(seed: int):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def _weights(folder) -> dict[str, torch.Tensor]:
    """A component folder's tensors, read with safetensors alone (every shard)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A diffusers training output folder: ``checkpoint-N/`` with ``unet/`` (step 1000's sharded),
    ``unet_ema/`` and optimizer state, beside the final pipeline's ``unet/`` and ``model_index.json``."""
    root = tmp_path_factory.mktemp("diffusers") / "run"
    for i, step in enumerate(STEPS):
        ck = root / f"checkpoint-{step}"
        _unet(i).save_pretrained(ck / "unet", max_shard_size="20KB" if step == 1000 else "10GB")
        _unet(10 + i).save_pretrained(ck / "unet_ema")
        (ck / "optimizer.bin").write_bytes(b"not a model")
    _unet(99).save_pretrained(root / "unet")
    (root / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    assert len(list((root / "checkpoint-1000" / "unet").glob("*.safetensors"))) > 1
    return root


def _assert_loads_as_average(out, inputs):
    model = diffusers.UNet2DModel.from_pretrained(out)
    ref = {k: fp64_mean([_weights(f)[k] for f in inputs]) for k in _weights(inputs[0])}
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=4e-6, atol=2e-6)


def test_training_run_last_two_averages_unet_and_loads(run, tmp_path, run_cli):
    out = tmp_path / "avg_unet"
    code, _, err = run_cli("merge", run, "--last", "2", "-o", f"{out}/", "--shard-size", "50KB")
    assert code == 0, err
    assert "averaging the unet/ component" in err and "unet_ema" in err  # the plan says which, and how else
    names = sorted(q.name for q in out.iterdir())
    assert "config.json" in names and "diffusion_pytorch_model.safetensors.index.json" in names
    assert all(n.startswith("diffusion_pytorch_model") or n == "config.json" for n in names)
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    inputs = json.loads(index["metadata"]["ckptavg_inputs"])  # provenance: the inputs, in step order
    assert [(i["file"], i["step"]) for i in inputs] == [(str(run / f"checkpoint-{s}" / "unet"), s) for s in (200, 1000)]
    _assert_loads_as_average(out, [run / "checkpoint-200" / "unet", run / "checkpoint-1000" / "unet"])


def test_named_ema_components_single_file_output(run, tmp_path, run_cli):
    comps = sorted(str(q) for q in run.glob("checkpoint-*/unet_ema"))  # the shell's (lexicographic) order
    out = tmp_path / "avg_ema"
    code, _, err = run_cli("merge", *comps, "--last", "2", "-o", out)
    assert code == 0, err
    assert sorted(q.name for q in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    _assert_loads_as_average(out, [run / "checkpoint-200" / "unet_ema", run / "checkpoint-1000" / "unet_ema"])
    # the output is an earlier ckptavg output: a second run replaces it
    code, _, err = run_cli("merge", *comps, "-o", out)
    assert code == 0, err
    _assert_loads_as_average(out, [run / f"checkpoint-{s}" / "unet_ema" for s in STEPS])


def test_inspect_lists_components_in_step_order(run, run_cli):
    code, out, err = run_cli("inspect", run)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line[:1].isdigit()]  # the table's rows
    assert rows and all(r.split()[2].startswith("diffusers") for r in rows)
    assert [r.split()[1].split("/")[-2] for r in rows] == ["checkpoint-100", "checkpoint-200", "checkpoint-1000"]
    assert all(r.split()[1].endswith("/unet") for r in rows)
    code, out, err = run_cli("inspect", run / "checkpoint-1000" / "unet")
    assert code == 0 and "shards" in out, err


def test_missing_shard_is_one_line_error(run, tmp_path, run_cli):
    broken = tmp_path / "broken" / "unet"
    shutil.copytree(run / "checkpoint-1000" / "unet", broken)
    index = json.loads((broken / "diffusion_pytorch_model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (broken / gone).unlink()
    out = tmp_path / "out"
    code, _, err = run_cli("merge", run / "checkpoint-100" / "unet", broken, "-o", f"{out}/")
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(broken) in lines[0] and f"shard {gone!r} is missing" in lines[0], err
    assert not out.exists()


def test_several_trained_components_are_not_mixed(run, tmp_path, run_cli):
    amb = tmp_path / "amb"
    for step in (1, 2):
        shutil.copytree(run / "checkpoint-100" / "unet", amb / f"checkpoint-{step}" / "unet")
        shutil.copytree(run / "checkpoint-200" / "unet", amb / f"checkpoint-{step}" / "controlnet")
    code, _, err = run_cli("merge", amb, "-o", tmp_path / "x.safetensors")
    assert code != 0 and "controlnet" in err and "unet" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_watch_takes_named_components_only(run, tmp_path, run_cli):
    out = tmp_path / "w"
    code, _, err = run_cli("watch", run, "-o", f"{out}/", "--once", "--settle", "0")
    assert code == 0 and "watch the component by name" in err and not out.exists(), err  # never the final unet/
    code, _, err = run_cli("watch", str(run / "checkpoint-*" / "unet"), "-o", f"{out}/", "--once", "--settle", "0",
                           "--last", "2")
    assert code == 0, err
    ref = [_weights(run / f"checkpoint-{s}" / "unet") for s in (200, 1000)]
    got = _weights(out)
    assert set(got) == set(ref[0])
    for k, v in got.items():
        torch.testing.assert_close(v.double(), fp64_mean([r[k] for r in ref]), rtol=4e-6, atol=2e-6)

"""Ordering and selection on realistic file names and recorded metadata."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.order import parse_range


def _sd(v: float):
    return {"w": torch.full((4,), float(v)), "n": torch.tensor(int(v))}


def _lightning_run(folder, epochs, steps_per_epoch=100, metric=None):
    folder.mkdir(exist_ok=True)
    for e in epochs:
        step = (e + 1) * steps_per_epoch
        ck = {"epoch": e, "global_step": step, "state_dict": {f"model.{k}": v for k, v in _sd(e).items()},
              "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": [],
              "callbacks": {}, "hyper_parameters": {"lr": 0.1}}
        if metric:
            ck["metrics"] = {metric: torch.tensor(metric_value(e))}
        torch.save(ck, folder / f"epoch={e}-step={step}.ckpt")
    return folder


def metric_value(e: int) -> float:
    return [0.5, 0.9, 0.7, 0.95, 0.6, 0.8, 0.85, 0.1][e % 8]


def test_order_by_recorded_step_not_file_name(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # file names that sort wrongly as strings; recorded steps give the truth
    for name, step in [("ckpt_b.pt", 300), ("ckpt_a.pt", 100), ("ckpt_c.pt", 200)]:
        torch.save({"step": step, "model": _sd(step)}, run / name)
    p = ckptavg.plan(run)
    assert [i.step for i in p.inputs] == [100, 200, 300]
    assert "step (recorded)" in p.order_rule
    assert p.inputs[0].weights_key == "model"


def test_natural_sort_of_file_names(tmp_path):
    for i in (1, 2, 10, 11, 3):
        torch.save(_sd(i), tmp_path / f"checkpoint{i}.pt")
    p = ckptavg.plan(tmp_path)
    assert [i.path.name for i in p.inputs] == [f"checkpoint{i}.pt" for i in (1, 2, 3, 10, 11)]
    # fairseq-style names give the epoch
    assert [i.epoch for i in p.inputs] == [1, 2, 3, 10, 11]
    p2 = ckptavg.plan(tmp_path, epochs="3:10")
    assert [i.epoch for i in p2.inputs] == [3, 10]


def test_hf_style_numbered_safetensors_and_metadata(tmp_path):
    for step in (120, 40, 80, 1000):
        save_file(_sd(step), str(tmp_path / f"model_{step:06d}.safetensors"))
    p = ckptavg.plan(tmp_path)
    assert [i.path.name for i in p.inputs] == [
        "model_000040.safetensors", "model_000080.safetensors", "model_000120.safetensors",
        "model_001000.safetensors"]
    # metadata step wins over the file name
    d = tmp_path / "meta"
    d.mkdir()
    for name, step in (("a.safetensors", 30), ("b.safetensors", 10), ("c.safetensors", 20)):
        save_file(_sd(step), str(d / name), metadata={"step": str(step), "epoch": str(step // 10)})
    p = ckptavg.plan(d, steps="15:")
    assert [i.step for i in p.inputs] == [20, 30]
    assert [i.epoch for i in p.inputs] == [2, 3]


def test_order_given_keeps_command_line_order(tmp_path):
    paths = []
    for i in (3, 1, 2):
        paths.append(tmp_path / f"e{i}.pt")
        torch.save({"epoch": i, "state_dict": _sd(i)}, paths[-1])
    assert [i.epoch for i in ckptavg.plan(paths).inputs] == [1, 2, 3]
    p = ckptavg.plan(paths, order="given")
    assert [i.epoch for i in p.inputs] == [3, 1, 2]
    assert p.order_rule == "as given"


def test_lightning_epochs_range_inclusive_and_open(tmp_path):
    run = _lightning_run(tmp_path / "run", range(25))
    p = ckptavg.plan(run, epochs="12:20")
    assert [i.epoch for i in p.inputs] == list(range(12, 21))
    assert ckptavg.plan(run, epochs="22:").inputs[0].epoch == 22
    assert [i.epoch for i in ckptavg.plan(run, epochs=":1").inputs] == [0, 1]
    assert [i.epoch for i in ckptavg.plan(run, epochs=(5, 6)).inputs] == [5, 6]
    assert [i.step for i in ckptavg.plan(run, steps="2000:2200").inputs] == [2000, 2100, 2200]
    sd = ckptavg.average(run, epochs="12:20", strip_prefix="model.")
    assert torch.allclose(sd["w"], torch.full((4,), 16.0))
    assert int(sd["n"]) == 20  # integer tensor from the last selected checkpoint


def test_last_every_and_combinations(tmp_path):
    run = _lightning_run(tmp_path / "run", range(10))
    assert [i.epoch for i in ckptavg.plan(run, last=3).inputs] == [7, 8, 9]
    assert [i.epoch for i in ckptavg.plan(run, every=3).inputs] == [0, 3, 6, 9]
    assert [i.epoch for i in ckptavg.plan(run, epochs="2:8", every=2).inputs] == [2, 4, 6, 8]
    assert [i.epoch for i in ckptavg.plan(run, epochs=":8", last=4, every=2).inputs] == [6, 8]


def test_best_by_metric(tmp_path):
    run = _lightning_run(tmp_path / "run", range(8), metric="val_acc")
    p = ckptavg.plan(run, best=3, metric="val_acc")
    # val_acc by epoch: .5 .9 .7 .95 .6 .8 .85 .1 -> best three are epochs 1, 3, 6 (kept in order)
    assert [i.epoch for i in p.inputs] == [1, 3, 6]
    low = ckptavg.plan(run, best=2, metric="val_acc", lower_is_better=True)
    assert [i.epoch for i in low.inputs] == [0, 7]
    assert [i.epoch for i in ckptavg.plan(run, last=4, best=2, metric="val_acc").inputs] == [5, 6]


def test_best_top_level_metric(tmp_path):
    for e, loss in enumerate([0.9, 0.3, 0.5, 0.2]):
        torch.save({"epoch": e, "val_loss": loss, "model": _sd(e)}, tmp_path / f"ep{e}.pt")
    p = ckptavg.plan(tmp_path, best=2, metric="val_loss", lower_is_better=True)
    assert [i.epoch for i in p.inputs] == [1, 3]


def test_selection_errors_say_what_is_available(tmp_path):
    run = _lightning_run(tmp_path / "run", range(5), metric="val_acc")
    with pytest.raises(ckptavg.CkptavgError, match=r"--epochs 30:40 matches no checkpoint \(available epochs: 0, 1, 2"):
        ckptavg.plan(run, epochs="30:40")
    with pytest.raises(ckptavg.CkptavgError, match="has no scalar 'bleu'.*metrics found: val_acc"):
        ckptavg.plan(run, best=2, metric="bleu")
    with pytest.raises(ckptavg.CkptavgError, match="--best needs --metric"):
        ckptavg.plan(run, best=2)
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save(_sd(1), plain / "a.pt")
    torch.save(_sd(2), plain / "b.pt")
    with pytest.raises(ckptavg.CkptavgError, match="records no epoch"):
        ckptavg.plan(plain, epochs="1:2")
    with pytest.raises(ckptavg.CkptavgError, match="records no step"):
        ckptavg.plan(plain, method="ema", decay_per_step=0.99)


def test_folder_skips_alias_files(tmp_path):
    run = _lightning_run(tmp_path / "run", range(3))
    torch.save(torch.load(run / "epoch=2-step=300.ckpt", weights_only=True), run / "last.ckpt")
    p = ckptavg.plan(run)
    assert len(p.inputs) == 3
    assert any("last.ckpt" in n for n in p.notes)
    # named explicitly, it is used
    p2 = ckptavg.plan([run / "epoch=0-step=100.ckpt", run / "last.ckpt"])
    assert {i.path.name for i in p2.inputs} == {"epoch=0-step=100.ckpt", "last.ckpt"}


def test_parse_range():
    assert parse_range("12:20") == (12, 20)
    assert parse_range("150:") == (150, None)
    assert parse_range(":7") == (None, 7)
    assert parse_range("5") == (5, 5)
    assert parse_range(range(3, 6)) == (3, 5)
    for bad in ("a:b", "5:2", "1:2:3"):
        with pytest.raises(ckptavg.CkptavgError):
            parse_range(bad)

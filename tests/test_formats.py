"""Lightning, timm and fairseq checkpoints in; --keep-structure out.

Lightning files are written by a real ``Trainer`` with ``ModelCheckpoint``; the loaders
that must accept a ``--keep-structure`` output are the real ``load_from_checkpoint`` and
``Trainer.fit(ckpt_path=...)``. timm and fairseq are not installed here: their files are
hand-built in the layouts their savers write (timm's ``CheckpointSaver``, fairseq's
``Trainer.state_dict``), and their loaders' key choices are reproduced in the tests.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ckptavg
from ckptavg.io import open_checkpoint

from .conftest import SmallNet, assert_close32, fp64_mean, make_state_dicts

L = pytest.importorskip("lightning")


# --------------------------------------------------------------------------------------
# Lightning: a real Trainer run


class TinyModule(L.LightningModule):
    """A small LightningModule with BatchNorm (integer buffer), optimizer and scheduler."""

    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}


class _Record(L.Callback):
    """Independent record of each epoch: the epoch, global step and val_loss Lightning saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen.append((trainer.current_epoch, trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(max_epochs: int, callbacks: list, root) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, enable_progress_bar=False, logger=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                     default_root_dir=str(root))


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory):
    """Five epochs of a real Lightning run, one ModelCheckpoint file per epoch."""
    root = tmp_path_factory.mktemp("lightning")
    L.seed_everything(0, verbose=False)
    rec = _Record()
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpts", save_top_k=-1, monitor="val_loss")
    _trainer(5, [ck, rec], root).fit(TinyModule(), _data(), _data())
    files = sorted((root / "ckpts").glob("*.ckpt"), key=lambda p: torch.load(p, weights_only=True)["epoch"])
    assert len(files) == 5
    return root / "ckpts", files, rec.seen


def _sd(path, key="state_dict"):
    return torch.load(path, weights_only=True)[key]


def test_lightning_files_ordered_and_selected_by_recorded_epoch(lightning_run, tmp_path):
    folder, files, seen = lightning_run
    # rename them so that the file names carry no epoch or step, in shuffled name order
    anon = tmp_path / "anon"
    anon.mkdir()
    for name, f in zip(["d", "b", "e", "a", "c"], files):
        shutil.copy(f, anon / f"{name}.ckpt")
    p = ckptavg.plan(anon)
    assert [(i.epoch, i.step) for i in p.inputs] == [(e, s) for e, s, _ in seen]
    assert p.order_rule == "by step (recorded)"
    p = ckptavg.plan(anon, epochs="2:3")
    assert [i.epoch for i in p.inputs] == [2, 3]
    assert all(i.weights_key == "state_dict" for i in p.inputs)
    # ModelCheckpoint's monitored value is each file's metric: --best uses it
    best2 = sorted(seen, key=lambda r: r[2])[:2]
    p = ckptavg.plan(anon, best=2, metric="val_loss", lower_is_better=True)
    assert [i.epoch for i in p.inputs] == sorted(e for e, _, _ in best2)
    for i in p.inputs:
        assert i.metrics["val_loss"] == pytest.approx(seen[i.epoch][2], rel=1e-6)


def test_lightning_keep_structure_loads_with_load_from_checkpoint(lightning_run, tmp_path, run_cli):
    folder, files, seen = lightning_run
    out = tmp_path / "swa.ckpt"
    code, _, err = run_cli("merge", folder, "-o", out, "--epochs", "2:", "--keep-structure")
    assert code == 0, err
    assert "dropped optimizer_states, lr_schedulers" in err
    sds = [_sd(f) for f in files[2:]]
    model = TinyModule.load_from_checkpoint(out)
    assert model.hparams.hidden == 8 and model.hparams.lr == 0.05
    got = model.state_dict()
    for k, v in sds[-1].items():
        if v.is_floating_point():
            assert_close32(got[k], fp64_mean([s[k] for s in sds]))
        else:
            assert torch.equal(got[k], v)  # num_batches_tracked: from the last checkpoint
    raw = torch.load(out, weights_only=True)
    last = torch.load(files[-1], weights_only=True)
    assert "optimizer_states" not in raw and "lr_schedulers" not in raw
    assert (raw["epoch"], raw["global_step"]) == (last["epoch"], last["global_step"])
    assert raw["hyper_parameters"] == last["hyper_parameters"] and raw["loops"] == last["loops"]
    # callbacks are the last checkpoint's, tensors copied byte for byte
    (cb_key,) = last["callbacks"]
    for k, v in last["callbacks"][cb_key].items():
        got_v = raw["callbacks"][cb_key][k]
        assert torch.equal(got_v, v) if isinstance(v, torch.Tensor) else got_v == v
    prov = raw["ckptavg"]
    assert [i["epoch"] for i in prov["inputs"]] == [2, 3, 4]
    assert prov["dropped"] == ["optimizer_states", "lr_schedulers"] and prov["averaged"] == ["state_dict"]
    assert list(raw["state_dict"]) == list(last["state_dict"])


def test_lightning_keep_optimizer_resumes_training(lightning_run, tmp_path):
    folder, files, _ = lightning_run
    out = tmp_path / "swa_opt.ckpt"
    rep = ckptavg.merge(files[-3:], out, keep_structure=True, keep_optimizer=True)
    assert rep.extra["dropped"] == []
    raw = torch.load(out, weights_only=True)
    last = torch.load(files[-1], weights_only=True)
    st, st_last = raw["optimizer_states"][0]["state"], last["optimizer_states"][0]["state"]
    assert st.keys() == st_last.keys()
    for k in st:
        assert torch.equal(st[k]["momentum_buffer"], st_last[k]["momentum_buffer"])
    assert raw["lr_schedulers"] == last["lr_schedulers"]
    # Lightning resumes from it: optimizer, scheduler, loops and callbacks all restore
    model = TinyModule()
    trainer = _trainer(last["epoch"] + 2, [], tmp_path)
    trainer.fit(model, _data(), _data(), ckpt_path=str(out))
    assert trainer.current_epoch == last["epoch"] + 2


def test_keep_structure_refusals(lightning_run, tmp_path, run_cli):
    folder, files, _ = lightning_run
    for args, needle in [
        (["-o", tmp_path / "x.safetensors", "--keep-structure"], "--keep-structure writes a torch checkpoint"),
        (["-o", tmp_path / "dir/", "--keep-structure"], "--keep-structure writes a torch checkpoint"),
        (["-o", tmp_path / "x.ckpt", "--keep-optimizer"], "--keep-optimizer only applies with --keep-structure"),
    ]:
        code, _, err = run_cli("merge", folder, *args)
        assert code == 2 and needle in err, err
    from safetensors.torch import save_file

    for i, sd in enumerate(make_state_dicts(2)):
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
    code, _, err = run_cli("merge", tmp_path / "m0.safetensors", tmp_path / "m1.safetensors", "-o",
                           tmp_path / "y.pt", "--keep-structure")
    assert code == 2 and "m1.safetensors: --keep-structure needs torch checkpoints" in err
    assert not (tmp_path / "y.pt").exists() and not (tmp_path / "x.ckpt").exists()


# --------------------------------------------------------------------------------------
# timm: CheckpointSaver's layout


def _timm_run(folder, n=5, metric=(0.61, 0.74, 0.70, 0.79, 0.77), prefixes=("module.",) * 5, ema=True):
    """Files as timm's CheckpointSaver writes them (``checkpoint-E.pth.tar``); weights
    under ``state_dict`` and the EMA under ``state_dict_ema``, with DDP/compile prefixes."""
    folder.mkdir()
    sds = make_state_dicts(n, seed=3)
    emas = make_state_dicts(n, seed=4)
    for e in range(n):
        pre = prefixes[e]
        model = SmallNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, 5, 5)).sum().backward()
        opt.step()
        ck = {"epoch": e, "arch": "smallnet", "state_dict": {pre + k: v for k, v in sds[e].items()},
              "optimizer": opt.state_dict(), "version": 2, "metric": metric[e],
              "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}
        if ema is True or (ema and e in ema):
            ck["state_dict_ema"] = {pre + k: v for k, v in emas[e].items()}
        torch.save(ck, folder / f"checkpoint-{e}.pth.tar")
    shutil.copy(folder / f"checkpoint-{n - 1}.pth.tar", folder / "last.pth.tar")
    shutil.copy(folder / "checkpoint-3.pth.tar", folder / "model_best.pth.tar")
    return sds, emas


def _timm_load(path, use_ema=True):
    """timm's load_state_dict: pick state_dict_ema (use_ema) or state_dict, strip 'module.'."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    key = "state_dict_ema" if use_ema and ck.get("state_dict_ema") is not None else "state_dict"
    return {(k[7:] if k.startswith("module.") else k): v for k, v in ck[key].items()}


def test_timm_ema_weights_best_by_metric_prefixes_stripped(tmp_path, run_cli):
    run = tmp_path / "timm"
    # two runs' worth of prefixes: DDP ("module.") and torch.compile ("_orig_mod.")
    sds, emas = _timm_run(run, prefixes=("module.", "_orig_mod.", "module.", "_orig_mod.", "module."))
    p = ckptavg.plan(run, key="state_dict_ema", strip_prefix=["module.", "_orig_mod."])
    assert [i.epoch for i in p.inputs] == [0, 1, 2, 3, 4]  # last.pth.tar / model_best.pth.tar skipped
    assert any("last.pth.tar" in n and "model_best.pth.tar" in n for n in p.notes)
    assert p.inputs[0].metrics["metric"] == 0.61
    out = tmp_path / "ema_best3.safetensors"
    code, _, err = run_cli("merge", run, "-o", out, "--key", "state_dict_ema", "--strip-prefix", "module.",
                           "--strip-prefix", "_orig_mod.", "--best", "3", "--metric", "metric")
    assert code == 0, err
    from safetensors.torch import load_file

    got = load_file(out)
    assert set(got) == set(emas[0])  # no prefixes left
    best = [1, 3, 4]  # metric .74, .79, .77
    for k in got:
        if got[k].is_floating_point():
            assert_close32(got[k], fp64_mean([emas[e][k] for e in best]))
    net = SmallNet()
    net.load_state_dict(got)  # strict
    # epochs recorded in the files select too
    assert [i.epoch for i in ckptavg.plan(run, epochs="3:", key="state_dict_ema",
                                          strip_prefix=["module.", "_orig_mod."]).inputs] == [3, 4]


def test_timm_keep_structure_averages_weights_and_ema(tmp_path):
    run = tmp_path / "timm"
    sds, emas = _timm_run(run)
    out = tmp_path / "avg.pth.tar"
    # strip_prefix only matches names across inputs: the output keeps the file's own names
    rep = ckptavg.merge(run, out, epochs="2:", keep_structure=True, strip_prefix="module.")
    assert rep.extra["averaged_weight_sets"] == ["state_dict", "state_dict_ema"]
    assert rep.extra["dropped"] == ["optimizer", "amp_scaler"]
    raw = torch.load(out, weights_only=True)
    last = torch.load(run / "checkpoint-4.pth.tar", weights_only=True)
    assert list(raw["state_dict"]) == list(last["state_dict"]) and next(iter(raw["state_dict"])) == "module.conv.weight"
    assert {k: raw[k] for k in ("epoch", "arch", "version", "metric")} == \
        {k: last[k] for k in ("epoch", "arch", "version", "metric")}
    assert "optimizer" not in raw and "amp_scaler" not in raw
    # timm's loader: EMA by default, the plain weights with use_ema=False; both are averages
    for use_ema, ref in ((True, emas), (False, sds)):
        sd = _timm_load(out, use_ema=use_ema)
        net = SmallNet()
        net.load_state_dict(sd)
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                assert_close32(v, fp64_mean([ref[e][k] for e in (2, 3, 4)]))
            else:
                assert torch.equal(v, ref[4][k])


def test_timm_keep_structure_removes_an_ema_it_cannot_average(tmp_path):
    run = tmp_path / "timm"
    sds, _ = _timm_run(run, ema={3, 4})  # model EMA switched on late: epoch 2 has none
    out = tmp_path / "avg.pth.tar"
    rep = ckptavg.merge(run, out, epochs="2:", keep_structure=True)
    assert "state_dict_ema" not in torch.load(out, weights_only=True)
    assert any("removed state_dict_ema" in n and "checkpoint-2.pth.tar" in n for n in rep.extra["output_notes"])
    assert "removed state_dict_ema" in rep.summary()
    sd = _timm_load(out)  # falls back to the averaged state_dict
    assert_close32(sd["fc.weight"], fp64_mean([sds[e]["fc.weight"] for e in (2, 3, 4)]))


# --------------------------------------------------------------------------------------
# fairseq: Trainer.state_dict's layout


def _fairseq_run(folder, epochs=(1, 2, 3, 4), ema=False):
    """``checkpointE.pt`` saved at the end of epoch E (the iterator then records E + 1),
    plus a mid-epoch ``checkpoint_5_1100.pt``, ``checkpoint_last.pt`` and ``checkpoint_best.pt``."""
    folder.mkdir()
    sds = make_state_dicts(len(epochs) + 1, seed=5)
    emas = make_state_dicts(len(epochs) + 1, seed=6)
    losses = [3.1, 2.5, 2.7, 2.2, 2.4]
    for i, e in enumerate(list(epochs) + [5]):
        mid = i == len(epochs)
        updates = 250 * e if not mid else 1100
        extra = {"train_iterator": {"version": 2, "epoch": e if mid else e + 1,
                                    "iterations_in_epoch": 100 if mid else 0, "shuffle": True},
                 "val_loss": losses[i], "best": min(losses[: i + 1]), "previous_training_time": 10.0 * e,
                 "metrics": {}}
        if ema:
            extra["ema"] = emas[i]
        ck = {"args": None, "cfg": {"common": {"fp16": False}, "model": {"_name": "smallnet"}},
              "model": sds[i], "criterion": {},
              "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                     "lr_scheduler_state": {"best": min(losses[: i + 1])},
                                     "num_updates": updates}],
              "task_state": {}, "extra_state": extra,
              "last_optimizer_state": {"state": {0: {"exp_avg": torch.randn(8, 3, 3, 3), "step": updates}},
                                       "param_groups": [{"lr": 5e-4, "params": [0]}]}}
        name = f"checkpoint_{e}_{updates}.pt" if mid else f"checkpoint{e}.pt"
        torch.save(ck, folder / name)
    shutil.copy(folder / "checkpoint_5_1100.pt", folder / "checkpoint_last.pt")
    shutil.copy(folder / "checkpoint4.pt", folder / "checkpoint_best.pt")
    return sds, emas


def test_fairseq_epoch_from_extra_state_and_updates(tmp_path):
    run = tmp_path / "fs"
    sds, _ = _fairseq_run(run)
    c = open_checkpoint(run / "checkpoint3.pt")
    assert (c.meta.epoch, c.meta.epoch_from, c.meta.step, c.weights_key) == (3, "recorded", 750, "model")
    assert c.meta.metrics["val_loss"] == 2.7
    c.close()
    p = ckptavg.plan(run)
    assert [(i.path.name, i.epoch, i.step) for i in p.inputs] == [
        ("checkpoint1.pt", 1, 250), ("checkpoint2.pt", 2, 500), ("checkpoint3.pt", 3, 750),
        ("checkpoint4.pt", 4, 1000), ("checkpoint_5_1100.pt", 5, 1100)]
    assert [i.epoch for i in ckptavg.plan(run, epochs="2:4").inputs] == [2, 3, 4]
    best = ckptavg.plan(run, best=2, metric="val_loss", lower_is_better=True)
    assert [i.epoch for i in best.inputs] == [4, 5]
    got = ckptavg.average(run, epochs="2:4")
    assert_close32(got["conv.weight"], fp64_mean([sds[i]["conv.weight"] for i in (1, 2, 3)]))


def test_fairseq_keep_structure(tmp_path):
    run = tmp_path / "fs"
    sds, emas = _fairseq_run(run, ema=True)
    out = tmp_path / "averaged.pt"
    rep = ckptavg.merge(run, out, epochs="2:4", keep_structure=True)
    assert rep.extra["averaged_weight_sets"] == ["model", "extra_state.ema"]
    assert rep.extra["dropped"] == ["last_optimizer_state"]
    state = torch.load(out, weights_only=True)
    last = torch.load(run / "checkpoint4.pt", weights_only=True)
    # what fairseq's Trainer.load_checkpoint reads
    assert state.get("last_optimizer_state") is None  # -> the optimizer starts afresh
    assert state["optimizer_history"] == last["optimizer_history"] and state["cfg"] == last["cfg"]
    assert state["extra_state"]["train_iterator"] == last["extra_state"]["train_iterator"]
    net = SmallNet()
    net.load_state_dict(state["model"])
    for k in ("conv.weight", "fc.bias", "bn.running_var"):
        assert_close32(state["model"][k], fp64_mean([sds[i][k] for i in (1, 2, 3)]))
        assert_close32(state["extra_state"]["ema"][k], fp64_mean([emas[i][k] for i in (1, 2, 3)]))
    assert json.dumps(state["ckptavg"])  # plain types only


def test_keep_structure_dry_run_says_what_it_would_drop(tmp_path, run_cli):
    run = tmp_path / "fs"
    _fairseq_run(run)
    code, out, err = run_cli("merge", run, "-o", tmp_path / "x.pt", "--keep-structure", "--dry-run")
    assert code == 0, err
    assert "dropped last_optimizer_state" in out and "structure of checkpoint_5_1100.pt kept" in out
    assert not (tmp_path / "x.pt").exists()


def test_keep_structure_flat_state_dict_and_tied_weights(tmp_path):
    # a flat state dict has no structure beyond its tensors: no provenance entry is added
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    models = []
    for i in range(3):
        torch.manual_seed(i)
        m = Tied()
        models.append(m)
        torch.save({"model": m.state_dict(), "step": i}, tmp_path / f"t{i}.pt")
        torch.save(m.state_dict(), tmp_path / f"flat{i}.pt")
    ckptavg.merge([tmp_path / f"t{i}.pt" for i in range(3)], tmp_path / "o.pt", keep_structure=True)
    raw = torch.load(tmp_path / "o.pt", weights_only=True)
    sd = raw["model"]
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()  # still one tensor
    assert_close32(sd["emb.weight"], fp64_mean([m.emb.weight.detach() for m in models]))
    ckptavg.merge([tmp_path / f"flat{i}.pt" for i in range(3)], tmp_path / "f.pt", keep_structure=True)
    flat = torch.load(tmp_path / "f.pt", weights_only=True)
    assert set(flat) == {"emb.weight", "head.weight"}

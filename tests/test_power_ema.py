"""PowerEMA against an fp64 EMA run step by step in the test; its snapshot files as the libraries read them;
the round trip snapshots -> posthoc_ema -> the exact EMA of a third width; the Lightning callback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptavg.errors import OptionError, OutputError
from ckptavg.power_ema import PowerEMA
from ckptavg.weights import gamma_to_sigma_rel, posthoc_ema, sigma_rel_to_gamma


class TiedNet(torch.nn.Module):
    """Embedding tied to the output layer, a BatchNorm (integer buffer) and a plain layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.mid = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.bn(self.emb(x))))


def _perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    """A stand-in for an optimizer step: every floating tensor moves, the batch counter advances."""
    with torch.no_grad():
        for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                t.add_(1)


def _reference_update(ref: dict[str, torch.Tensor], model: torch.nn.Module, beta: float) -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ref[k] = beta * ref[k] + (1.0 - beta) * v.double()


def test_two_profiles_equal_fp64_step_by_step_ema():
    torch.manual_seed(0)
    model = TiedNet()
    ema = PowerEMA(model, sigma_rels=(0.05, 0.10))
    assert ema.gammas == pytest.approx([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)])
    refs = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()} for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    for t in range(1, 301):
        _perturb(model, g)
        ema.update()
        for ref, gamma in zip(refs, ema.gammas):
            _reference_update(ref, model, (1.0 - 1.0 / t) ** (gamma + 1.0))
        if t == 1:  # beta = 0: the EMA is the weights, bit for bit
            for p in range(2):
                for k, v in model.state_dict().items():
                    assert torch.equal(ema.state_dict(p)[k], v)
    assert ema.step == 300
    for p, ref in enumerate(refs):
        sd = ema.state_dict(p)
        assert list(sd) == list(model.state_dict())
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                assert sd[k].dtype == torch.float32
                torch.testing.assert_close(sd[k].double(), ref[k], rtol=2e-6, atol=2e-5)
            else:  # integer buffer: the latest value, as is
                assert sd[k].dtype == v.dtype and torch.equal(sd[k], v)
        assert sd["head.weight"] is sd["emb.weight"]  # tied, as in the model
    # profiles by sigma_rel
    assert ema.state_dict(0.10) is not None and ema.state_dict(0.10)["mid.bias"] is ema.state_dict(1)["mid.bias"]


def test_updates_with_gaps_hold_the_weights_over_the_gap():
    """update(step) every k steps equals the per-step rule with the weights constant between updates."""
    torch.manual_seed(0)
    model = TiedNet()
    ema = PowerEMA(model, gammas=(3.0, 12.0))
    assert ema.sigma_rels == pytest.approx([gamma_to_sigma_rel(3.0), gamma_to_sigma_rel(12.0)])
    refs = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()} for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    t = 0
    for update_at in (3, 4, 10, 25, 26, 60):
        _perturb(model, g)
        while t < update_at:  # the reference sees the same weights at every step of the gap
            t += 1
            for ref, gamma in zip(refs, ema.gammas):
                _reference_update(ref, model, (1.0 - 1.0 / t) ** (gamma + 1.0))
        ema.update(update_at)
    for p, ref in enumerate(refs):
        for k, v in ema.state_dict(p).items():
            if v.is_floating_point():
                torch.testing.assert_close(v.double(), ref[k], rtol=2e-6, atol=2e-5)
    with pytest.raises(OptionError, match="step 60 is not after the previous update's step 60"):
        ema.update(60)


def test_dtype_and_device_options():
    torch.manual_seed(0)
    model = TiedNet().double()
    default = PowerEMA(model)
    assert default.state_dict(0)["mid.weight"].dtype == torch.float64  # float64 stays float64
    low = PowerEMA(model, dtype=torch.bfloat16, device="cpu")
    ref = PowerEMA(model, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        _perturb(model, g)
        low.update()
        ref.update()
    for k, v in low.state_dict(1).items():
        if v.is_floating_point():
            assert v.dtype == torch.bfloat16
            torch.testing.assert_close(v.double(), ref.state_dict(1)[k], rtol=0.03, atol=0.05)
        else:
            assert v.dtype == torch.int64
    with pytest.raises(OptionError, match="floating dtype"):
        PowerEMA(model, dtype=torch.int32)


def test_snapshot_files_load_with_their_libraries_and_carry_metadata(tmp_path):
    torch.manual_seed(0)
    model = TiedNet()
    ema = PowerEMA(model)
    g = torch.Generator().manual_seed(4)
    for _ in range(7):
        _perturb(model, g)
        ema.update()
    paths = ema.save_snapshots(tmp_path / "snaps")
    assert [p.name for p in paths] == ["ema-0.050-00000007.safetensors", "ema-0.100-00000007.safetensors"]
    for p, path in enumerate(paths):
        got = load_file(path)
        assert sorted(got) == sorted(model.state_dict())  # every name, the tied one included
        for k, v in ema.state_dict(p).items():
            assert torch.equal(got[k], v)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta == {
            "step": "7",
            "sigma_rel": repr(ema.sigma_rels[p]),
            "gamma": repr(ema.gammas[p]),
            "ckptavg_snapshot": "power-ema",
        }
        assert float(meta["gamma"]) == ema.gammas[p]
    tpaths = ema.save_snapshots(tmp_path / "snaps", step=1234, format="torch")
    assert [p.name for p in tpaths] == ["ema-0.050-00001234.pt", "ema-0.100-00001234.pt"]
    obj = torch.load(tpaths[1], weights_only=True)
    assert obj["step"] == 1234 and obj["sigma_rel"] == ema.sigma_rels[1] and obj["gamma"] == ema.gammas[1]
    for k, v in ema.state_dict(1).items():
        assert torch.equal(obj["state_dict"][k], v)
    model2 = TiedNet()
    model2.load_state_dict(obj["state_dict"])
    assert sorted(os.listdir(tmp_path / "snaps")) == sorted(p.name for p in paths + tpaths)  # no temp files left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = TiedNet()
    ema = PowerEMA(model)
    ema.update()
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OutputError, match="ema-0.050-00000001.safetensors: cannot write the snapshot"):
        ema.save_snapshots(tmp_path)
    assert os.listdir(tmp_path) == []


def test_error_cases(tmp_path):
    model = TiedNet()
    ema = PowerEMA(model)
    with pytest.raises(OptionError, match="no update yet"):
        ema.save_snapshots(tmp_path)
    ema.update(5)
    with pytest.raises(OptionError, match="format"):
        ema.save_snapshots(tmp_path, format="npz")
    with pytest.raises(OptionError, match="no profile with sigma_rel 0.07; it keeps 0.05, 0.1"):
        ema.state_dict(0.07)
    with pytest.raises(OptionError, match="index 2 is out of range"):
        ema.state_dict(2)
    with pytest.raises(OptionError, match="differ in sigma_rel"):
        PowerEMA(model, sigma_rels=(0.1, 0.1))
    with pytest.raises(OptionError, match="nn.Module"):
        PowerEMA({"a": torch.zeros(2)})  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="sigma-rel"):
        PowerEMA(model, sigma_rels=(0.5,))


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TiedNet()
    a = PowerEMA(model)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        _perturb(model, g)
        a.update()
    torch.save(a.training_state(), tmp_path / "s.pt")
    b = PowerEMA(model)
    b.load_training_state(torch.load(tmp_path / "s.pt", weights_only=True))
    for _ in range(5):
        _perturb(model, g)
        a.update()
        b.update()
    assert b.step == 10
    for p in range(2):
        for k, v in a.state_dict(p).items():
            assert torch.equal(b.state_dict(p)[k], v)
    with pytest.raises(OptionError, match="gammas"):
        PowerEMA(model, sigma_rels=(0.05,)).load_training_state(a.training_state())


# measured over seeds 0-2, 20 snapshots per profile over 2000 steps: worst per-tensor relative error 3.7e-4
# (sigma_rel 0.07) and 3.2e-4 (0.13), profile fit error 2.5e-3 and 3.4e-3; the bound keeps a margin of 5x
ROUND_TRIP_BOUND = 2e-3


@pytest.mark.parametrize("target", [0.07, 0.13])
def test_round_trip_snapshots_to_posthoc_ema_of_a_third_width(tmp_path, target):
    torch.manual_seed(0)
    model = TiedNet()
    ema = PowerEMA(model, sigma_rels=(0.05, 0.10))
    gamma = sigma_rel_to_gamma(target)
    exact = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(6)
    total = 2000
    for t in range(1, total + 1):
        _perturb(model, g)
        ema.update()
        _reference_update(exact, model, (1.0 - 1.0 / t) ** (gamma + 1.0))
        if t % 100 == 0:
            ema.save_snapshots(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 40
    snaps, tensors = [], []
    for f in files:
        with safe_open(f, "pt") as h:
            meta = h.metadata()
        snaps.append((int(meta["step"]), float(meta["gamma"])))
        tensors.append(load_file(f))
    w = posthoc_ema(snaps, sigma_rel=target)
    worst = 0.0
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            continue
        recon = sum(wi * sd[k].double() for wi, sd in zip(w.values, tensors))
        err = (recon - exact[k]).norm().item() / (exact[k] - v.double()).norm().item()
        worst = max(worst, err)
        assert err < ROUND_TRIP_BOUND, (k, err)
    # without the reconstruction: the nearest saved width, as is
    nearest = tensors[files.index(tmp_path / f"ema-{0.05 if target < 0.075 else 0.1:.3f}-{total:08d}.safetensors")]
    naive = (nearest["mid.weight"].double() - exact["mid.weight"]).norm() / (
        exact["mid.weight"] - model.mid.weight.double()
    ).norm()
    assert worst < naive.item() / 10
    print(
        f"\nround trip sigma_rel {target}: fit_error {w.fit_error:.2e}, worst tensor error {worst:.2e}, "
        f"nearest saved width {naive.item():.2e}"
    )


# ---------------------------------------------------------------- Lightning


def test_importing_ckptavg_does_not_import_lightning():
    code = "import sys, ckptavg, ckptavg.power_ema, ckptavg.weights; print(any('lightning' in m for m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


L = pytest.importorskip("lightning")
_quiet_lightning = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )

    def training_step(self, batch, _i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _Reference(L.Callback):
    """fp64 EMAs computed from the module's weights after each optimizer step, independently."""

    def __init__(self, gammas) -> None:
        self.gammas = gammas
        self.refs: list[dict[str, torch.Tensor]] | None = None
        self.t = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.t:
            return
        self.t = trainer.global_step
        sd = pl_module.state_dict()
        if self.refs is None:
            self.refs = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in sd.items()} for _ in self.gammas]
        for ref, g in zip(self.refs, self.gammas):
            beta = (1.0 - 1.0 / self.t) ** (g + 1.0)
            for k, v in sd.items():
                ref[k] = beta * ref[k] + (1.0 - beta) * v.double() if v.is_floating_point() else v.clone()


def _loader():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 2] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _fit(root, callbacks, max_epochs, ckpt_path=None, accumulate=1):
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(_Module() if ckpt_path is None else _Module(), _loader(), ckpt_path=ckpt_path)
    return trainer


@_quiet_lightning
def test_lightning_callback_updates_every_step_and_saves_every_n(tmp_path):
    from ckptavg.lightning_callback import PowerEMACallback

    L.seed_everything(0, verbose=False)
    cb = PowerEMACallback(sigma_rels=(0.05, 0.10), every_n_steps=10, dirpath=tmp_path / "ema")
    ref = _Reference([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)])
    trainer = _fit(tmp_path, [cb, ref], max_epochs=2, accumulate=2)  # 12 batches/epoch, 6 steps/epoch
    assert trainer.global_step == 12 and cb.ema is not None and cb.ema.step == 12
    names = sorted(p.name for p in (tmp_path / "ema").iterdir())
    assert names == [f"ema-{s}-{t:08d}.safetensors" for s in ("0.050", "0.100") for t in (10, 12)]
    assert ref.refs is not None
    for p, s in enumerate(("0.050", "0.100")):
        got = load_file(tmp_path / "ema" / f"ema-{s}-00000012.safetensors")
        with safe_open(tmp_path / "ema" / f"ema-{s}-00000012.safetensors", "pt") as h:
            assert h.metadata()["step"] == "12" and math.isclose(float(h.metadata()["gamma"]), ref.gammas[p])
        assert sorted(got) == sorted(trainer.lightning_module.state_dict())
        for k, v in ref.refs[p].items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(got[k], v)


@_quiet_lightning
@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_lightning_callback_resumes_the_same_emas(tmp_path):
    from ckptavg.lightning_callback import PowerEMACallback

    L.seed_everything(0, verbose=False)
    full = PowerEMACallback(every_n_steps=100, dirpath=tmp_path / "full", save_on_train_end=False)
    _fit(tmp_path / "a", [full], max_epochs=4)
    L.seed_everything(0, verbose=False)
    first = PowerEMACallback(every_n_steps=100, dirpath=tmp_path / "b", save_on_train_end=False)
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _fit(tmp_path / "b", [first, ck], max_epochs=2)
    L.seed_everything(0, verbose=False)
    resumed = PowerEMACallback(every_n_steps=100, dirpath=tmp_path / "b", save_on_train_end=False)
    _fit(
        tmp_path / "b",
        [resumed, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck")],
        max_epochs=4,
        ckpt_path=str(tmp_path / "ck" / "last.ckpt"),
    )
    assert full.ema is not None and resumed.ema is not None and resumed.ema.step == full.ema.step == 48
    for p in range(2):
        for k, v in full.ema.state_dict(p).items():
            torch.testing.assert_close(resumed.ema.state_dict(p)[k], v, rtol=1e-6, atol=1e-7)

"""Results that looked plausible but were not what was asked for (issue 25, item 6): each is now a
correct result or a one-line refusal, and each test fails on the code before the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import OptionError


def _write(tmp_path, sds, name="c"):
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"{name}-step-{(i + 1) * 100}.safetensors")
        save_file(sd, str(paths[-1]))
    return paths


def test_lora_factors_are_refused_unless_asked_for(tmp_path, run_cli):
    """mean(B_i A_i) is not mean(B) mean(A): averaging an adapter's factors silently gave the latter."""
    g = torch.Generator().manual_seed(0)
    sds = [{"base.q.lora_A.weight": torch.randn(4, 16, generator=g),
            "base.q.lora_B.weight": torch.randn(16, 4, generator=g)} for _ in range(2)]
    a, b = [s["base.q.lora_A.weight"] for s in sds], [s["base.q.lora_B.weight"] for s in sds]
    assert not torch.allclose((b[0] @ a[0] + b[1] @ a[1]) / 2, ((b[0] + b[1]) / 2) @ ((a[0] + a[1]) / 2))
    paths = _write(tmp_path, sds)
    code, _o, err = run_cli("merge", *paths, "-o", tmp_path / "avg.safetensors")
    assert code == 2 and "is a LoRA factor" in err and "--lora-factors" in err and err.count("\n") == 1
    assert not (tmp_path / "avg.safetensors").exists()
    out = ckptavg.average(paths, lora_factors=True)  # an EMA of one run's adapter, on purpose
    assert torch.equal(out["base.q.lora_A.weight"], (a[0] + a[1]) / 2)


def test_scaled_fp8_weights_in_an_unknown_layout_are_refused(tmp_path):
    """A float8 weight times its scale is the weight: averaging both separately is not its average. Block scales of
    the known layout are dequantized as they are read (tests/test_fp8.py); scales of any other shape are refused."""
    w = torch.randn(256, 256).to(torch.float8_e4m3fn)
    sds = [{"layer.weight": w, "layer.weight_scale_inv": torch.rand(3, 3) + 0.5, "norm.weight": torch.ones(4)}
           for _ in range(2)]
    with pytest.raises(OptionError, match=r"'layer.weight' is a scaled float8 weight \(with 'layer.weight_scale_inv'"):
        ckptavg.merge(_write(tmp_path, sds), tmp_path / "avg.safetensors")
    plain = [{"layer.weight": w.to(torch.float32) * (i + 1)} for i in range(2)]  # unscaled: averaged as numbers
    assert torch.equal(ckptavg.average(_write(tmp_path, plain, "p"))["layer.weight"], w.to(torch.float32) * 1.5)


@pytest.mark.parametrize("names, fmt", [(("layer.qweight", "layer.qzeros", "layer.scales"), "GPTQ/AWQ qweight"),
                                        (("layer.weight", "layer.weight_scale"), "integer weight with scales")])
def test_integer_quantized_weights_are_refused_not_copied(tmp_path, names, fmt):
    sds = [{n: (torch.randint(-100, 100, (8, 8), dtype=torch.int8) if "scale" not in n else torch.rand(8))
            for n in names} for _ in range(2)]
    with pytest.raises(OptionError, match=f"is an integer-quantized weight \\({fmt}"):
        ckptavg.merge(_write(tmp_path, sds), tmp_path / "avg.safetensors")


def test_counters_are_still_copied_from_the_last(tmp_path):
    sds = [{"w": torch.full((3,), float(i)), "bn.num_batches_tracked": torch.tensor(10 * (i + 1))} for i in range(2)]
    out = ckptavg.average(_write(tmp_path, sds))
    assert out["bn.num_batches_tracked"].item() == 20


def test_a_template_with_one_value_names_the_file_after_it(tmp_path):
    paths = _write(tmp_path, [{"w": torch.full((3,), float(i))} for i in range(3)])
    report = ckptavg.merge(paths, tmp_path / "e-{decay}.safetensors", method="ema", decay=0.5)
    assert report.output == tmp_path / "e-0.5.safetensors" and report.output.is_file()
    assert not list(tmp_path.glob("*{*"))
    with pytest.raises(OptionError, match="'sigma_rel' is not among"):
        ckptavg.merge(paths, tmp_path / "x-{sigma_rel}.safetensors")


def test_dry_run_json_of_several_outputs_reports_each(tmp_path, run_cli):
    paths = _write(tmp_path, [{"w": torch.full((3,), float(i))} for i in range(4)])
    code, out, err = run_cli("merge", *paths, "--method", "ema", "--decay", "0.5,0.9", "-o", tmp_path / "e-{decay}.pt",
                             "--dry-run", "--json")
    assert code == 0, err
    d = json.loads(out)
    got = [(v["output"].rsplit("/", 1)[1], v["weights"]) for v in d["variants"]]
    assert got[0] == ("e-0.5.pt", [0.125, 0.125, 0.25, 0.5])
    assert got[1][0] == "e-0.9.pt" and got[1][1] == pytest.approx([0.729, 0.081, 0.09, 0.1])


def test_signed_weights_do_not_get_a_share_note(tmp_path):
    paths = _write(tmp_path, [{"w": torch.full((3,), float(i))} for i in range(3)])
    p = ckptavg.plan(paths, weights=[-0.5, 0.5, 1.0])
    assert not any("of the weight" in n for n in p.notes)
    p = ckptavg.plan(paths, weights=[0.02, 0.03, 0.95])
    assert any("gets 95.0% of the weight" in n for n in p.notes)


def test_timm_version_is_not_a_metric(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": sd, "version": 2, "metric": 0.75}, tmp_path / "c.pth.tar")
    report = ckptavg.inspect([tmp_path / "c.pth.tar"])
    metrics = report.to_dict()["checkpoints"][0]["metrics"]
    assert "version" not in metrics and metrics.get("metric") == 0.75


def test_steps_come_from_parent_folders_when_the_file_name_has_none(tmp_path):
    """``checkpoint-N/unet/diffusion_pytorch_model.safetensors`` given in shell order (checkpoint-12
    before checkpoint-3): ``--last 2`` must take the two latest steps, not the last two names."""
    paths = []
    for step in (12, 3, 7):
        d = tmp_path / f"checkpoint-{step}" / "unet"
        d.mkdir(parents=True)
        save_file({"w": torch.full((2,), float(step))}, str(d / "diffusion_pytorch_model.safetensors"))
        paths.append(d / "diffusion_pytorch_model.safetensors")
    p = ckptavg.plan(paths, last=2)
    assert [(i.path.parent.parent.name, i.step) for i in p.inputs] == [("checkpoint-7", 7), ("checkpoint-12", 12)]


def test_accelerate_save_counters_are_not_epochs(tmp_path):
    for n in range(3):
        d = tmp_path / f"checkpoint_{n}"
        d.mkdir()
        save_file({"w": torch.full((2,), float(n))}, str(d / "model.safetensors"))
    p = ckptavg.plan(tmp_path)
    assert [(i.path.name, i.epoch, i.step) for i in p.inputs] == [(f"checkpoint_{n}", None, None) for n in range(3)]
    with pytest.raises(Exception, match="epoch"):
        ckptavg.plan(tmp_path, epochs="1:")


def test_dcp_model_with_a_submodule_named_model_keeps_its_other_tensors(tmp_path):
    """torchtitan flattens the model at the top level beside ``optimizer`` and ``train_state``; a
    Hugging Face style model has ``model.*`` and ``lm_head.weight``: taking the ``model.`` subtree
    dropped ``lm_head.weight`` without a word."""
    import torch.distributed.checkpoint as dcp

    sds = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {"model.embed.weight": torch.randn(8, 4, generator=g), "model.norm.weight": torch.randn(4, generator=g),
              "lm_head.weight": torch.randn(8, 4, generator=g)}
        sds.append(sd)
        dcp.save({**sd, "optimizer": {"state": {"lm_head.weight": {"exp_avg": torch.zeros(8, 4)}}},
                  "train_state": {"step": 100 * (i + 1)}}, checkpoint_id=str(tmp_path / f"step-{100 * (i + 1)}"))
    out = ckptavg.average([tmp_path / "step-100", tmp_path / "step-200"])
    assert sorted(out) == ["lm_head.weight", "model.embed.weight", "model.norm.weight"]
    for k in out:
        assert torch.allclose(out[k].double(), (sds[0][k].double() + sds[1][k].double()) / 2, atol=1e-6)
    # a DCP state dict {"model": ..., "ema": ...} (a second weight set with the model's names) still averages "model"
    dcp.save({"model": {"w": torch.ones(3)}, "ema": {"w": torch.zeros(3)}}, checkpoint_id=str(tmp_path / "two"))
    assert sorted(ckptavg.average([tmp_path / "two"])) == ["w"]


def test_lightning_weight_averaging_checkpoints_average_the_live_weights(tmp_path, run_cli):
    """Lightning 2.6's EMAWeightAveraging keeps its running average under state_dict and the trained
    weights under current_model_state: ckptavg averaged the averages, and inspect hid the live weights."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import EMAWeightAveraging

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def training_step(self, batch, i):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=3, callbacks=[EMAWeightAveraging(decay=0.9), ckpt_cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(M(), data)
    files = sorted((tmp_path / "ck").glob("*.ckpt"))
    assert len(files) == 3
    objs = [torch.load(f, weights_only=False) for f in files]
    live = [o["current_model_state"]["lin.weight"].double() for o in objs]
    avg = [o["state_dict"]["lin.weight"].double() for o in objs]
    assert not torch.allclose(sum(live) / 3, sum(avg) / 3)
    p = ckptavg.plan(tmp_path / "ck")
    assert [i.weights_key for i in p.inputs] == ["current_model_state"] * 3
    assert any("live weights (current_model_state)" in n and "--key state_dict" in n for n in p.notes)
    torch.testing.assert_close(ckptavg.average(tmp_path / "ck")["lin.weight"].double(), sum(live) / 3,
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ckptavg.average(tmp_path / "ck", key="state_dict")["lin.weight"].double(),
                               sum(avg) / 3, rtol=1e-6, atol=1e-7)
    code, out, err = run_cli("inspect", files[0], "--json")
    assert code == 0, err
    row = json.loads(out)["checkpoints"][0]
    assert row["weights_key"] == "current_model_state" and "state_dict" in row["other_weight_sets"]


def test_ema_pytorch_flat_state_key_selects_a_prefix(tmp_path, run_cli):
    """ema-pytorch's EMA module saves online_model.*, ema_model.*, initted and step side by side."""
    sds = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        online, ema = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
        sds.append((online, ema))
        torch.save({"online_model.lin.weight": online, "ema_model.lin.weight": ema, "initted": torch.tensor(True),
                    "step": torch.tensor(100 * (i + 1))}, tmp_path / f"ema-{i}.pt")
    paths = [tmp_path / "ema-0.pt", tmp_path / "ema-1.pt"]
    out = ckptavg.average(paths, key="ema_model")
    assert list(out) == ["lin.weight"]
    torch.testing.assert_close(out["lin.weight"].double(), (sds[0][1].double() + sds[1][1].double()) / 2)
    p = ckptavg.plan(paths, key="online_model")
    assert [i.weights_key for i in p.inputs] == ["online_model"] * 2 and [t.name for t in p.tensors] == ["lin.weight"]


def test_kohya_lora_and_bare_integer_weights_are_refused(tmp_path):
    g = torch.Generator().manual_seed(3)
    kohya = [{"lora_unet_down_0.lora_down.weight": torch.randn(4, 16, generator=g),
              "lora_unet_down_0.lora_up.weight": torch.randn(16, 4, generator=g),
              "lora_unet_down_0.alpha": torch.tensor(4.0)} for _ in range(2)]
    out = ckptavg.average(_write(tmp_path, kohya, "k"))  # kohya LoRA files: the exact average (tests/test_kohya.py)
    got = out["lora_unet_down_0.lora_up.weight"].double() @ out["lora_unet_down_0.lora_down.weight"].double()
    want = sum(sd["lora_unet_down_0.lora_up.weight"].double() @ sd["lora_unet_down_0.lora_down.weight"].double()
               for sd in kohya) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mixed = [{**sd, "text.weight": torch.ones(3)} for sd in kohya]  # factors among other tensors: refused
    with pytest.raises(OptionError, match="'lora_unet_down_0.lora_down.weight' is a LoRA factor"):
        ckptavg.merge(_write(tmp_path, mixed, "m"), tmp_path / "k.safetensors")
    ints = [{"fc.weight": torch.randint(0, 255, (4, 4), dtype=torch.uint8)} for _ in range(2)]
    with pytest.raises(OptionError, match="'fc.weight' is an integer-quantized weight \\(an integer layer weight"):
        ckptavg.merge(_write(tmp_path, ints, "u"), tmp_path / "u.safetensors")

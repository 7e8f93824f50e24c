"""BatchNorm recalibration: torch mode against torch's own update_bn, precise mode against exact
population statistics computed here from the layers' inputs, and the state-dict/spec path."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ckptavg.bn import BNReport, is_bn_like, load_spec, recalibrate_bn, recalibrate_state_dict
from ckptavg.bn.core import BN_STAT_NAMES
from ckptavg.bn.feed import to_device
from ckptavg.errors import CkptavgWarning, MismatchError, OptionError, SpecError

from ._bn_models import (
    DictNet,
    InputRecorder,
    NoBN,
    SmallCNN,
    VarietyNet,
    counting,
    image_batches,
    population,
    scramble_stats,
)

STATS = ("running_mean", "running_var", "num_batches_tracked")


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in STATS}


def assert_states_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# -- torch mode == torch.optim.swa_utils.update_bn ------------------------------------------


def test_torch_mode_equals_update_bn_on_torchvision_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    scramble_stats(model)
    model.eval()
    data = torch.utils.data.TensorDataset(*map(torch.cat, zip(*image_batches(3, 8, 32))))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)

    update_bn(loader, ref)
    report = recalibrate_bn(ours, loader, mode="torch")

    assert_states_close(bn_state(ours), bn_state(ref))
    assert not torch.equal(bn_state(ours)["bn1.running_mean"], bn_state(model)["bn1.running_mean"])
    assert report.mode == "torch" and report.batches == 3 and report.samples == 24 and not report.skipped
    assert len(report.layers) == 20 and report.layers[0] == "bn1"
    assert not any(flags(ours).values())  # eval restored everywhere


def test_torch_mode_equals_update_bn_on_custom_cnn_with_dropout_lazy_sync_and_shared_bn() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    model(torch.randn(2, 3, 16, 16))  # materialise the lazy layer
    scramble_stats(model)
    batches = image_batches(4, 6, 16)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)

    torch.manual_seed(123)  # dropout is on in this mode: same random stream for both
    update_bn(batches, ref)
    torch.manual_seed(123)
    report = recalibrate_bn(ours, batches, mode="torch")

    assert_states_close(bn_state(ours), bn_state(ref))
    assert int(ours.shared.num_batches_tracked) == 8  # two calls per forward, as torch counts them
    assert int(ours.bn1.num_batches_tracked) == 4
    assert set(report.layers) == {"bn1", "shared", "lazy", "sync", "bn_head"}


def test_torch_mode_on_unmaterialised_lazy_layer_equals_update_bn() -> None:
    batches = [b[0] for b in image_batches(3, 4, 8)]
    ours, ref = (
        torch.manual_seed(0) and nn.Sequential(nn.Conv2d(3, 5, 3), nn.LazyBatchNorm2d(), nn.ReLU()) for _ in range(2)
    )  # uninitialised lazy modules cannot be deep-copied: build twice from the same seed
    ref(batches[0])  # update_bn itself fails on an unmaterialised lazy layer (reset_running_stats)
    update_bn(batches, ref)
    recalibrate_bn(ours, batches, mode="torch")  # materialises it during the pass
    assert isinstance(ours[1], nn.BatchNorm2d)
    assert_states_close(bn_state(ours), bn_state(ref))


# -- precise mode: exact population statistics ------------------------------------------------


def test_precise_first_layer_of_resnet18_is_exact_dataset_statistics() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    scramble_stats(model)
    batches = image_batches(3, 8, 32)  # each batch has its own offset: between-batch variance
    torch_mode = copy.deepcopy(model)

    report = recalibrate_bn(model, batches)

    # Reference, independent of any hook: conv1 over the whole dataset in float64.
    x = torch.cat([b[0] for b in batches]).double()
    with torch.no_grad():
        y = nn.functional.conv2d(x, model.conv1.weight.double(), stride=2, padding=3)
    torch.testing.assert_close(model.bn1.running_mean.double(), y.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), y.var(dim=(0, 2, 3), correction=1), rtol=1e-5, atol=1e-6)
    assert int(model.bn1.num_batches_tracked) == 3
    assert report.mode == "precise" and report.batches == 3 and report.samples == 24

    # torch's update_bn averages per-batch variances and misses the between-batch part.
    recalibrate_bn(torch_mode, batches, mode="torch")
    ratio = torch_mode.bn1.running_var.double() / y.var(dim=(0, 2, 3))
    assert ratio.mean() < 0.9, ratio


def test_precise_every_layer_matches_population_of_its_own_inputs() -> None:
    torch.manual_seed(0)
    model = VarietyNet()
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    scramble_stats(model)
    layers = {n: m for n, m in model.named_modules() if is_bn_like(m)}
    assert set(layers) == {"bn2d", "inorm", "lazy", "sync", "bn3d", "bn1d_seq", "bn1d_flat"}
    untracked_before = copy.deepcopy(model.untracked.state_dict())
    batches = [b[0] for b in image_batches(3, 5, 6)]
    recorder = InputRecorder(layers)
    try:
        report = recalibrate_bn(model, batches)
    finally:
        recorder.remove()

    assert sorted(report.layers) == sorted(layers)
    for name, m in layers.items():
        mean, var = population(recorder.inputs[name])
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6, msg=name)
        assert int(m.num_batches_tracked) == 3, name
    assert model.untracked.state_dict().keys() == untracked_before.keys()


def test_precise_uninitialised_lazy_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.LazyBatchNorm2d())
    batches = [b[0] for b in image_batches(2, 4, 8)]
    with torch.no_grad():
        ref_inputs = [model[0](x) for x in batches]
    recalibrate_bn(model, batches)
    mean, var = population(ref_inputs)
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_precise_shared_layer_pools_every_call() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()  # eval: dropout off, so the shared layer's inputs are reproducible
    batches = image_batches(3, 4, 16)
    recorder = InputRecorder({"shared": model.shared})
    try:
        recalibrate_bn(model, batches)
    finally:
        recorder.remove()
    assert len(recorder.inputs["shared"]) == 6
    mean, var = population(recorder.inputs["shared"])
    torch.testing.assert_close(model.shared.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.shared.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(model.shared.num_batches_tracked) == 6


def test_precise_runs_bn_with_batch_statistics_and_dropout_off() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4, affine=False), nn.BatchNorm1d(4))
    scramble_stats(model)  # stale stats: if BN1 normalised with them, BN2 would see raw-ish data
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 4, generator=g) * 3 + 5 + b for b in range(4)]
    model.train()
    recalibrate_bn(model, batches)

    mean, var = population(batches)  # dropout off: BN1 sees the data itself
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-6, atol=1e-6)
    # BN1 normalised each batch by its own statistics: BN2 saw zero-mean, unit-variance batches.
    torch.testing.assert_close(model[2].running_mean, torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(model[2].running_var, torch.ones(4), rtol=0, atol=0.02)
    assert all(flags(model).values())  # train mode restored


def test_precise_single_batch_equals_torch_mode() -> None:
    """Same unbiased running_var convention as torch: one batch gives identical statistics."""
    torch.manual_seed(0)
    model = VarietyNet()
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    batches = [image_batches(1, 6, 6)[0][0]]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate_bn(a, batches, mode="precise")
    recalibrate_bn(b, batches, mode="torch")
    sa, sb = bn_state(a), bn_state(b)
    # InstanceNorm differs by design: precise pools all instances, torch averages per-instance variances.
    # (per-instance Bessel corrections included); their variances are checked in dedicated tests.
    del sa["inorm.running_var"], sb["inorm.running_var"]
    assert_states_close(sa, sb, rtol=1e-5, atol=1e-5)


def test_instancenorm_torch_mode_is_cumulative_average_of_torch_updates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True, momentum=0.2))
    scramble_stats(model)
    batches = [b[0] for b in image_batches(3, 5, 8)]
    recorder = InputRecorder({"in": model[1]})
    try:
        recalibrate_bn(model, batches, mode="torch")
    finally:
        recorder.remove()
    # torch tracks, per call, the mean over instances of per-instance means / unbiased variances.
    per_call_mean = torch.stack([x.double().mean(dim=(2, 3)).mean(dim=0) for x in recorder.inputs["in"]])
    per_call_var = torch.stack([x.double().var(dim=(2, 3)).mean(dim=0) for x in recorder.inputs["in"]])
    torch.testing.assert_close(model[1].running_mean.double(), per_call_mean.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), per_call_var.mean(0), rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].momentum == 0.2


# -- batches: tensors, tuples, dicts, input, call, max_batches ----------------------------------


def dict_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {"image": torch.randn(4, 3, 5, 5, generator=g) + i, "scale": torch.rand(4, generator=g) + 0.5} for i in range(n)
    ]


def test_dict_batches_are_keyword_arguments() -> None:
    batches = dict_batches()
    model = DictNet()
    with pytest.raises((TypeError, AttributeError)):
        update_bn(batches, copy.deepcopy(model))  # what torch cannot do (pytorch#49082)
    report = recalibrate_bn(model, batches)
    mean, var = population([b["image"] * b["scale"].view(-1, 1, 1, 1) for b in batches])
    torch.testing.assert_close(model.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert report.samples == 12 and report.batches == 3


def test_input_selects_key_or_index() -> None:
    batches = dict_batches()
    bn = nn.BatchNorm2d(3)
    recalibrate_bn(bn, batches, input="image")
    mean, var = population([b["image"] for b in batches])
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)

    tuples = [(b["scale"], b["image"]) for b in batches]  # (labels, inputs): input = 1
    bn2 = nn.BatchNorm2d(3)
    recalibrate_bn(bn2, tuples, input=1, mode="torch")
    ref = nn.BatchNorm2d(3)
    update_bn([b["image"] for b in batches], ref)
    assert_states_close(bn_state(bn2), bn_state(ref))

    with pytest.raises(OptionError, match="no key 'img'"):
        recalibrate_bn(nn.BatchNorm2d(3), batches, input="img")
    with pytest.raises(OptionError, match="input=5"):
        recalibrate_bn(nn.BatchNorm2d(3), tuples, input=5)


def test_call_function_runs_the_forward() -> None:
    batches = dict_batches()
    seen = []

    def forward(model: nn.Module, batch: dict) -> None:
        seen.append(torch.is_grad_enabled())
        model(batch["image"], scale=batch["scale"] * 2)

    model = DictNet()
    report = recalibrate_bn(model, batches, call=forward)
    assert seen == [False, False, False]  # no gradients
    mean, var = population([b["image"] * 2 * b["scale"].view(-1, 1, 1, 1) for b in batches])
    torch.testing.assert_close(model.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert report.samples == 12
    with pytest.raises(OptionError, match="not both"):
        recalibrate_bn(model, batches, call=forward, input="image")


def test_max_batches_stops_before_fetching_more() -> None:
    batches = [b[0] for b in image_batches(5, 4, 6)]
    fetched: list[int] = []
    bn = nn.BatchNorm2d(3)
    report = recalibrate_bn(bn, counting(batches, fetched), max_batches=2)
    assert len(fetched) == 2 and report.batches == 2 and report.samples == 8
    mean, var = population(batches[:2])
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2


def test_model_without_bn_skips_the_data_pass() -> None:
    def never() -> object:
        raise AssertionError("the loader must not be read")
        yield  # pragma: no cover

    model = NoBN()
    before = copy.deepcopy(model.state_dict())
    report = recalibrate_bn(model, never())
    assert report.skipped and report.layers == [] and report.batches == 0
    assert "skipped" in report.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- state restored, errors, unused layers, progress --------------------------------------------


@pytest.mark.parametrize("mode", ["precise", "torch"])
def test_flags_momentum_restored_and_no_gradients(mode: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    model(torch.randn(2, 3, 8, 8))
    model.train()
    model.bn1.eval()  # a frozen layer stays frozen
    model.fc.eval()
    model.shared.momentum = None
    model.bn_head.momentum = 0.3
    before_flags = flags(model)
    before_momenta = {n: m.momentum for n, m in model.named_modules() if is_bn_like(m)}
    batches = [(x.requires_grad_(), y) for x, y in image_batches(2, 4, 8)]
    recalibrate_bn(model, batches, mode=mode)
    assert flags(model) == before_flags
    assert {n: m.momentum for n, m in model.named_modules() if is_bn_like(m)} == before_momenta
    assert all(p.grad is None for p in model.parameters())
    assert all(not t.requires_grad for t in model.buffers())


class OneUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)  # e.g. an auxiliary head that forward() skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize("mode", ["precise", "torch"])
def test_layer_that_never_runs_keeps_its_statistics(mode: str) -> None:
    holder = OneUsed()
    scramble_stats(holder)
    before = bn_state(holder.unused)
    with pytest.warns(CkptavgWarning, match="never ran.*unused"):
        report = recalibrate_bn(holder, [b[0] for b in image_batches(2, 4, 5)], mode=mode)
    assert report.layers == ["used"] and report.unused == ["unused"]
    assert_states_close(bn_state(holder.unused), before, rtol=0, atol=0)
    assert "never ran" in report.summary()


def test_failure_midway_leaves_statistics_and_flags_untouched() -> None:
    model = SmallCNN()
    model(torch.randn(2, 3, 8, 8))
    scramble_stats(model)
    model.eval()
    before = bn_state(model)

    def broken() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield image_batches(1, 4, 8)[0]
        raise OSError("disk on fire")

    for mode in ("torch", "precise"):
        with pytest.raises(OSError, match="disk on fire"):
            recalibrate_bn(model, broken(), mode=mode)
        assert_states_close(bn_state(model), before, rtol=0, atol=0)
        assert not any(flags(model).values())


def test_bad_arguments_and_empty_loader() -> None:
    bn = nn.BatchNorm2d(3)
    with pytest.raises(OptionError, match="mode 'fast'"):
        recalibrate_bn(bn, [], mode="fast")
    with pytest.raises(OptionError, match="max_batches 0"):
        recalibrate_bn(bn, [], max_batches=0)
    with pytest.raises(OptionError, match="no batches"):
        recalibrate_bn(bn, [])
    with pytest.raises(OptionError, match="input=True"):
        recalibrate_bn(bn, [], input=True)


def test_progress_bar_goes_to_stderr_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    batches = [b[0] for b in image_batches(2, 4, 5)]
    recalibrate_bn(nn.BatchNorm2d(3), batches)
    assert capsys.readouterr().err == ""
    recalibrate_bn(nn.BatchNorm2d(3), batches, progress=True)
    captured = capsys.readouterr()
    assert "BN recalibration (precise)" in captured.err and "2/2" in captured.err
    assert captured.out == ""


def test_report_summary() -> None:
    r = BNReport("precise", ["a"] * 20, 50, 6400, 3.14, False)
    assert r.summary() == "BN recalibrated (precise): 20 layers over 50 batches / 6400 samples in 3.1 s"


def test_to_device_is_recursive_and_keeps_container_types() -> None:
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    batch = {"a": [torch.ones(1), (torch.zeros(2), "tag")], "b": Pair(torch.ones(3), 7)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "tag"
    assert isinstance(moved["b"], Pair) and moved["b"].x.device.type == "meta" and moved["b"].y == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["precise", "torch"])
def test_cuda_matches_cpu(mode: str) -> None:
    torch.manual_seed(0)
    model = VarietyNet()
    model(torch.randn(2, 3, 6, 6))
    batches = [{"x": b[0]} for b in image_batches(3, 5, 6)]
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate_bn(cpu, batches, mode=mode, input="x")
    recalibrate_bn(gpu, batches, mode=mode, input="x", device="cuda")
    assert next(gpu.parameters()).device.type == "cuda"
    assert_states_close({k: v.cpu() for k, v in bn_state(gpu).items()}, bn_state(cpu), rtol=1e-4, atol=1e-5)


# -- recalibrate_state_dict through a spec ------------------------------------------------------

MODELS_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 3)
        self.bn_fc = nn.BatchNorm1d(3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.bn_fc(self.fc(x.mean(dim=(2, 3))))


class Lit(nn.Module):
    "Lightning-style: the network under .model, a loss with a buffer beside it."

    def __init__(self):
        super().__init__()
        self.model = Net()
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(3))


def build(width=4):
    return Net(width)


def build_with_aux():
    net = Net()
    net.aux = nn.BatchNorm1d(3)  # never called by forward (an auxiliary head)
    return net


def batches(n=4, batch_size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, 6, 6, generator=g) * (2 + i) + i, torch.zeros(batch_size))
            for i in range(n)]


def broken_batches():
    yield batches(1)[0]
    raise OSError("cannot read shard 1")


def bad_forward(model, batch):
    raise ValueError("wrong arity")


def empty():
    return []
"""


def write_spec(folder: Path, data: str = 'loader = "models.py:batches"', model_extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.py").write_text(MODELS_PY)
    spec = folder / "bn.toml"
    spec.write_text(f'[model]\nfactory = "models.py:build"\n{model_extra}\n\n[data]\n{data}\n')
    return spec


def lit_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], object]:
    spec = load_spec(write_spec(folder))
    lit_class = spec._factory_obj.__globals__["Lit"]  # defined in models.py next to the factory
    torch.manual_seed(0)
    lit = lit_class()
    scramble_stats(lit)
    return dict(lit.state_dict()), spec


def test_state_dict_with_lightning_prefix_torch_mode_equals_update_bn(tmp_path: Path) -> None:
    sd, _ = lit_state_dict(tmp_path)
    spec = load_spec(write_spec(tmp_path, model_extra='prefix = "model."'))
    out, report = recalibrate_state_dict(sd, spec, mode="torch")

    assert list(out) == list(sd)  # same keys, same order
    changed = {k for k in sd if out[k] is not sd[k]}
    assert changed == {f"model.{layer}.{s}" for layer in ("bn", "bn_fc") for s in BN_STAT_NAMES}
    assert out["criterion.weight"] is sd["criterion.weight"]  # outside the prefix: passed through

    ref = spec.build_model()
    ref.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    update_bn(spec.build_loader(), ref)
    assert_states_close({f"model.{k}": v for k, v in bn_state(ref).items()}, {k: out[k] for k in changed})
    assert report.layers == ["bn", "bn_fc"] and report.batches == 4 and report.samples == 20


def test_state_dict_precise_keeps_dtypes_and_identity(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    torch.manual_seed(0)
    net = spec.build_model()
    scramble_stats(net)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    out, report = recalibrate_state_dict(sd, spec, max_batches=3)

    assert list(out) == list(sd)
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in BN_STAT_NAMES:
            assert out[k] is not v and out[k].dtype == v.dtype and out[k].shape == v.shape
        else:
            assert out[k] is v
    assert int(out["bn.num_batches_tracked"]) == 3 and report.batches == 3
    # First BN layer: exact statistics of conv(x) over the 3 batches, rounded once to bfloat16.
    x = torch.cat([b[0] for b in spec.build_loader()[:3]]).double()
    y = nn.functional.conv2d(x, sd["conv.weight"].double(), padding=1)
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3))
    assert torch.equal(out["bn.running_mean"], mean.to(torch.bfloat16))
    assert torch.equal(out["bn.running_var"], var.to(torch.bfloat16))


@pytest.mark.parametrize("mode", ["precise", "torch"])
def test_state_dict_layer_that_never_runs_is_passed_through(tmp_path: Path, mode: str) -> None:
    spec = load_spec(write_spec(tmp_path))
    spec.factory, spec._factory_obj = "models.py:build_with_aux", spec._factory_obj.__globals__["build_with_aux"]
    net = spec.build_model()
    scramble_stats(net)
    sd = net.state_dict()
    with pytest.warns(CkptavgWarning, match="aux"):
        out, report = recalibrate_state_dict(sd, spec, mode=mode)
    assert report.unused == ["aux"]
    assert all(out[f"aux.{s}"] is sd[f"aux.{s}"] for s in BN_STAT_NAMES)
    assert all(out[f"bn.{s}"] is not sd[f"bn.{s}"] for s in BN_STAT_NAMES)


def test_state_dict_key_mismatch_is_one_error_with_prefix_hint(tmp_path: Path) -> None:
    sd, spec = lit_state_dict(tmp_path)
    with pytest.raises(MismatchError) as info:
        recalibrate_state_dict(sd, spec)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{spec.path}: ")
    assert "missing key(s): conv.weight" in msg and "unexpected key(s): model.conv.weight" in msg
    assert 'hint: set prefix = "model." in [model]' in msg

    plain = {k[6:]: v for k, v in sd.items() if k.startswith("model.")}
    del plain["fc.bias"]
    plain["extra.weight"] = torch.zeros(1)
    with pytest.raises(MismatchError, match=r"1 missing key\(s\): fc.bias; 1 unexpected key\(s\): extra.weight"):
        recalibrate_state_dict(plain, spec)

    plain = {k[6:]: v for k, v in sd.items() if k.startswith("model.")}
    plain["conv.weight"] = torch.zeros(2, 2)
    with pytest.raises(MismatchError, match="size mismatch for conv.weight"):
        recalibrate_state_dict(plain, spec)

    wrong = load_spec(write_spec(tmp_path, model_extra='prefix = "module."'))
    with pytest.raises(MismatchError, match="no key of the checkpoint starts with 'module.'"):
        recalibrate_state_dict(sd, wrong)


def test_state_dict_without_bn_layers_is_returned_as_is(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    spec_path.write_text(
        '[model]\nfactory = "torch.nn:Linear"\nargs = [3, 2]\n[data]\nloader = "models.py:broken_batches"\n'
    )
    spec = load_spec(spec_path)
    sd = dict(nn.Linear(3, 2).state_dict())
    out, report = recalibrate_state_dict(sd, spec)
    assert report.skipped and list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


@pytest.mark.parametrize(
    ("data", "entry", "text"),
    [
        ('loader = "models.py:broken_batches"', "[data].loader", "failed producing batch 1: OSError: cannot read"),
        ('loader = "models.py:batches"\ncall = "models.py:bad_forward"', "[data].call", "ValueError: wrong arity"),
        ('loader = "models.py:batches"\ninput = 1', "[data].input", "failed on batch 0"),
        ('loader = "models.py:batches"\ninput = "x"', "[data].input", "input='x': the batch is a tuple of 2"),
        ('loader = "models.py:empty"', "[data].loader", "no batches"),
    ],
)
def test_state_dict_errors_in_user_code_name_the_entry(tmp_path: Path, data: str, entry: str, text: str) -> None:
    spec = load_spec(write_spec(tmp_path, data=data))
    sd = spec.build_model().state_dict()
    with pytest.raises(SpecError) as info:
        recalibrate_state_dict(sd, spec)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{spec.path}: {entry}: ") and text in msg


def test_state_dict_forward_failure_names_the_factory(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, model_extra="kwargs = { width = 4 }"))
    sd = spec.build_model().state_dict()
    spec.model_kwargs = {"width": 5}  # the checkpoint no longer fits the model
    with pytest.raises(MismatchError, match="size mismatch for conv.weight"):
        recalibrate_state_dict(sd, spec)
    spec.model_kwargs = {"width": 4}
    spec._data_obj = lambda: [torch.randn(4, 5, 6, 6)]  # 5 channels for a 3-channel conv
    with pytest.raises(SpecError) as info:
        recalibrate_state_dict(sd, spec)
    assert str(info.value).startswith(
        f"{spec.path}: [model].factory: the forward pass of the model from 'models.py:build' failed on batch 0: "
        "RuntimeError: "
    )


def test_state_dict_device_override(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    spec_path.write_text(spec_path.read_text() + '\n[run]\ndevice = "cuda:99"\n')
    spec = load_spec(spec_path)  # well-formed: availability is checked when it is used
    sd = spec.build_model().state_dict()
    with pytest.raises(SpecError, match=r"\[run\].device: 'cuda:99'"):
        recalibrate_state_dict(sd, spec)
    with pytest.raises(OptionError, match="device 'cuda:99'"):
        recalibrate_state_dict(sd, spec, device="cuda:99")
    out, report = recalibrate_state_dict(sd, spec, device="cpu")
    assert report.batches == 4 and out["bn.running_mean"].device.type == "cpu"


def test_no_warning_when_every_layer_runs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate_bn(SmallCNN(), image_batches(1, 4, 8))


# -- float64 models, large means, unavailable devices -------------------------------------------


def test_precise_float64_batchnorm_is_the_fp64_population() -> None:
    # Two batches with different means: the second forward must not overwrite the first's summary.
    model = nn.BatchNorm1d(1).double()
    batches = [torch.tensor([[0.0], [1.0], [0.0], [1.0]], dtype=torch.float64)]
    batches.append(batches[0] + 10)
    recalibrate_bn(model, batches)
    all_values = torch.cat(batches)[:, 0]
    assert model.running_mean.dtype == torch.float64
    torch.testing.assert_close(model.running_mean, all_values.mean().reshape(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(model.running_var, all_values.var(correction=1).reshape(1), rtol=1e-12, atol=0)
    assert float(model.running_mean) == 5.5


@pytest.mark.parametrize("layer", ["bn1d", "bn2d", "inorm"])
def test_precise_float64_layers_match_fp64_population(layer: str) -> None:
    g = torch.Generator().manual_seed(3)
    if layer == "bn1d":
        module: nn.Module = nn.BatchNorm1d(3)
        batches = [torch.randn(8, 3, generator=g, dtype=torch.float64) * (1 + b) + 4 * b for b in range(5)]
    elif layer == "bn2d":
        module = nn.BatchNorm2d(3)
        batches = [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) + 100 * b for b in range(5)]
    else:  # the var_mean pre-hook path
        module = nn.InstanceNorm1d(3, track_running_stats=True)
        batches = [torch.randn(4, 3, 7, generator=g, dtype=torch.float64) * 2 - 3 * b for b in range(5)]
    module = module.double()
    recalibrate_bn(module, batches)
    mean, var = population(batches)
    assert module.running_mean.dtype == torch.float64
    torch.testing.assert_close(module.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(module.num_batches_tracked) == 5


def large_mean_batches(shape: tuple[int, ...], n: int = 20) -> list[torch.Tensor]:
    """Float32 activations ~ N(1e4, 0.01): a mean a million times the spread."""
    g = torch.Generator().manual_seed(7)
    return [1e4 + 0.01 * torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.BatchNorm1d(4), (256, 4)),
        (nn.BatchNorm2d(3), (16, 3, 4, 4)),
        (nn.InstanceNorm1d(4, track_running_stats=True), (16, 4, 16)),
    ],
    ids=["bn1d", "bn2d", "inorm"],
)
def test_precise_large_mean_small_spread_is_accurate(module: nn.Module, shape: tuple[int, ...]) -> None:
    batches = large_mean_batches(shape)
    recalibrate_bn(module, batches)
    mean, var = population(batches)  # fp64 over the very fp32 values the layer saw
    torch.testing.assert_close(module.running_var.double(), var, rtol=1e-5, atol=0)
    torch.testing.assert_close(module.running_mean.double(), mean, rtol=0, atol=2.0**-11)  # half an fp32 ulp at 1e4


def test_precise_large_mean_deeper_layer_sees_correctly_normalised_inputs() -> None:
    # The first BN normalises each batch by its own statistics (a per-channel shift of its input
    # must not change that); the second BN must get the population of what the first produced.
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    batches = large_mean_batches((64, 4), n=6)
    recalibrate_bn(model, batches)

    w0, b0 = model[0].weight.double(), model[0].bias.double()
    lin_w, lin_b = model[1].weight.double(), model[1].bias.double()
    outs = []
    for x in batches:  # reference forward in fp64, batch statistics as in training
        x = x.double()
        y = (x - x.mean(0)) / torch.sqrt(x.var(0, correction=0) + model[0].eps) * w0 + b0
        outs.append(y @ lin_w.T + lin_b)
    mean, var = population(outs)
    torch.testing.assert_close(model[2].running_mean.double(), mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[2].running_var.double(), var, rtol=1e-4, atol=1e-4)


def test_torch_mode_large_mean_still_equals_update_bn() -> None:
    batches = large_mean_batches((64, 4), n=5)
    ours, ref = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    update_bn(batches, ref)
    recalibrate_bn(ours, batches, mode="torch")
    assert_states_close(bn_state(ours), bn_state(ref), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_is_the_clis_one_line_option_error(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    scramble_stats(model)
    before = bn_state(model)
    with pytest.raises(OptionError) as info:
        recalibrate_bn(model, image_batches(1, 4, 8), device="cuda")
    msg = str(info.value)
    assert msg == "device 'cuda': CUDA is not available on this machine (torch.cuda.is_available() is False)"
    assert_states_close(bn_state(model), before, rtol=0, atol=0)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    # The same message as `ckptavg bn --device cuda` (the spec's device override).
    spec = load_spec(write_spec(tmp_path))
    with pytest.raises(OptionError) as cli_info:
        recalibrate_state_dict(spec.build_model().state_dict(), spec, device="cuda")
    assert str(cli_info.value) == msg

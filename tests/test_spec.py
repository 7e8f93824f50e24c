"""The TOML recalibration spec: parsing, path resolution, building, and every mistake's message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptavg.bn import recalibrate_state_dict
from ckptavg.bn.spec import DEFAULT_BATCH_SIZE, BNSpec, load_spec
from ckptavg.errors import CkptavgError, OptionError, SpecError

REPO = Path(__file__).resolve().parents[1]

MODELS_PY = """
import torch
from torch import nn

CONSTANT = 3


def build(width=4, init_path=None):
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
    net.init_path = init_path
    return net


def batches(n=3, batch_size=4, root=None, name=None):
    g = torch.Generator().manual_seed(0)
    out = [(torch.randn(batch_size, 3, 5, 5, generator=g) + i, torch.zeros(batch_size)) for i in range(n)]
    batches.seen = {"root": root, "name": name}
    return out


def failing_factory():
    raise ValueError("no such architecture")


def not_a_model():
    return 3


def not_iterable():
    return 42


def forward(model, batch):
    model(batch[0])


class Squares(torch.utils.data.Dataset):
    def __init__(self, root, n=10, transform=None):
        self.root, self.n, self.transform = root, n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.full((3, 5, 5), float(i))
        return (self.transform(x) if self.transform else x), i


LOADER = [torch.ones(2, 3, 5, 5)]
"""


def make(tmp_path: Path, text: str, *, name: str = "bn.toml", models: str = MODELS_PY) -> Path:
    (tmp_path / "models.py").write_text(models)
    spec = tmp_path / name
    spec.write_text(textwrap.dedent(text))
    return spec


GOOD = """
[model]
factory = "models.py:build"
kwargs = { width = 6 }

[data]
loader = "models.py:batches"
kwargs = { n = 3 }
"""


def spec_error(path: Path | str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert isinstance(info.value, CkptavgError) and info.value.exit_code == 1
    return msg


# -- good specs -----------------------------------------------------------------------------


def test_minimal_spec_builds_model_and_loader(tmp_path: Path) -> None:
    spec = load_spec(make(tmp_path, GOOD))
    assert isinstance(spec, BNSpec) and spec.path == tmp_path / "bn.toml"
    assert spec.prefix is None and spec.device is None and spec.max_batches is None
    assert spec.input is None and spec.call_function is None
    model = spec.build_model()
    assert isinstance(model, nn.Sequential) and model[1].num_features == 6
    loader = spec.build_loader()
    assert len(loader) == 3 and loader[0][0].shape == (4, 3, 5, 5)
    assert spec.resolve_device() == torch.device("cpu")


def test_issue_example_with_every_key(tmp_path: Path) -> None:
    spec = load_spec(
        make(
            tmp_path,
            """
            [model]
            factory = "torchvision.models:resnet18"   # or "path/to/models.py:build"
            kwargs = { num_classes = 10 }
            prefix = "model."

            [data]
            loader = "models.py:batches"
            kwargs = { batch_size = 8 }
            max_batches = 200
            input = 0

            [run]
            device = "cpu"
            """,
        )
    )
    assert spec.factory == "torchvision.models:resnet18" and spec.model_kwargs == {"num_classes": 10}
    assert spec.prefix == "model." and spec.max_batches == 200 and spec.input == 0 and spec.device == "cpu"
    model = spec.build_model()
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 10


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "configs" / "exp1"
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "models.py").write_text(MODELS_PY)
    (folder / "bn.toml").write_text(
        textwrap.dedent(
            """
            [model]
            factory = "lib/models.py:build"
            kwargs = { init_path = "weights/init.pt" }

            [data]
            loader = "lib/models.py:batches"
            kwargs = { root = "data/train", name = "data/train" }
            """
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(Path("..") / "configs" / "exp1" / "bn.toml")
    assert spec.build_model().init_path == str(folder.resolve() / "weights" / "init.pt")
    spec.build_loader()
    seen = spec._data_obj.seen
    assert seen["root"] == str(folder.resolve() / "data" / "train")
    assert seen["name"] == "data/train"  # not a path key: left alone


def test_module_references_find_packages_next_to_the_spec(tmp_path: Path) -> None:
    pkg = tmp_path / "ckptavg_test_pkg_7f3a"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from torch import nn\n\ndef build():\n    return nn.BatchNorm1d(3)\n")
    (tmp_path / "helper_ckptavg_7f3a.py").write_text("import torch\nDATA = [torch.randn(4, 3)]\n")
    (tmp_path / "data.py").write_text(
        "import helper_ckptavg_7f3a\n\ndef load():\n    return helper_ckptavg_7f3a.DATA\n"
    )
    spec_path = tmp_path / "bn.toml"
    spec_path.write_text('[model]\nfactory = "ckptavg_test_pkg_7f3a.nets:build"\n[data]\nloader = "data.py:load"\n')
    try:
        spec = load_spec(spec_path)
        assert isinstance(spec.build_model(), nn.BatchNorm1d)
        assert spec.build_loader()[0].shape == (4, 3)
    finally:
        for name in ("ckptavg_test_pkg_7f3a", "ckptavg_test_pkg_7f3a.nets", "helper_ckptavg_7f3a"):
            sys.modules.pop(name, None)
    assert str(tmp_path) not in sys.path  # only on sys.path while importing


def test_reference_forms_and_module_level_iterables(tmp_path: Path) -> None:
    spec = load_spec(
        make(
            tmp_path,
            """
            [model]
            factory = "torch.nn.BatchNorm2d"
            args = [3]
            [data]
            loader = "models.py:LOADER"
            call = "models.py:forward"
            """,
        )
    )
    assert isinstance(spec.build_model(), nn.BatchNorm2d)
    assert spec.build_loader()[0].shape == (2, 3, 5, 5)
    assert spec.call_function is not None and spec.call_function.__name__ == "forward"


def test_dataset_with_batching_and_transforms(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    spec = load_spec(
        make(
            tmp_path,
            """
            [model]
            factory = "models.py:build"
            [data]
            dataset = "models.py:Squares"
            kwargs = { root = "data", n = 10 }
            transforms = [
                { name = "Resize", args = [[4, 4]], kwargs = { antialias = true } },
                { name = "ToDtype", args = ["float64"] },
                { name = "Normalize", kwargs = { mean = [1.0, 1.0, 1.0], std = [2.0, 2.0, 2.0] } },
            ]
            batch_size = 4
            num_workers = 0
            """,
        )
    )
    assert [t.name for t in spec.transforms] == ["Resize", "ToDtype", "Normalize"]
    loader = spec.build_loader()
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size == 4
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    x, y = batches[1]
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float64
    torch.testing.assert_close(x[:, 0, 0, 0], (torch.arange(4, 8, dtype=torch.float64) - 1) / 2, atol=1e-5, rtol=0)
    assert loader.dataset.root == str(tmp_path / "data")


def test_imagefolder_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / "images" / "train" / label).mkdir(parents=True)
        for i in range(3):
            color = (40 * i, 200 if label == "dogs" else 10, 90)
            Image.new("RGB", (10, 12), color).save(tmp_path / "images" / "train" / label / f"{i}.png")
    spec_path = make(
        tmp_path,
        """
        [model]
        factory = "models.py:build"
        kwargs = { width = 3 }
        [data]
        dataset = "torchvision.datasets:ImageFolder"
        kwargs = { root = "images/train" }
        transforms = [ { name = "Resize", args = [[8, 8]] }, "ToImage",
                       { name = "ToDtype", args = ["torch.float32"], kwargs = { scale = true } } ]
        batch_size = 4
        """,
    )
    spec = load_spec(spec_path)
    sd = spec.build_model().state_dict()
    out, report = recalibrate_state_dict(sd, spec)
    assert report.batches == 2 and report.samples == 6 and report.layers == ["1"]
    assert not torch.equal(out["1.running_mean"], sd["1.running_mean"])


def test_torchvision_is_imported_only_when_the_spec_uses_it(tmp_path: Path) -> None:
    spec_path = make(tmp_path, GOOD)
    code = textwrap.dedent(
        f"""
        import sys
        import ckptavg.bn
        assert "torchvision" not in sys.modules, "imported by ckptavg.bn/spec"
        spec = ckptavg.bn.load_spec({str(spec_path)!r})
        sd = spec.build_model().state_dict()
        ckptavg.bn.recalibrate_state_dict(sd, spec)
        assert "torchvision" not in sys.modules, "imported by a spec that does not use it"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_run_device(tmp_path: Path) -> None:
    spec = load_spec(make(tmp_path, GOOD + '\n[run]\ndevice = "cpu"\n'))
    assert spec.resolve_device() == torch.device("cpu")
    assert spec.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OptionError, match="device 'tpu9': not a device"):
        spec.resolve_device("tpu9")


# -- every mistake: one line naming the file and the entry --------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path so that messages start with the plain name 'bn.toml: '."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS_PY)
    return tmp_path


def err(folder: Path, text: str) -> str:
    (folder / "bn.toml").write_text(textwrap.dedent(text))
    return spec_error("bn.toml")


MODEL = '[model]\nfactory = "models.py:build"\n'
DATA = '[data]\nloader = "models.py:batches"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the file itself
        ("[model\n", "bn.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"),
        (MODEL + DATA + "[modle]\n", "bn.toml: [modle]: unknown section (did you mean [model]? expected "),
        ("run = 3\n" + MODEL + DATA, "bn.toml: [run]: expected a table (section), got int 3"),
        (MODEL, "bn.toml: [data]: missing section"),
        ("[model]\n" + DATA, "bn.toml: [model].factory: missing"),
        # unknown keys
        (
            MODEL + '[data]\nlodaer = "models.py:batches"\n',
            "bn.toml: [data].lodaer: unknown key (did you mean 'loader'?",
        ),
        (MODEL + "factroy = 1\n" + DATA, "bn.toml: [model].factroy: unknown key (did you mean 'factory'?"),
        (MODEL + DATA + "[run]\ndevices = 'cpu'\n", "bn.toml: [run].devices: unknown key (did you mean 'device'?"),
        # wrong types
        (MODEL + "kwargs = 3\n" + DATA, "bn.toml: [model].kwargs: expected a table, got int 3"),
        (MODEL + "args = 'x'\n" + DATA, "bn.toml: [model].args: expected an array, got str 'x'"),
        (MODEL + "prefix = 1\n" + DATA, "bn.toml: [model].prefix: expected a string, got int 1"),
        ("[model]\nfactory = 3\n" + DATA, "bn.toml: [model].factory: expected a non-empty string, got int 3"),
        (
            MODEL + DATA + "max_batches = 'ten'\n",
            "bn.toml: [data].max_batches: expected a positive integer, got str 'ten'",
        ),
        (MODEL + DATA + "max_batches = 0\n", "bn.toml: [data].max_batches: expected a positive integer, got int 0"),
        (
            MODEL + DATA + "input = true\n",
            "bn.toml: [data].input: expected an index (integer) or a key (string), got bool True",
        ),
        (
            MODEL + DATA + "input = 1.5\n",
            "bn.toml: [data].input: expected an index (integer) or a key (string), got float 1.5",
        ),
        (MODEL + DATA + "[run]\ndevice = 0\n", "bn.toml: [run].device: expected a non-empty string, got int 0"),
        # loader / dataset / input / call combinations
        (
            MODEL + "[data]\nmax_batches = 3\n",
            "bn.toml: [data]: give exactly one of 'loader' or 'dataset' (found neither)",
        ),
        (
            MODEL + DATA + 'dataset = "models.py:Squares"\n',
            "bn.toml: [data]: give exactly one of 'loader' or 'dataset' (found both)",
        ),
        (MODEL + DATA + "batch_size = 4\n", "bn.toml: [data].batch_size: only valid with 'dataset'"),
        (
            MODEL + DATA + 'input = 0\ncall = "models.py:forward"\n',
            "bn.toml: [data].call: give either 'input' or 'call', not both",
        ),
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\nbatch_size = -2\n',
            "bn.toml: [data].batch_size: expected a positive integer, got int -2",
        ),
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\nnum_workers = -1\n',
            "bn.toml: [data].num_workers: expected an integer >= 0, got int -1",
        ),
        # references
        (
            MODEL + '[data]\nloader = "my_pkg.data:train_loader"\n',
            "bn.toml: [data].loader: cannot import 'my_pkg.data': No module named 'my_pkg'",
        ),
        (
            '[model]\nfactory = "models.py:biuld"\n' + DATA,
            "bn.toml: [model].factory: 'models.py' has no attribute 'biuld'",
        ),
        ('[model]\nfactory = "torch.nn:Nope"\n' + DATA, "bn.toml: [model].factory: 'torch.nn' has no attribute 'Nope'"),
        (
            '[model]\nfactory = "models.py:build.x"\n' + DATA,
            "bn.toml: [model].factory: 'models.py:build' has no attribute 'x'",
        ),
        ('[model]\nfactory = "nets/none.py:build"\n' + DATA, "bn.toml: [model].factory: no such file: '"),
        (
            '[model]\nfactory = "build"\n' + DATA,
            "bn.toml: [model].factory: 'build' is not a reference: expected 'module:attribute'",
        ),
        (
            '[model]\nfactory = "models.py:CONSTANT"\n' + DATA,
            "bn.toml: [model].factory: 'models.py:CONSTANT' is int 3, not callable",
        ),
        (
            MODEL + '[data]\nloader = "models.py:CONSTANT"\n',
            "bn.toml: [data].loader: 'models.py:CONSTANT' is int 3: neither callable nor iterable",
        ),
        (
            MODEL + DATA + 'call = "models.py:CONSTANT"\n',
            "bn.toml: [data].call: 'models.py:CONSTANT' is int 3, not callable",
        ),
        (
            MODEL + '[data]\nloader = "models.py:LOADER"\nkwargs = { n = 1 }\n',
            "bn.toml: [data].kwargs: 'models.py:LOADER' is not callable",
        ),
        # transforms and devices
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\ntransforms = [{ name = "Rezise", args = [4] }]\n',
            "bn.toml: [data].transforms[0].name: unknown transform 'Rezise': "
            "not in torchvision.transforms.v2 (did you mean 'Resize'?)",
        ),
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\ntransforms = ["ToImage", { name = "Resize" }]\n',
            "bn.toml: [data].transforms[1]: Resize(...) failed: TypeError: ",
        ),
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\ntransforms = [{ name = "Resize", size = 4 }]\n',
            "bn.toml: [data].transforms[0].size: unknown key (expected one of: name, args, kwargs)",
        ),
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\ntransforms = [3]\n',
            "bn.toml: [data].transforms[0]: expected a table",
        ),
        (
            MODEL
            + '[data]\ndataset = "models.py:Squares"\ntransforms = ["ToImage"]\n'
            + 'kwargs = { root = "x", transform = "y" }\n',
            "bn.toml: [data].transforms: [data].kwargs already has a 'transform'",
        ),
        (MODEL + DATA + '[run]\ndevice = "gpu"\n', "bn.toml: [run].device: 'gpu': not a device ("),
        (MODEL + DATA + '[run]\ndevice = "meta"\n', "bn.toml: [run].device: 'meta': the meta device holds no data"),
    ],
)
def test_spec_mistakes(in_tmp: Path, text: str, expected: str) -> None:
    if "transforms" in text:
        pytest.importorskip("torchvision")
    assert err(in_tmp, text).startswith(expected)


def test_missing_spec_file(in_tmp: Path) -> None:
    assert spec_error("nope.toml") == "nope.toml: cannot read the spec: No such file or directory"


def test_module_raising_while_imported(in_tmp: Path) -> None:
    (in_tmp / "broken_models.py").write_text("import torch\nraise RuntimeError('half-written file')\n")
    msg = err(in_tmp, '[model]\nfactory = "broken_models.py:build"\n' + DATA)
    assert msg == "bn.toml: [model].factory: cannot import 'broken_models.py': RuntimeError: half-written file"
    (in_tmp / "syntax_models.py").write_text("def build(:\n")
    msg = err(in_tmp, '[model]\nfactory = "syntax_models.py:build"\n' + DATA)
    assert msg.startswith("bn.toml: [model].factory: cannot import 'syntax_models.py': SyntaxError: ")


def test_unavailable_device_fails_when_used(in_tmp: Path) -> None:
    (in_tmp / "bn.toml").write_text(MODEL + DATA + '[run]\ndevice = "cuda:99"\n')
    spec = load_spec("bn.toml")  # well-formed; this machine may lack it: checked when it is used
    with pytest.raises(SpecError) as info:
        spec.resolve_device()
    assert str(info.value).startswith("bn.toml: [run].device: 'cuda:99': ")
    assert spec.resolve_device("cpu") == torch.device("cpu")  # an override (e.g. --device) wins


@pytest.mark.parametrize(
    ("text", "build", "expected"),
    [
        (
            '[model]\nfactory = "models.py:failing_factory"\n' + DATA,
            "model",
            "bn.toml: [model].factory: 'models.py:failing_factory' raised ValueError: no such architecture",
        ),
        (
            '[model]\nfactory = "models.py:not_a_model"\n' + DATA,
            "model",
            "bn.toml: [model].factory: 'models.py:not_a_model' returned int 3, not a torch.nn.Module",
        ),
        (
            '[model]\nfactory = "models.py:build"\nkwargs = { depth = 3 }\n' + DATA,
            "model",
            "bn.toml: [model].factory: 'models.py:build' raised TypeError: "
            "build() got an unexpected keyword argument 'depth'",
        ),
        (
            MODEL + '[data]\nloader = "models.py:not_iterable"\n',
            "loader",
            "bn.toml: [data].loader: 'models.py:not_iterable' returned int 42, not an iterable of batches",
        ),
        (
            MODEL + '[data]\nloader = "models.py:batches"\nkwargs = { size = 3 }\n',
            "loader",
            "bn.toml: [data].loader: 'models.py:batches' raised TypeError: "
            "batches() got an unexpected keyword argument 'size'",
        ),
        (
            MODEL + '[data]\ndataset = "models.py:Squares"\n',
            "loader",
            "bn.toml: [data].dataset: 'models.py:Squares' raised TypeError: "
            "Squares.__init__() missing 1 required positional",
        ),
    ],
)
def test_errors_raised_by_user_code_when_building(in_tmp: Path, text: str, build: str, expected: str) -> None:
    (in_tmp / "bn.toml").write_text(text)
    spec = load_spec("bn.toml")
    with pytest.raises(SpecError) as info:
        spec.build_model() if build == "model" else spec.build_loader()
    assert "\n" not in str(info.value) and str(info.value).startswith(expected)


def test_defaults(in_tmp: Path) -> None:
    (in_tmp / "bn.toml").write_text(MODEL + '[data]\ndataset = "models.py:Squares"\nkwargs = { root = "r" }\n')
    spec = load_spec("bn.toml")
    assert spec.batch_size == DEFAULT_BATCH_SIZE and spec.num_workers == 0 and spec.transforms == []
    loader = spec.build_loader()
    assert loader.batch_size == DEFAULT_BATCH_SIZE and len(list(loader)) == 1

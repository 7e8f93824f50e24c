"""ckptavg sweep / soup against loops written here with ckptavg.average + ckptavg.recalibrate_bn + the metric."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptavg
from ckptavg.errors import OptionError, SpecError

HELPERS = '''
import torch
from torch import nn
from sklearn.datasets import load_digits

_D = load_digits()
X = torch.tensor(_D.data, dtype=torch.float32) / 16.0
Y = torch.tensor(_D.target)


def build(width=12):
    return nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 10))


def build_plain(width=12):
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def train_loader(batch_size=200):
    return [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, 1200, batch_size)]


def val_loader(batch_size=300):
    return [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(1200, 1797, batch_size)]


def loss(model, loader):
    total = n = 0
    for x, y in loader:
        total += nn.functional.cross_entropy(model(x), y, reduction="sum").item()
        n += len(y)
    return total / n


def accuracy(model, loader):
    right = n = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item()
        n += len(y)
    return right / n


def not_a_number(model, loader):
    return "high"
'''

SPEC = '''
[model]
factory = "evalmod.py:{factory}"
[data]
loader = "evalmod.py:train_loader"
[eval]
loader = "evalmod.py:val_loader"
metric = "evalmod.py:{metric}"
higher_is_better = {higher}
'''


def _load_helpers(folder: Path):
    spec = importlib.util.spec_from_file_location("_test_sweep_evalmod", folder / "evalmod.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 epochs of noisy SGD on digits (BN and plain MLP), one checkpoint per epoch."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "evalmod.py").write_text(HELPERS)
    mod = _load_helpers(root)
    out = {}
    for factory in ("build", "build_plain"):
        torch.manual_seed(0)
        net = getattr(mod, factory)()
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        folder = root / f"ck_{factory}"
        folder.mkdir()
        step = 0
        for epoch in range(1, 9):
            net.train()
            for x, y in mod.train_loader(50):
                step += 1
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            torch.save({"epoch": epoch, "step": step, "state_dict": net.state_dict()},
                       folder / f"epoch={epoch:02d}-step={step:04d}.ckpt")
        out[factory] = folder
    return root, mod, out


def _spec(root: Path, name: str, factory: str = "build", metric: str = "loss", higher: bool = False) -> Path:
    path = root / name
    path.write_text(SPEC.format(factory=factory, metric=metric, higher="true" if higher else "false"))
    return path


def _reference_score(mod, sd, *, recalibrate: bool, factory: str = "build", metric: str = "loss") -> float:
    net = getattr(mod, factory)()
    net.load_state_dict(sd)
    if recalibrate:
        ckptavg.recalibrate_bn(net, mod.train_loader(), mode="precise")
    net.eval()
    with torch.no_grad():
        return getattr(mod, metric)(net, mod.val_loader())


def _better(a, b, higher):
    return a > b if higher else a < b


def test_sweep_winner_and_scores_match_a_loop(run, tmp_path):
    root, mod, folders = run
    ck = folders["build"]
    spec = _spec(root, "loss.toml")
    out = tmp_path / "best.safetensors"
    report = ckptavg.sweep(ck, spec, out, last="2,4,8", method="uniform,ema", decay="0.7")

    paths = sorted(ck.glob("*.ckpt"))
    singles = [_reference_score(mod, ckptavg.average([p]), recalibrate=False) for p in paths]
    best_k = min(range(len(paths)), key=lambda k: (singles[k], k))
    expected = [("last checkpoint", singles[-1]), ("best checkpoint", singles[best_k])]
    states = [ckptavg.average([paths[-1]]), ckptavg.average([paths[best_k]])]
    for k in (2, 4, 8):
        for opts, label in (({"method": "uniform"}, "uniform"), ({"method": "ema", "decay": 0.7}, "ema decay=0.7")):
            avg = ckptavg.average(paths, last=k, **opts)
            net = mod.build()
            net.load_state_dict(avg)
            ckptavg.recalibrate_bn(net, mod.train_loader(), mode="precise")
            states.append({n: t.clone() for n, t in net.state_dict().items()})
            expected.append((f"{label}, last {k}", _reference_score(mod, avg, recalibrate=True)))
    assert [r.name for r in report.rows] == [name for name, _ in expected]
    for row, (_, score) in zip(report.rows, expected):
        assert row.score == pytest.approx(score, rel=1e-6, abs=1e-9)
    assert report.rows[1].checkpoints == [str(paths[best_k])]
    win = 0
    for i, (_, score) in enumerate(expected):
        if _better(score, expected[win][1], higher=False):
            win = i
    assert report.winner.name == expected[win][0]
    assert [r.winner for r in report.rows].count(True) == 1
    # the file holds the winner's (recalibrated) weights and the table
    written = load_file(out)
    for name, t in states[win].items():
        torch.testing.assert_close(written[name], t.to(written[name].dtype), rtol=1e-6, atol=1e-7)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    table = json.loads(meta["ckptavg_sweep"])
    assert table["winner"] == report.winner.name
    assert [r["score"] for r in table["rows"]] == [r.score for r in report.rows]
    assert "ckptavg_inputs" in meta
    # the human table marks the winner
    line = next(x for x in report.format().splitlines() if x.strip().startswith("*"))
    assert report.winner.name in line


def test_sweep_higher_is_better_and_ties_go_to_the_earlier_row(run):
    root, mod, folders = run
    ck = folders["build"]
    spec = _spec(root, "acc.toml", metric="accuracy", higher=True)
    report = ckptavg.sweep(ck, spec, epochs="3:,5:", method="uniform")
    paths = sorted(ck.glob("*.ckpt"))
    singles = [_reference_score(mod, ckptavg.average([p]), recalibrate=False, metric="accuracy") for p in paths]
    best_k = max(range(len(paths)), key=lambda k: (singles[k], -k))  # ties: the earliest checkpoint
    assert report.rows[1].checkpoints == [str(paths[best_k])]
    scores = [singles[-1], singles[best_k]]
    for first in (3, 5):
        avg = ckptavg.average(paths, epochs=f"{first}:")
        scores.append(_reference_score(mod, avg, recalibrate=True, metric="accuracy"))
    assert [r.score for r in report.rows] == pytest.approx(scores)
    win = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert report.rows[win].winner


def test_soup_matches_a_greedy_soup_written_here(run, tmp_path):
    root, mod, folders = run
    ck = folders["build"]
    spec = _spec(root, "loss.toml")
    out = tmp_path / "soup.pt"
    png = tmp_path / "soup.png"
    report = ckptavg.soup(ck, spec, out, epochs="2:", plot=png)

    paths = sorted(ck.glob("*.ckpt"))[1:]
    own = [_reference_score(mod, ckptavg.average([p]), recalibrate=False) for p in paths]
    ranked = sorted(range(len(paths)), key=lambda k: (own[k], k))
    soup, score = [ranked[0]], own[ranked[0]]
    decisions = []
    for k in ranked[1:]:
        trial = sorted(soup + [k])
        s = _reference_score(mod, ckptavg.average([paths[j] for j in trial], order="given"), recalibrate=True)
        decisions.append(s <= score)
        if s <= score:
            soup, score = trial, s
    assert [s.checkpoint for s in report.steps] == [str(paths[k]) for k in ranked]
    assert [s.added for s in report.steps[1:]] == decisions
    assert report.members == [str(paths[k]) for k in soup]
    assert report.score == pytest.approx(score, rel=1e-6)
    uniform = _reference_score(mod, ckptavg.average(paths), recalibrate=True)
    assert report.uniform_score == pytest.approx(uniform, rel=1e-6)
    # the written soup is the recalibrated uniform average of the members
    expected = ckptavg.average([paths[k] for k in soup], order="given")
    if len(soup) > 1:
        net = mod.build()
        net.load_state_dict(expected)
        ckptavg.recalibrate_bn(net, mod.train_loader(), mode="precise")
        expected = net.state_dict()
    written = torch.load(out, weights_only=True)
    for name, t in expected.items():
        torch.testing.assert_close(written[name], t, rtol=1e-6, atol=1e-7)
    sidecar = json.loads(Path(str(out) + ".ckptavg.json").read_text())
    assert sidecar["ckptavg_soup"]["members"] == report.members
    assert [q.name for q in out.parent.iterdir() if q.name.endswith(".ckptavg-tmp")] == []  # both atomic
    # the plot drew the soup's score after each step and the baselines
    data = report.plot
    running, cur = [], None
    for s in report.steps:
        cur = s.score if s.added else cur
        running.append(cur)
    assert data.series["soup"][1] == pytest.approx(running)
    assert data.series["tried"][1] == pytest.approx([s.score for s in report.steps])
    assert data.baselines["uniform soup"] == pytest.approx(report.uniform_score)
    assert data.baselines["best ingredient"] == pytest.approx(own[ranked[0]])
    _check_png(png)


def _check_png(path: Path) -> None:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert 300 <= width <= 2000 and 200 <= height <= 2000
    assert 5_000 < path.stat().st_size < 500_000


def test_sweep_plot_values_are_the_table(run, tmp_path):
    pytest.importorskip("matplotlib")
    root, _, folders = run
    spec = _spec(root, "loss.toml")
    png = tmp_path / "sweep.png"
    report = ckptavg.sweep(folders["build"], spec, last="2,4,8", plot=png)
    _check_png(png)
    data = report.plot
    rows = [r for r in report.rows if r.kind == "average"]
    assert data.kind == "line" and data.series["uniform"] == ([2.0, 4.0, 8.0], [r.score for r in rows])
    assert data.baselines == {"last checkpoint": report.rows[0].score, "best checkpoint": report.rows[1].score}
    # one window, several decays: metric against decay
    report = ckptavg.sweep(folders["build"], spec, last="4", method="ema", decay="0.3,0.6,0.9", plot=png)
    assert report.plot.xlabel == "decay"
    rows = [r for r in report.rows if r.kind == "average"]
    assert report.plot.series["ema, last 4"] == ([0.3, 0.6, 0.9], [r.score for r in rows])
    # mixed methods, one window: a bar per candidate
    report = ckptavg.sweep(folders["build"], spec, last="4", method="uniform,ema", decay="0.9", plot=png)
    rows = [r for r in report.rows if r.kind == "average"]
    assert report.plot.kind == "bar" and report.plot.bars == {r.name: r.score for r in rows}


def test_model_without_bn_is_not_recalibrated(run):
    root, mod, folders = run
    spec = _spec(root, "plain.toml", factory="build_plain")
    report = ckptavg.sweep(folders["build_plain"], spec, last="3")
    paths = sorted(folders["build_plain"].glob("*.ckpt"))
    avg = _reference_score(mod, ckptavg.average(paths, last=3), recalibrate=False, factory="build_plain")
    assert report.rows[-1].score == pytest.approx(avg, rel=1e-6)
    assert not report.rows[-1].bn_recalibrated


def test_default_windows_and_duplicates(run):
    from ckptavg.sweeps import sweep_candidates

    names = [c.name for c in sweep_candidates(10)]
    assert names == ["uniform, last 2", "uniform, last 4", "uniform, last 8", "uniform, all"]
    names = [c.name for c in sweep_candidates(8, epochs="3:", method="uniform,ema,power-ema", decay="0.5,0.9",
                                              sigma_rel="0.1")]
    assert names == ["uniform, epochs 3:", "ema decay=0.5, epochs 3:", "ema decay=0.9, epochs 3:",
                     "power-ema sigma_rel=0.1, epochs 3:"]
    root, _, folders = run
    report = ckptavg.sweep(folders["build"], _spec(root, "loss.toml"), last="2,8,20")
    # --last 20 selects the same 8 checkpoints as --last 8: evaluated once, with a note
    assert [r.name for r in report.rows][2:] == ["uniform, last 2", "uniform, last 8"]
    assert any("last 20" in n for n in report.notes)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "ema"}, "needs --decay"),
    ({"method": "uniform", "decay": "0.9"}, "add ema to --method"),
    ({"method": "power-ema"}, "needs --sigma-rel"),
    ({"last": "2,x"}, "--last: bad value 'x'"),
    ({"last": "0"}, "--last: bad value"),
    ({"method": "mean"}, "not one of"),
    ({"max_memory": "1KB"}, "over --max-memory"),
])
def test_sweep_option_errors(run, kwargs, message):
    root, _, folders = run
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        ckptavg.sweep(folders["build"], _spec(root, "loss.toml"), **kwargs)


def test_spec_eval_errors(run, tmp_path):
    root, _, folders = run
    base = '[model]\nfactory = "evalmod.py:build"\n[data]\nloader = "evalmod.py:train_loader"\n'
    cases = [
        ("", "bn.toml: [eval]: missing section"),
        ('[eval]\nloader = "evalmod.py:val_loader"\n', "[eval].metric: missing"),
        ('[eval]\nloader = "evalmod.py:val_loader"\nmetric = "evalmod.py:nope"\n',
         "[eval].metric: 'evalmod.py' has no attribute 'nope'"),
        ('[eval]\nmetric = "evalmod.py:loss"\n', "[eval]: give exactly one of 'loader' or 'dataset'"),
        ('[eval]\nloader = "evalmod.py:val_loader"\nmetric = "evalmod.py:loss"\nhigher_is_better = "no"\n',
         "[eval].higher_is_better: expected true or false"),
        ('[eval]\nloader = "evalmod.py:val_loader"\nmetric = "evalmod.py:loss"\nmetrc = 1\n',
         "[eval].metrc: unknown key (did you mean 'metric'?"),
        ('[eval]\nloader = "evalmod.py:val_loader"\nmetric = "evalmod.py:not_a_number"\n',
         "[eval].metric: 'evalmod.py:not_a_number' returned str 'high', not a number"),
    ]
    for body, message in cases:
        spec = root / "bn.toml"
        spec.write_text(base + body)
        with pytest.raises(SpecError) as err:
            ckptavg.sweep(folders["build"], spec, last="2")
        assert message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    # specs without [eval] still load for merge/bn
    spec.write_text(base)
    assert ckptavg.merge(folders["build"], tmp_path / "m.pt", last=2, bn_spec=spec).bn is not None


def test_cli_sweep_and_soup(run, run_cli, tmp_path):
    root, _, folders = run
    spec = _spec(root, "loss.toml")
    out = tmp_path / "best.pt"
    code, stdout, err = run_cli("sweep", str(folders["build"]), "--spec", str(spec), "--last", "2,4", "-o", str(out),
                                "--json")
    assert code == 0, err
    table = json.loads(stdout)
    assert table["winner"] in [r["name"] for r in table["rows"]] and out.exists()
    code, stdout, err = run_cli("soup", str(folders["build"]), "--spec", str(spec), "--last", "3")
    assert code == 0, err
    assert "greedy soup:" in stdout and "uniform soup of all 3:" in stdout
    code, _, err = run_cli("sweep", str(folders["build"]), "--spec", str(spec), "--method", "ema")
    assert code == 2 and err.startswith("ckptavg: error: --method ema in a sweep needs --decay")


def test_nan_scores_never_win():
    from ckptavg.evaluate import is_better

    assert not is_better(math.nan, 1.0, True) and is_better(1.0, math.nan, False)
    assert ckptavg.sweep  # lazily exported
    assert callable(ckptavg.soup) and ckptavg.SweepReport.__name__ == "SweepReport"

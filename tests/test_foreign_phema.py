"""Power-EMA snapshots written by other tools reconstruct exactly: EDM2's
``network-snapshot-<kimg>-<std>.pkl`` (profile and time from the name) and ema-pytorch's PostHocEMA
folder of ``<index>.<step>.pt`` (profiles from --snapshot-sigma-rels or ckptavg-snapshots.json).

The references are independent: EDM2's Algorithm 3 written out here in numpy (exponent from the cubic
of its Algorithm 2, closed-form profile inner products, ``solve``, columns normalised to sum 1), and the
merged tensors against a float64 weighted sum of the files' tensors."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch

import ckptavg

SHAPES = {"net.weight": (5, 3), "net.bias": (5,)}


def _exponent(std: float) -> float:
    """The power-EMA exponent of a relative width (the largest real root of EDM2's cubic)."""
    s2 = std ** -2.0
    return float(np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2]).real.max())


def _inner(t_a, g_a, t_b, g_b):
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    # <p_a, p_b> = (g_a+1)(g_b+1) min^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)), scaled by hi
    ratio = lo / hi
    ea = np.where(t_a <= t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) * ratio ** ea / ((g_a + g_b + 1) * hi)


def _edm2_coefficients(t_in, std_in, t_out, std_out):
    t = np.float64(t_in)
    g = np.float64([_exponent(s) for s in std_in])
    A = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _inner(t, g, np.float64(t_out), _exponent(std_out))
    x = np.linalg.solve(A, b)
    return x / x.sum()


def _nimg(kimg):
    n = (kimg * 1000 + 999) // 1024 * 1024
    return n if n // 1000 == kimg else kimg * 1000


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _weighted(files, coeffs, load):
    out = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    for f, c in zip(files, coeffs):
        for k, v in load(f).items():
            out[k] += float(c) * v.double()
    return out


def _close(got, ref):
    for k, v in ref.items():
        assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-5), k


def _one_line(err):
    """The error is one line, the last (warnings before it, such as --trust-pickle's, aside)."""
    lines = err.strip().splitlines()
    errors = [x for x in lines if x.startswith("ckptavg: error:")]
    return len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err


# ---------------------------------------------------------------- ema-pytorch PostHocEMA folders

SIGMAS = (0.05, 0.28)
STEPS = range(100, 1300, 100)


def _ema_pytorch_folder(folder):
    """ema-pytorch 0.8 layout: KarrasEMA's state dict ("ema_model.*", "initted", "step"), all in the
    checkpoint dtype, one file per profile index and step."""
    folder.mkdir()
    files, t_in, std_in = [], [], []
    for ind, sigma in enumerate(SIGMAS):
        for step in STEPS:
            sd = {"initted": torch.tensor(1.0), "step": torch.tensor(float(step))}
            sd.update({f"ema_model.{k}": v for k, v in _tensors(ind * 10_000 + step).items()})
            f = folder / f"{ind}.{step}.pt"
            torch.save(sd, f)
            files.append(f)
            t_in.append(step)
            std_in.append(sigma)
    return files, t_in, std_in


def _load_karras(f):
    return {k.removeprefix("ema_model."): v for k, v in torch.load(f).items() if k.startswith("ema_model.")}


@pytest.mark.parametrize("at", [None, 800])
def test_ema_pytorch_folder_with_the_option(tmp_path, run_cli, at):
    files, t_in, std_in = _ema_pytorch_folder(tmp_path / "snaps")
    t_out = at or max(t_in)
    keep = [i for i, t in enumerate(t_in) if t <= t_out]
    coeffs = _edm2_coefficients([t_in[i] for i in keep], [std_in[i] for i in keep], t_out, 0.15)
    args = ["--method", "power-ema", "--sigma-rel", "0.15", "--snapshot-sigma-rels", "0.05,0.28"]
    args += ["--at", str(at)] if at else []
    out = tmp_path / "ema.pt"
    code, _, err = run_cli("merge", tmp_path / "snaps", *args, "-o", out)
    assert code == 0, err
    got = torch.load(out)
    assert set(got) == set(SHAPES)  # the EMA model's own weights, without KarrasEMA's counters
    _close(got, _weighted([files[i] for i in keep], coeffs, _load_karras))
    # the weights chosen equal EDM2's coefficients
    p = ckptavg.plan(tmp_path / "snaps", method="power-ema", sigma_rel=0.15, snapshot_sigma_rels="0.05,0.28", at=at)
    by_path = {i.path: i.weight for i in p.inputs}
    assert np.allclose([by_path[files[i]] for i in keep], coeffs, rtol=0, atol=1e-8)
    assert all(by_path[f] == 0 for i, f in enumerate(files) if i not in keep)


def test_ema_pytorch_folder_with_the_sidecar(tmp_path, run_cli):
    files, t_in, std_in = _ema_pytorch_folder(tmp_path / "snaps")
    (tmp_path / "snaps" / "ckptavg-snapshots.json").write_text(json.dumps({"sigma_rels": list(SIGMAS)}))
    out = tmp_path / "ema.safetensors"
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.1", "-o", out)
    assert code == 0, err
    from safetensors.torch import load_file

    coeffs = _edm2_coefficients(t_in, std_in, max(t_in), 0.1)
    _close(load_file(out), _weighted(files, coeffs, _load_karras))
    # the option and the sidecar must agree
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.1",
                           "--snapshot-sigma-rels", "0.05,0.2", "-o", tmp_path / "o.pt")
    assert code == 2 and _one_line(err) and "ckptavg-snapshots.json" in err
    assert not (tmp_path / "o.pt").exists()


def test_inspect_shows_ema_pytorch_steps_and_profiles(tmp_path):
    files, t_in, std_in = _ema_pytorch_folder(tmp_path / "snaps")
    (tmp_path / "snaps" / "ckptavg-snapshots.json").write_text(json.dumps({"sigma_rels": list(SIGMAS)}))
    report = ckptavg.inspect(tmp_path / "snaps")
    got = {c.path: (c.step, c.sigma_rel) for c in report.checkpoints}
    assert got == {f: (t, s) for f, t, s in zip(files, t_in, std_in)}
    assert report.consistent and set(report.checkpoints[0].names) == set(SHAPES)  # KarrasEMA's counters left out


def test_ema_pytorch_folder_without_profiles_is_one_line_error(tmp_path, run_cli):
    _ema_pytorch_folder(tmp_path / "snaps")
    out = tmp_path / "ema.pt"
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.15", "-o", out)
    assert code == 2 and _one_line(err) and "--snapshot-sigma-rels" in err and "0.100.pt" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    # an index beyond the profiles given, and the option where no input is such a snapshot
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.15",
                           "--snapshot-sigma-rels", "0.05", "-o", out)
    assert code == 2 and _one_line(err) and "1.100.pt" in err and "index 1" in err
    torch.save(_tensors(0), tmp_path / "plain-1.pt")
    torch.save(_tensors(1), tmp_path / "plain-2.pt")
    code, _, err = run_cli("merge", tmp_path / "plain-1.pt", tmp_path / "plain-2.pt", "--snapshot-sigma-rels",
                           "0.05,0.28", "-o", out)
    assert code == 2 and _one_line(err) and "<index>.<step>.pt" in err
    assert not out.exists()


def test_folder_written_by_ema_pytorch_itself(tmp_path, run_cli):
    """The layout as ema-pytorch's PostHocEMA writes it (when the package is installed: the dev extra)."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    ema = ema_pytorch.PostHocEMA(net, sigma_rels=SIGMAS, update_every=1, checkpoint_every_num_steps=25,
                                 checkpoint_folder=str(tmp_path / "snaps"), checkpoint_dtype=torch.float32)
    for _ in range(200):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.update()
    files = sorted((tmp_path / "snaps").glob("*.pt"))
    assert len(files) == 16
    ind_step = [tuple(map(int, f.stem.split("."))) for f in files]
    coeffs = _edm2_coefficients([s for _, s in ind_step], [SIGMAS[i] for i, _ in ind_step], 200, 0.15)
    out = tmp_path / "ema.pt"
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.15",
                           "--snapshot-sigma-rels", "0.05,0.28", "-o", out)
    assert code == 0, err
    got = torch.load(out)
    assert set(got) == set(net.state_dict())
    ref = {k: sum(float(c) * _load_karras(f)[k].double() for f, c in zip(files, coeffs)) for k in got}
    for k in got:
        assert torch.allclose(got[k].double(), ref[k], rtol=1e-5, atol=1e-5), k
    net.load_state_dict(got)  # the bare model's state dict


# ---------------------------------------------------------------- EDM2 network snapshots

KIMGS = (512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
STDS = (0.05, 0.1)


def _edm2_folder(folder, ext=".pkl"):
    folder.mkdir()
    files, t_in, std_in = [], [], []
    for kimg in KIMGS:
        for j, std in enumerate(STDS):
            f = folder / f"network-snapshot-{kimg:07d}-{std:.3f}{ext}"
            torch.save(_tensors(kimg * 10 + j), f)
            files.append(f)
            t_in.append(_nimg(kimg))
            std_in.append(std)
    return files, t_in, std_in


@pytest.mark.parametrize("ext", [".pkl", ".pt"])
def test_edm2_named_snapshots_take_profile_and_time_from_the_name(tmp_path, run_cli, ext):
    files, t_in, std_in = _edm2_folder(tmp_path / "snaps", ext)
    coeffs = _edm2_coefficients(t_in, std_in, max(t_in), 0.15)
    p = ckptavg.plan(tmp_path / "snaps", method="power-ema", sigma_rel=0.15)
    assert [i.path for i in p.inputs] == sorted(files, key=lambda f: (t_in[files.index(f)], f.name))
    by_path = {i.path: i.weight for i in p.inputs}
    assert np.allclose([by_path[f] for f in files], coeffs, rtol=0, atol=1e-8)
    assert {i.step for i in p.inputs} == set(t_in) and {i.sigma_rel for i in p.inputs} == set(STDS)
    out = tmp_path / "phema.pt"
    code, _, err = run_cli("merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.15", "-o", out)
    assert code == 0, err
    _close(torch.load(out), _weighted(files, coeffs, torch.load))


def test_watch_picks_up_edm2_snapshots(tmp_path):
    files, _t, _s = _edm2_folder(tmp_path / "snaps")
    events: list[dict] = []
    res = ckptavg.watch(tmp_path / "snaps", tmp_path / "live.pt", once=True, settle=0, on_event=events.append,
                        method="power-ema", sigma_rel=0.15)
    assert res.updates == 1 and sum(e["event"] == "seen" for e in events) == len(files), events
    ckptavg.merge(tmp_path / "snaps", tmp_path / "ref.pt", method="power-ema", sigma_rel=0.15)
    got, ref = torch.load(tmp_path / "live.pt"), torch.load(tmp_path / "ref.pt")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_edm2_network_pickles_need_trust_pickle(tmp_path, run_cli):
    """EDM2's .pkl files are pickle.dump of a dict holding the EMA module: one clear line without
    --trust-pickle, the module's weights with it."""
    (tmp_path / "snaps").mkdir()
    files, t_in, std_in = [], [], []
    for kimg in KIMGS[:4]:
        for j, std in enumerate(STDS):
            net = torch.nn.Module()
            net.net = torch.nn.Linear(3, 5)
            with torch.no_grad():
                for name, v in _tensors(kimg * 10 + j).items():
                    net.get_parameter(name).copy_(v)
            f = tmp_path / "snaps" / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl"
            with open(f, "wb") as fh:
                pickle.dump({"ema": net, "dataset_kwargs": {"resolution": 64}}, fh)
            files.append(f)
            t_in.append(_nimg(kimg))
            std_in.append(std)
    out = tmp_path / "phema.pt"
    args = ["merge", tmp_path / "snaps", "--method", "power-ema", "--sigma-rel", "0.08", "-o", out]
    code, _, err = run_cli(*args)
    assert code == 1 and _one_line(err) and "--trust-pickle" in err and "network-snapshot-" in err
    assert not out.exists()
    code, _, err = run_cli(*args, "--trust-pickle")
    assert code == 0, err
    coeffs = _edm2_coefficients(t_in, std_in, max(t_in), 0.08)

    def load(f):
        with open(f, "rb") as fh:
            return pickle.load(fh)["ema"].state_dict()

    _close(torch.load(out), _weighted(files, coeffs, load))


def test_edm2_pickle_whose_code_is_missing_says_which_module(tmp_path, run_cli, monkeypatch):
    (tmp_path / "edm2code").mkdir()
    (tmp_path / "edm2code" / "edm2_like_net.py").write_text(
        "import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "edm2code"))
    import edm2_like_net

    f = tmp_path / "network-snapshot-0000512-0.050.pkl"
    with open(f, "wb") as fh:
        pickle.dump({"ema": edm2_like_net.Net(3, 5)}, fh)
    monkeypatch.delitem(sys.modules, "edm2_like_net")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "edm2code" not in p])
    code, _, err = run_cli("merge", f, "--trust-pickle", "-o", tmp_path / "o.pt")
    assert code == 1 and _one_line(err) and "'edm2_like_net'" in err and f.name in err and "PYTHONPATH" in err
    assert not (tmp_path / "o.pt").exists()


def test_edm2_name_contradicting_the_recorded_profile_is_an_error(tmp_path, run_cli):
    folder = tmp_path / "snaps"
    _edm2_folder(folder, ".pt")
    bad = folder / "network-snapshot-0001024-0.050.pt"
    torch.save({"state_dict": _tensors(7), "sigma_rel": 0.1}, bad)
    out = tmp_path / "o.pt"
    code, _, err = run_cli("merge", folder, "--method", "power-ema", "--sigma-rel", "0.15", "-o", out)
    assert code == 1 and _one_line(err) and bad.name in err and "0.050" in err
    assert not out.exists()
    # a recorded profile that agrees with the name (to its 3 decimals) is fine, and a recorded step wins
    torch.save({"state_dict": _tensors(7), "sigma_rel": 0.0502, "step": _nimg(1024)}, bad)
    code, _, err = run_cli("merge", folder, "--method", "power-ema", "--sigma-rel", "0.15", "-o", out)
    assert code == 0, err

"""Hostile or unlucky option values and snapshot metadata (issue 23, items 6, 11 and 13): ill-conditioned
post-hoc EMA fits, output-name templates, snapshot profiles in a file's metadata, and spec files that are
not small regular files. Each is a one-line error (or a one-line warning), never a traceback, a silent
switch of method, or an unbounded allocation."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptavg.bn.spec import MAX_SPEC_BYTES, load_spec
from ckptavg.errors import CkptavgWarning, OptionError, SpecError
from ckptavg.outputs import output_names
from ckptavg.weights import (
    POSTHOC_MAX_AMPLIFICATION,
    POSTHOC_WARN_AMPLIFICATION,
    posthoc_ema,
    sigma_rel_to_gamma,
)

G05 = sigma_rel_to_gamma(0.05)
G10 = sigma_rel_to_gamma(0.10)


def _np_posthoc(snaps, t_out, gamma):
    """The EDM2 least-squares weights in numpy float64, from the closed-form profile inner products."""
    t = np.array([float(s) for s, _ in snaps])
    g = np.array([float(x) for _, x in snaps])

    def inner(ta, ga, tb, gb):
        e = ga + gb + 1.0
        return np.exp(np.log(ga + 1) + np.log(gb + 1) - np.log(e) + e * np.log(np.minimum(ta, tb))
                      - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb))

    A = inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = inner(t, g, float(t_out), gamma)
    x = np.linalg.solve(A, b)
    return x / x.sum()


# ---------------------------------------------------------------- item 6: amplification


def test_nearly_identical_profiles_are_refused_and_the_amplification_matches_numpy():
    snaps = [(4000, sigma_rel_to_gamma(0.05)), (4000, sigma_rel_to_gamma(0.0501))]
    gamma = sigma_rel_to_gamma(0.06)
    ref = _np_posthoc(snaps, 4000, gamma)
    amp_ref = float(np.abs(ref).sum())
    assert amp_ref > POSTHOC_MAX_AMPLIFICATION  # the case is what the test claims
    with pytest.raises(OptionError, match=r"amplify the snapshots' rounding errors .* --allow-ill-conditioned") as e:
        posthoc_ema(snaps, gamma=gamma)
    assert f"{amp_ref:.3g} times" in str(e.value) and "\n" not in str(e.value)
    with pytest.warns(CkptavgWarning, match="amplify the snapshots' rounding errors") as rec:
        w = posthoc_ema(snaps, gamma=gamma, allow_ill_conditioned=True)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    np.testing.assert_allclose(w.values, ref, rtol=1e-6)
    assert w.amplification == pytest.approx(amp_ref, rel=1e-6)


def test_moderate_amplification_warns_and_proceeds():
    snaps = [(t, g) for t in (1000, 2000, 3000, 4000) for g in (G05, sigma_rel_to_gamma(0.051))]
    gamma = sigma_rel_to_gamma(0.07)
    ref = _np_posthoc(snaps, 4000, gamma)
    amp_ref = float(np.abs(ref).sum())
    assert POSTHOC_WARN_AMPLIFICATION < amp_ref < POSTHOC_MAX_AMPLIFICATION
    with pytest.warns(CkptavgWarning, match=rf"amplify the snapshots' rounding errors {amp_ref:.3g} times"):
        w = posthoc_ema(snaps, gamma=gamma)
    assert w.amplification == pytest.approx(amp_ref, rel=1e-5)


def test_well_conditioned_weights_are_unchanged_bit_for_bit_and_silent():
    snaps = [(t, g) for t in (1000, 2000, 3000, 4000) for g in (G05, G10)]
    # the weights before the amplification check (float.hex), which test_posthoc_ema checks against EDM2
    before = ['0x1.414b114c0e0a6p-26', '-0x1.ed468e24a1a5cp-22', '0x1.5e416189c532cp-14', '-0x1.29d21ebe0179fp-11',
              '0x1.5e267a7994b22p-7', '-0x1.67cd81d67efb9p-5', '0x1.bcff2b1c0df3ep-2', '0x1.32c439ebacbdbp-1']
    dense = [(t, g) for t in range(1000, 33000, 1000) for g in (G05, G10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = posthoc_ema(snaps, sigma_rel=0.07)
        wd = posthoc_ema(dense, sigma_rel=0.07)
    assert [v.hex() for v in w.values] == before
    digest = hashlib.sha256(repr([v.hex() for v in wd.values]).encode()).hexdigest()
    assert digest == "8f830eb2ee63de6756853a62bfca6fe839171ff6ddf312caa81d65c1f0dc581f"
    for s, got in ((snaps, w), (dense, wd)):
        ref = _np_posthoc(s, s[-1][0], sigma_rel_to_gamma(0.07)) if s is snaps else None
        amp = math.fsum(abs(v) for v in got.values)
        assert got.amplification == amp and 1.0 < amp < POSTHOC_WARN_AMPLIFICATION
        if ref is not None:
            assert got.amplification == pytest.approx(float(np.abs(ref).sum()), rel=1e-6)


def _snapshots(folder, sigmas, steps=(100, 200), meta_extra=None):
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    for step in steps:
        for s in sigmas:
            meta = {"step": str(step), "sigma_rel": repr(s)}
            meta.update(meta_extra or {})
            save_file({"w": torch.randn(4, 3)}, folder / f"ema-{s:.4f}-{step:08d}.safetensors", metadata=meta)


def test_cli_reports_amplification_refuses_and_proceeds_on_request(tmp_path, run_cli):
    _snapshots(tmp_path / "ok", (0.05, 0.10), steps=(100, 200, 300, 400))
    code, out, err = run_cli("merge", tmp_path / "ok", "--method", "power-ema", "--sigma-rel", "0.07",
                             "-o", tmp_path / "o.safetensors", "--dry-run")
    assert code == 0 and "amplification: " in out, out + err
    code, out, _ = run_cli("merge", tmp_path / "ok", "--method", "power-ema", "--sigma-rel", "0.07",
                           "-o", tmp_path / "o.safetensors", "--dry-run", "--json")
    d = json.loads(out)
    assert d["amplification"] == pytest.approx(math.fsum(abs(i["weight"]) for i in d["inputs"]), rel=1e-12)
    assert d["amplification"] > 1 and d["fit_error"] is not None
    _snapshots(tmp_path / "near", (0.05, 0.0501), steps=(4000,))
    args = ["merge", tmp_path / "near", "--method", "power-ema", "--sigma-rel", "0.06", "-o", tmp_path / "n.pt"]
    code, _, err = run_cli(*args)
    assert code == 2 and "--allow-ill-conditioned" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "n.pt").exists()
    with pytest.warns(CkptavgWarning, match="amplify the snapshots' rounding errors 167 times") as rec:
        code, out, err = run_cli(*args, "--allow-ill-conditioned", "--json")
    assert code == 0 and (tmp_path / "n.pt").exists(), err
    ref = _np_posthoc([(4000, sigma_rel_to_gamma(s)) for s in (0.05, 0.0501)], 4000, sigma_rel_to_gamma(0.06))
    report = json.loads(out)
    assert report["amplification"] == pytest.approx(float(np.abs(ref).sum()), rel=1e-6)
    assert report["dry_run"] is False
    assert sum("amplify" in str(r.message) for r in rec) == 1  # the CLI prints each CkptavgWarning as one line


# ---------------------------------------------------------------- item 13: output-name templates


@pytest.mark.parametrize("template", ["ck{last.foo}.pt", "ck{last[x]}.pt", "ck{last[0]}.pt", "ck{last:999999999}.pt",
                                      "ck{last:0999999999999999999}.pt", "ck{last:{last}}.pt", "ck{last!r}.pt",
                                      "ck{}.pt", "ck{0}.pt", "ck{last.pt", "ck{last:d}.pt", "ck{nope}.pt"])
def test_bad_templates_are_one_line_errors_without_allocation(template):
    labels = [{"last": "4"}, {"last": "2"}]
    gc.collect()
    gc.disable()  # a collection during the measured call could run unrelated finalizers that allocate
    tracemalloc.start()
    try:
        with pytest.raises(OptionError) as e:
            output_names(template, labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert peak < 64 << 20  # the huge width would take 1 GB; other threads' allocations count too
    assert "\n" not in str(e.value) and str(e.value).startswith(template)


def test_good_templates_still_work():
    labels = [{"last": "4"}, {"last": "2"}]
    assert [p.name for p in output_names("ck{last}.pt", labels)] == ["ck4.pt", "ck2.pt"]
    assert [p.name for p in output_names("ck{last:>03}-{{x}}.pt", labels)] == ["ck004-{x}.pt", "ck002-{x}.pt"]


def test_cli_template_with_attribute_is_a_one_line_error(tmp_path, run_cli):
    for k in range(3):
        torch.save({"step": k + 1, "state_dict": {"w": torch.ones(2) * k}}, tmp_path / f"c{k}.pt")
    for template in ("ck{last.foo}.pt", "ck{last:999999999}.pt"):
        code, _, err = run_cli("merge", tmp_path, "--last", "2,1", "-o", tmp_path / template)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "template" in err


# ---------------------------------------------------------------- item 13: snapshot metadata


@pytest.mark.parametrize("key,value", [("sigma_rel", "nan"), ("sigma_rel", "inf"), ("sigma_rel", "0"),
                                       ("sigma_rel", "-0.05"), ("sigma_rel", "0.5"), ("sigma_rel", "abc"),
                                       ("gamma", "1e300"), ("gamma", "-3"), ("gamma", "nan")])
def test_bad_snapshot_profile_in_safetensors_names_the_file(tmp_path, run_cli, key, value):
    _snapshots(tmp_path / "s", (0.05, 0.10))
    bad = tmp_path / "s" / "ema-0.1000-00000200.safetensors"
    meta = {"step": "200", key: value}
    save_file({"w": torch.randn(4, 3)}, bad, metadata=meta)
    for extra in ([], ["--method", "power-ema", "--sigma-rel", "0.07"]):
        code, _, err = run_cli("merge", tmp_path / "s", *extra, "-o", tmp_path / "o.pt")
        assert code != 0 and str(bad) in err and f"'{key}'" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "--sigma-rel" not in err
        assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.05, 0.4, torch.tensor(float("nan"))])
def test_bad_snapshot_profile_in_torch_dict_names_the_file(tmp_path, run_cli, value):
    (tmp_path / "s").mkdir()
    for step in (100, 200):
        for s in (0.05, 0.10):
            sr = value if (step, s) == (200, 0.10) else s
            torch.save({"state_dict": {"w": torch.ones(2) * step}, "step": step, "sigma_rel": sr},
                       tmp_path / "s" / f"ema-{s:.3f}-{step}.pt")
    code, _, err = run_cli("merge", tmp_path / "s", "--method", "power-ema", "--sigma-rel", "0.07",
                           "-o", tmp_path / "o.pt")
    assert code != 0 and "ema-0.100-200.pt" in err and "'sigma_rel'" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sigma_rel_out_of_range_is_not_blamed_on_the_option():
    with pytest.raises(OptionError, match=r"^--sigma-rel must be in"):
        sigma_rel_to_gamma(0.5)
    with pytest.raises(OptionError, match=r"^snap.pt: the snapshot's sigma_rel must be in"):
        sigma_rel_to_gamma(0.5, "snap.pt: the snapshot's sigma_rel")


# ---------------------------------------------------------------- items 11 and 13: the spec file


def test_spec_that_is_not_a_small_regular_file_is_refused_before_reading(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    for path, why in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                      (huge, "larger than the 1 MiB"), (tmp_path, "cannot read the spec")):
        tracemalloc.start()
        try:
            with pytest.raises(SpecError, match=why) as e:
                load_spec(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20 and "\n" not in str(e.value) and str(e.value).startswith(str(path))


@pytest.mark.parametrize("text", ["a = " + "[" * 3000 + "]" * 3000, "a = " + "{b = " * 3000 + "1" + "}" * 3000,
                                  "a = " + "9" * 5000, "[model]\nfactory = 1e999999\n"])
def test_deep_or_huge_integer_toml_is_a_one_line_error(tmp_path, text):
    spec = tmp_path / "bn.toml"
    spec.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(spec))


def test_several_outputs_show_each_amplification(tmp_path, run_cli):
    _snapshots(tmp_path / "ok", (0.05, 0.10), steps=(100, 200, 300, 400))
    code, out, err = run_cli("merge", tmp_path / "ok", "--method", "power-ema", "--sigma-rel", "0.03,0.07",
                             "-o", tmp_path / "e-{sigma_rel}.safetensors", "--dry-run", "--json")
    assert code == 0, err
    d = json.loads(out)
    snaps = [(t, g) for t in (100, 200, 300, 400) for g in (G05, G10)]
    refs = [float(np.abs(_np_posthoc(snaps, 400, sigma_rel_to_gamma(s))).sum()) for s in (0.03, 0.07)]
    assert d["amplifications"] == pytest.approx(refs, rel=1e-6)
    code, out, _ = run_cli("merge", tmp_path / "ok", "--method", "power-ema", "--sigma-rel", "0.03,0.07",
                           "-o", tmp_path / "e-{sigma_rel}.safetensors", "--dry-run")
    assert [f"(amplification {a:.4g})" in out for a in refs] == [True, True]

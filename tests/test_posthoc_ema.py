"""Exact post-hoc EMA (EDM2) against independent references: quadrature of the averaging profiles, and a
simulated training trajectory whose power EMAs are run step by step in float64."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ckptavg.errors import CkptavgWarning, OptionError
from ckptavg.weights import (
    POSTHOC_WARN_ERROR,
    gamma_to_sigma_rel,
    posthoc_ema,
    power_ema,
    power_profile_inner,
    sigma_rel_to_gamma,
    uniform,
)

G05 = sigma_rel_to_gamma(0.05)
G10 = sigma_rel_to_gamma(0.10)


# ---------------------------------------------------------------- quadrature reference


def _nodes(breaks):
    """Gauss-Legendre nodes and weights on each segment between the sorted breakpoints (64 per segment)."""
    x, w = np.polynomial.legendre.leggauss(64)
    xs, ws = [], []
    for a, b in zip(breaks, breaks[1:]):
        xs.append(0.5 * (b - a) * x + 0.5 * (a + b))
        ws.append(0.5 * (b - a) * w)
    return np.concatenate(xs), np.concatenate(ws)


def _profile(tau, t, g):
    return np.where(tau <= t, (g + 1) * tau**g / float(t) ** (g + 1), 0.0)


def _quadrature_system(snaps, t_out, gamma):
    breaks = sorted({0.0, *(float(t) for t, _ in snaps), float(t_out)})
    tau, w = _nodes(breaks)
    P = np.stack([_profile(tau, t, g) for t, g in snaps])
    pt = _profile(tau, t_out, gamma)
    return P, pt, w


def _residual(P, pt, w, x):
    r = pt - x @ P
    return math.sqrt((w * r * r).sum() / (w * pt * pt).sum())


@pytest.mark.parametrize(
    "t_a,g_a,t_b,g_b",
    [(100, 0.0, 100, 0.0), (1000, G05, 1000, G10), (700, G10, 1000, G05), (1000, 3.0, 250, 9.5), (5, 2.0, 5, 2.0)],
)
def test_profile_inner_product_matches_quadrature(t_a, g_a, t_b, g_b):
    tau, w = _nodes(sorted({0.0, float(min(t_a, t_b)), float(max(t_a, t_b))}))
    ref = (w * _profile(tau, t_a, g_a) * _profile(tau, t_b, g_b)).sum()
    assert power_profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(ref, rel=1e-11)
    assert power_profile_inner(t_b, g_b, t_a, g_a) == pytest.approx(ref, rel=1e-11)


def test_gamma_sigma_rel_round_trip_and_profile_width():
    for s in (0.01, 0.05, 0.07, 0.10, 0.15, 0.25):
        g = sigma_rel_to_gamma(s)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-10)
        # the relative standard deviation of the profile, by quadrature on [0, 1]
        tau, w = _nodes([0.0, 1.0])
        p = _profile(tau, 1, g)
        mean = (w * p * tau).sum()
        var = (w * p * tau * tau).sum() - mean**2
        assert math.sqrt(var) == pytest.approx(s, rel=1e-9)
    with pytest.raises(OptionError):
        gamma_to_sigma_rel(-1.0)


@pytest.mark.filterwarnings("ignore::ckptavg.errors.CkptavgWarning")  # sigma_rel 0.15 from 4 per profile: 10 %
def test_weights_match_independent_lstsq_small_well_conditioned_case():
    snaps = [(t, g) for t in (1000, 2000, 3000, 4000) for g in (G05, G10)]
    for target in (0.07, 0.12, 0.15):
        gamma = sigma_rel_to_gamma(target)
        P, pt, w = _quadrature_system(snaps, 4000, gamma)
        A = (P * w) @ P.T
        b = (P * w) @ pt
        x_ref = np.linalg.lstsq(A, b, rcond=None)[0]
        x_ref /= x_ref.sum()
        got = posthoc_ema(snaps, gamma=gamma)
        np.testing.assert_allclose(got.values, x_ref, rtol=1e-6, atol=1e-8)
        assert got.coeffs == got.values and got.divisor == 1.0
        assert math.fsum(got.values) == pytest.approx(1.0, abs=1e-12)
        assert got.fit_error == pytest.approx(_residual(P, pt, w, np.array(got.values)), rel=1e-5, abs=1e-9)


def test_many_snapshots_fit_as_well_as_independent_lstsq_and_error_is_exact():
    # 32 snapshots per profile: A is ill-conditioned, so compare the fit quality, not the weights
    snaps = [(t, g) for t in range(125, 4001, 125) for g in (G05, G10)]
    for target in (0.03, 0.07, 0.12, 0.15, 0.2):
        gamma = sigma_rel_to_gamma(target)
        P, pt, w = _quadrature_system(snaps, 4000, gamma)
        A = (P * w) @ P.T
        b = (P * w) @ pt
        x_ref = np.linalg.lstsq(A, b, rcond=1e-15)[0]
        x_ref /= x_ref.sum()
        got = posthoc_ema(snaps, gamma=gamma)
        res_got = _residual(P, pt, w, np.array(got.values))
        assert got.fit_error == pytest.approx(res_got, rel=1e-4, abs=1e-7)
        assert res_got <= _residual(P, pt, w, x_ref) * 1.01 + 1e-7
        assert res_got < 0.02


def test_snapshots_after_the_target_step_get_zero_weight():
    snaps = [(t, g) for t in (1000, 2000, 3000, 4000) for g in (G05, G10)]
    got = posthoc_ema(snaps, sigma_rel=0.07, at=3000)
    assert got.values[6:] == [0.0, 0.0]
    ref = posthoc_ema(snaps[:6], sigma_rel=0.07)
    np.testing.assert_allclose(got.values[:6], ref.values, rtol=1e-12, atol=1e-15)
    assert "at step 3000" in got.description and "from 6 snapshots of 2 profiles" in got.description
    assert "sigma_rel 0.07" in got.description
    assert uniform(3).fit_error is None and power_ema([1, 2, 3], gamma=5.0).fit_error is None


def test_target_equal_to_a_snapshot_profile_selects_it():
    snaps = [(t, g) for t in (1000, 2000, 3000, 4000) for g in (G05, G10)]
    got = posthoc_ema(snaps, gamma=G10)
    np.testing.assert_allclose(got.values, [0.0] * 7 + [1.0], atol=1e-9)
    assert got.fit_error < 1e-6


# ---------------------------------------------------------------- simulated trajectory

T = 4000
DIM = 64


def _trajectory(seed):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal((T, DIM)), axis=0)  # row t-1 is theta_t


def _run_power_emas(theta, gammas, every=None):
    """EDM2's per-step rule, float64: after step t, ema = beta*ema + (1-beta)*theta_t, beta = (1-1/t)^(g+1)."""
    g = np.asarray(gammas, dtype=np.float64)[:, None]
    ema = np.zeros((len(gammas), DIM))
    snaps = {}
    for t in range(1, T + 1):
        beta = (1.0 - 1.0 / t) ** (g + 1.0)
        ema = beta * ema + (1.0 - beta) * theta[t - 1]
        if every and t % every == 0:
            for k, gk in enumerate(gammas):
                snaps[(t, gk)] = ema[k].copy()
    return ema, snaps


# worst relative error measured over seeds 0-4: every 125 steps 6.9e-5, 3.6e-5, 8.9e-5, 9.2e-4;
# every 500 steps 4.2e-3, 2.6e-3, 7.6e-3. The bounds keep a margin of about 4x or more.
SIM_CASES = [
    # every, target sigma_rel, bound on ||recon - exact|| / ||exact - theta_T||
    (125, 0.07, 0.0005),
    (125, 0.12, 0.0005),
    (125, 0.15, 0.0005),
    (125, 0.20, 0.005),
    (500, 0.07, 0.02),
    (500, 0.12, 0.02),
    (500, 0.15, 0.03),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_simulated_trajectory_reconstructs_other_widths(seed):
    theta = _trajectory(seed)
    targets = sorted({s for _, s, _ in SIM_CASES})
    exact_all, _ = _run_power_emas(theta, [sigma_rel_to_gamma(s) for s in targets])
    exact = dict(zip(targets, exact_all))
    rows = []
    for every in sorted({e for e, _, _ in SIM_CASES}):
        _, snaps = _run_power_emas(theta, [G05, G10], every)
        keys = list(snaps)
        for e, s, bound in SIM_CASES:
            if e != every:
                continue
            w = posthoc_ema(keys, sigma_rel=s)
            recon = sum(wi * snaps[k] for wi, k in zip(w.values, keys))
            scale = np.linalg.norm(exact[s] - theta[-1])
            err = np.linalg.norm(recon - exact[s]) / scale
            # the nearest saved width, used as is: what one gets without the reconstruction
            nearest = snaps[(T, G05 if abs(s - 0.05) < abs(s - 0.10) else G10)]
            naive = np.linalg.norm(nearest - exact[s]) / scale
            rows.append((every, T // every, s, w.fit_error, err, naive, bound))
            assert err < bound, (every, s, err)
            assert err < naive / 10
    print(f"\nseed {seed}: every  snaps/profile  sigma_rel  fit_error  rel_err  nearest_width_err  bound")
    for every, n, s, fe, err, naive, bound in rows:
        print(f"        {every:5d}  {n:13d}  {s:9.2f}  {fe:9.2e}  {err:7.1e}  {naive:17.2e}  {bound:5.3f}")


def test_exact_snapshots_beat_plain_checkpoints():
    """DESIGN: from plain checkpoints (the midpoint power-ema rule) the same spacing is much less faithful."""
    theta = _trajectory(3)
    gamma = sigma_rel_to_gamma(0.07)
    (exact,), _ = _run_power_emas(theta, [gamma])
    _, snaps = _run_power_emas(theta, [G05, G10], 250)
    keys = list(snaps)
    w = posthoc_ema(keys, gamma=gamma)
    recon = sum(wi * snaps[k] for wi, k in zip(w.values, keys))
    steps = list(range(250, T + 1, 250))
    wp = power_ema(steps, gamma=gamma).values
    plain = sum(wi * theta[t - 1] for wi, t in zip(wp, steps))
    scale = np.linalg.norm(exact - theta[-1])
    err_exact = np.linalg.norm(recon - exact) / scale
    err_plain = np.linalg.norm(plain - exact) / scale
    print(f"\nevery 250 steps, sigma_rel 0.07: snapshots {err_exact:.2e}, plain checkpoints {err_plain:.2e}")
    assert err_exact < err_plain / 5


# ---------------------------------------------------------------- errors and warnings


def test_error_cases():
    snaps = [(t, g) for t in (1000, 2000) for g in (G05, G10)]
    with pytest.raises(OptionError, match="at least 2"):
        posthoc_ema([(1000, G05)], sigma_rel=0.07)
    with pytest.raises(OptionError, match="at least 2"):
        posthoc_ema([], sigma_rel=0.07)
    with pytest.raises(OptionError, match="exactly one"):
        posthoc_ema(snaps)
    with pytest.raises(OptionError, match="exactly one"):
        posthoc_ema(snaps, gamma=5.0, sigma_rel=0.1)
    with pytest.raises(OptionError, match=r"--at 1500 is not a snapshot step; available steps: 1000, 2000"):
        posthoc_ema(snaps, sigma_rel=0.07, at=1500)
    with pytest.raises(OptionError, match="needs at least 2 snapshots at or before it, got 1"):
        posthoc_ema([(1000, G05), (2000, G05), (2000, G10)], sigma_rel=0.07, at=1000)
    with pytest.raises(OptionError, match="-0.5"):
        posthoc_ema(snaps, gamma=-0.6)
    with pytest.raises(OptionError, match="sigma-rel"):
        posthoc_ema(snaps, sigma_rel=0.5)
    with pytest.raises(OptionError, match="snapshot 1"):
        posthoc_ema([(1000, G05), ("x", G10)], sigma_rel=0.07)
    with pytest.raises(OptionError, match="snapshot 1 has step 0"):
        posthoc_ema([(1000, G05), (0, G10)], sigma_rel=0.07)
    with pytest.raises(OptionError, match="snapshot 0 .*gamma nan"):
        posthoc_ema([(1000, float("nan")), (2000, G10)], sigma_rel=0.07)
    # a target no combination of the profiles approaches: refused with the measured error
    with pytest.raises(OptionError, match=r"cannot represent the target \(relative profile error of the fit \d+%\)"):
        posthoc_ema([(1000, G05), (2000, G05)], gamma=0.0)
    with pytest.raises(OptionError, match="cannot represent"):
        posthoc_ema([(2000, G05), (2000, G10)], gamma=0.5)


def test_warnings_one_profile_and_poor_fit():
    one = [(t, G05) for t in range(500, 4001, 500)]
    with pytest.warns(CkptavgWarning, match=r"only one profile \(gamma 16.97\).*estimated relative error") as rec:
        w = posthoc_ema(one, sigma_rel=0.06)
    assert f"{w.fit_error:.1%}" in str(rec[0].message)
    # the same profile as the target: exact, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = posthoc_ema(one, gamma=G05)
    assert w.values[-1] == pytest.approx(1.0) and w.fit_error < 1e-6
    # sparse snapshots and a target far outside the saved widths: a warning with the estimate
    sparse = [(t, g) for t in (2000, 4000) for g in (G05, G10)]
    with pytest.warns(CkptavgWarning, match=r"poor fit, estimated relative reconstruction error \d+\.\d%") as rec:
        w = posthoc_ema(sparse, sigma_rel=0.2)
    assert w.fit_error > POSTHOC_WARN_ERROR
    assert f"{w.fit_error:.1%}" in str(rec[0].message)
    # a good fit is silent
    dense = [(t, g) for t in range(125, 4001, 125) for g in (G05, G10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = posthoc_ema(dense, sigma_rel=0.07)
    assert w.fit_error < POSTHOC_WARN_ERROR

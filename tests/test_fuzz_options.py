"""Fuzzing of the option surfaces a user or a file controls (issue 23): output-name templates and the
power-EMA snapshot metadata (safetensors ``__metadata__`` strings, torch-saved snapshot dicts).

Fixed seed, bounded cases (a few seconds on one core). Every case must be a success or a one-line
CkptavgError: no other exception, no traceback, no unbounded allocation; a successful plan only ever
holds valid snapshot profiles (finite sigma_rel in (0, 0.2886), gamma in (0, 1e6])."""

from __future__ import annotations

import gc
import math
import random
import resource
import tracemalloc
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.outputs import output_names

SEED = 20261204
TOKENS = ["{", "}", "{{", "}}", "last", "sigma_rel", "x", ".", "[", "]", "!", "r", "s", ":", ">", "<", "^", "0",
          "9", "99999", "999999999", ".3", "f", "d", "_", ",", "-", "ck", ".pt", "/", " ", "\x00", "é", "{last}",
          "{sigma_rel:>08}", "{last.real}", "{last[0]}", "{0}", "{}"]
HOSTILE = ["nan", "NaN", "inf", "-inf", "0", "-0", "-0.05", "0.5", "1e300", "1e-320", "0x10", "1_000", " 0.05 ",
           "0.05\x00", "", "abc", "9" * 70, "9" * 5000, "1e999", "0.2886", "0.28859", "1000000", "1000001", "1e6",
           "0.05", "0.10", "16.97", "6.94", "3", "-3", "true", "[0.05]", "{\"a\": 1}"]


def _one_line(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, CkptavgError) and msg != "" and "\n" not in msg and len(msg) < 2000


def test_fuzz_output_templates():
    rng = random.Random(SEED)
    labels = [{"last": "4", "sigma_rel": "0.05"}, {"last": "2", "sigma_rel": "0.10"}]
    gc.collect()
    gc.disable()  # a collection during the measured call could run unrelated finalizers that allocate
    tracemalloc.start()
    try:
        for _ in range(3000):
            template = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 8)))
            tracemalloc.reset_peak()
            try:
                names = output_names(template, labels)
            except OptionError as e:
                assert _one_line(e), (template, str(e))
            else:
                assert len(names) == 2 and all(isinstance(p, Path) for p in names) and names[0] != names[1]
                assert all(len(str(p)) < 2000 for p in names), template
            assert tracemalloc.get_traced_memory()[1] < 64 << 20, template  # a 1e9 width: 1 GB; threads: noise
    finally:
        tracemalloc.stop()
        gc.enable()


def _valid_profiles(plan) -> bool:
    for i in plan.inputs:
        g, s = i.checkpoint.meta.gamma, i.checkpoint.meta.sigma_rel
        if s is not None and not (math.isfinite(s) and 0 < s < 0.2886):
            return False
        if g is not None and not (math.isfinite(g) and 0 < g <= 1e6):
            return False
    return True


def _in_range(key: str, x: float) -> bool:
    return math.isfinite(x) and (0 < x < 0.2886 if key == "sigma_rel" else 0 < x <= 1e6)


def _string_profile_ok(key: str, v: str) -> bool:
    """Independent reference: a safetensors metadata value is a valid profile iff it parses as a number
    (at most 64 characters) in range."""
    if len(v) > 64:
        return False
    try:
        x = float(int(v))
    except ValueError:
        try:
            x = float(v)
        except ValueError:
            return False
    except OverflowError:
        return False
    return _in_range(key, x)


def _object_profile(key: str, v) -> bool | None:
    """Independent reference for a torch-saved value: True/False for a number-like value (valid or not),
    None for a value that is not a profile at all (ignored)."""
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        return None
    if isinstance(v, str):
        return False
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        if v.dtype == torch.bool:
            return False
        v = v.item()
    try:
        return _in_range(key, float(v))
    except OverflowError:
        return False


def _check_plan(files: list[Path], hostile: Path, bad_key: str | None) -> None:
    """``bad_key``: the profile key of ``hostile`` that is invalid (the plan must name the file and it)."""
    for opts in ({}, {"method": "power-ema", "sigma_rel": 0.07}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = ckptavg.plan(files, **opts)
        except CkptavgError as e:
            assert _one_line(e), str(e)[:300]
            if bad_key is not None:
                assert str(hostile) in str(e) and "snapshot profile" in str(e), str(e)[:300]
            assert "--sigma-rel must" not in str(e)
        else:
            assert bad_key is None, (hostile, bad_key)
            assert _valid_profiles(p)


def test_fuzz_safetensors_snapshot_metadata(tmp_path):
    rng = random.Random(SEED + 1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(120):
        folder = tmp_path / f"c{case}"
        folder.mkdir()
        good = folder / "ema-0.050-00000100.safetensors"
        save_file({"w": torch.ones(3)}, good, metadata={"step": "100", "sigma_rel": "0.05"})
        meta = {"step": rng.choice(HOSTILE + ["200", "200"])}
        for key in rng.sample(["sigma_rel", "gamma", "ckptavg_snapshot"], rng.randint(1, 3)):
            rand = repr(rng.uniform(-1, 1) * 10 ** rng.randint(-5, 5))
            meta[key] = rng.choice(HOSTILE) if rng.random() < 0.8 else rand
        hostile = folder / "ema-x-00000200.safetensors"
        save_file({"w": torch.full((3,), 2.0)}, hostile, metadata=meta)
        bad = [k for k in ("sigma_rel", "gamma") if k in meta and not _string_profile_ok(k, meta[k])]
        _check_plan([good, hostile], hostile, bad[0] if bad else None)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KiB


def _hostile_value(rng: random.Random):
    return rng.choice([
        float("nan"), float("inf"), -float("inf"), 0.0, -0.05, 0.05, 0.1, 0.4, 1e300, -1e300, 10**400, -(10**400), 3,
        True, None, "0.05", "nan", [0.05], {"a": 1}, torch.tensor(float("nan")), torch.tensor(0.05),
        torch.tensor([0.05, 0.1]), torch.tensor(3), torch.tensor(True), torch.tensor(1e30).to(torch.bfloat16),
        torch.tensor(0.07, dtype=torch.float16), rng.uniform(-1, 1) * 10 ** rng.randint(-5, 8),
    ])


def test_fuzz_torch_snapshot_dicts(tmp_path):
    rng = random.Random(SEED + 2)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(80):
        folder = tmp_path / f"c{case}"
        folder.mkdir()
        good = folder / "ema-0.050-100.pt"
        torch.save({"state_dict": {"w": torch.ones(3)}, "step": 100, "sigma_rel": 0.05}, good)
        obj = {"state_dict": {"w": torch.full((3,), 2.0)}, "step": rng.choice([200, 200, _hostile_value(rng)])}
        for key in rng.sample(["sigma_rel", "gamma"], rng.randint(1, 2)):
            obj[key] = _hostile_value(rng)
        hostile = folder / "ema-x-200.pt"
        torch.save(obj, hostile)
        bad = [k for k in ("sigma_rel", "gamma") if k in obj and _object_profile(k, obj[k]) is False]
        _check_plan([good, hostile], hostile, bad[0] if bad else None)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KiB

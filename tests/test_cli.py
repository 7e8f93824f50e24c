"""The command line, in-process (click) and through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import assert_close32, fp64_mean, make_state_dicts


@pytest.fixture
def run_dir(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    sds = make_state_dicts(25, seed=1, drift=0.01)
    for e, sd in enumerate(sds):
        torch.save({"epoch": e, "global_step": 10 * (e + 1), "state_dict": sd,
                    "metrics": {"val_acc": 0.5 + 0.01 * ((7 * e) % 13)}},
                   runs / f"epoch={e:02d}-step={10 * (e + 1)}.ckpt")
    return runs, sds


def test_merge_examples_from_the_issue(run_dir, tmp_path, run_cli):
    runs, sds = run_dir
    files = sorted(runs.glob("*.ckpt"))
    code, out, err = run_cli("merge", *files, "-o", tmp_path / "swa.pt")
    assert code == 0, err
    got = torch.load(tmp_path / "swa.pt", weights_only=True)
    assert_close32(got["conv.weight"], fp64_mean([s["conv.weight"] for s in sds]))
    assert "wrote" in err and "25 checkpoints" in err

    code, out, err = run_cli("merge", runs, "-o", tmp_path / "swa.safetensors", "--epochs", "12:20")
    assert code == 0, err
    got = load_file(tmp_path / "swa.safetensors")
    assert_close32(got["fc.weight"], fp64_mean([s["fc.weight"] for s in sds[12:21]]))

    code, _, err = run_cli("merge", runs, "-o", tmp_path / "ema.pt", "--method", "ema", "--decay", "0.9")
    assert code == 0, err
    code, _, err = run_cli("merge", runs, "-o", tmp_path / "ema2.pt", "--method", "ema", "--decay-per-step", "0.99")
    assert code == 0, err
    code, _, err = run_cli("merge", *files[:3], "-o", tmp_path / "w.pt", "--weights", "0.5,0.3,0.2")
    assert code == 0, err
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    ref = fp64_mean([s["fc.weight"] for s in sds[:3]], [0.5, 0.3, 0.2])
    assert_close32(got["fc.weight"], ref)
    code, _, err = run_cli("merge", runs, "-o", tmp_path / "last5.pt", "--last", "5")
    assert code == 0, err
    code, out, err = run_cli("merge", runs, "-o", tmp_path / "best3.pt", "--best", "3", "--metric", "val_acc",
                             "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["inputs"]) == 3 and rep["bytes_written"] > 0


def test_dry_run_prints_plan_and_reads_no_tensor_data(run_dir, tmp_path, run_cli, monkeypatch):
    runs, _ = run_dir
    from ckptavg.io import checkpoint as readers

    def boom(*a, **k):
        raise AssertionError("tensor data was read during --dry-run")

    monkeypatch.setattr(readers.TensorRef, "read_into", boom)
    monkeypatch.setattr(readers.TensorRef, "materialize", boom)
    code, out, err = run_cli("merge", runs, "-o", tmp_path / "x.pt", "--dry-run", "--epochs", "20:",
                             "--method", "ema", "--decay", "0.5")
    assert code == 0, err
    assert "order:     by step (recorded)" in out
    assert "epoch=20-step=210.ckpt" in out and "epoch=19" not in out
    # weights of the EMA: the first checkpoint gets decay^(n-1)
    assert f"{0.5 ** 4:.6f}" in out
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["merge", "nope/*.pt", "-o", "o.pt"], 1, "nope/*.pt: no files match this pattern"),
        (["merge", "missing.pt", "-o", "o.pt"], 1, "missing.pt: no such file or folder"),
        (["merge", "RUNS", "-o", "o.pt", "--epochs", "90:"], 1, "matches no checkpoint (available epochs: 0, 1"),
        (["merge", "RUNS", "-o", "o.pt", "--decay", "0.9"], 2, "--decay/--decay-per-step need --method ema"),
        (["merge", "RUNS", "-o", "o.pt", "--method", "ema"], 2, "--method ema needs exactly one of"),
        (["merge", "RUNS", "-o", "o.pt", "--weights", "1,2"], 2, "--weights has 2 values but 25"),
        (["merge", "RUNS", "-o", "o.txt"], 2, "the output must end in .safetensors or .pt"),
        (["merge", "RUNS", "-o", "o.pt", "--device", "tpu"], 2, "--device must be cpu, cuda or cuda:N"),
        (["merge", "RUNS", "-o", "o.pt", "--method", "bogus"], 2, "--method must be one of uniform, ema, power-ema"),
    ],
)
def test_errors_are_one_line_with_exit_codes(run_dir, tmp_path, run_cli, monkeypatch, args, code, needle):
    runs, _ = run_dir
    monkeypatch.chdir(tmp_path)
    args = [str(runs) if a == "RUNS" else a for a in args]
    got, out, err = run_cli(*args)
    assert got == code, err
    assert needle in err
    assert "Traceback" not in err
    if code == 1 or "ckptavg: error" in err:
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.pt").exists()


def test_output_equal_to_input_is_refused(run_dir, run_cli):
    runs, _ = run_dir
    target = sorted(runs.glob("*.ckpt"))[-1]
    before = target.read_bytes()
    code, _, err = run_cli("merge", runs, "-o", target)
    assert code == 2 and "the output is also an input" in err
    assert target.read_bytes() == before


def test_same_file_twice_is_refused(run_dir, run_cli, tmp_path):
    runs, _ = run_dir
    f = sorted(runs.glob("*.ckpt"))[0]
    code, _, err = run_cli("merge", f, f, "-o", tmp_path / "o.pt")
    assert code == 2 and "given twice" in err


def test_help_has_examples(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0 and "ckptavg merge runs/ -o swa.pt" in out
    code, out, _ = run_cli("merge", "--help")
    assert code == 0
    for opt in ("--epochs", "--decay-per-step", "--best", "--dry-run", "--key", "--strip-prefix", "--dtype",
                "--accumulate", "--device", "--quiet", "--trust-pickle"):
        assert opt in out


def test_console_script_subprocess(run_dir, tmp_path, run_script):
    runs, sds = run_dir
    res = run_script("merge", runs, "-o", tmp_path / "out.safetensors", "--last", "4", "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    got = load_file(tmp_path / "out.safetensors")
    ref = fp64_mean([s["fc.weight"] for s in sds[-4:]])
    torch.testing.assert_close(got["fc.weight"].float(), ref.float(), rtol=8e-3, atol=1e-3)
    assert got["fc.weight"].dtype == torch.bfloat16
    assert "ckptavg_method" in __import__("safetensors").safe_open(str(tmp_path / "out.safetensors"), "pt").metadata()
    res = run_script("merge", tmp_path / "nothing-here", "-o", tmp_path / "o.pt")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("ckptavg: error:") and "Traceback" not in res.stderr
    assert "no progress" not in res.stderr


def test_python_dash_m(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ckptavg", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "ckptavg" in res.stdout


def test_cuda_device_without_gpu_is_a_usage_error(run_dir, tmp_path, run_cli):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    runs, _ = run_dir
    code, _, err = run_cli("merge", runs, "-o", tmp_path / "o.pt", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err

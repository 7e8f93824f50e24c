"""What a new user trips over: silent wrong selections, missing hints, a README that must run.

Each test here failed on commit 1bd936d (before these fixes).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.errors import CkptavgError

from .conftest import SmallNet, make_state_dicts
from .test_formats import _fairseq_run, lightning_run  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
# the README and the documentation pages it points to (docs/), read as one text
README = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])


def _mean(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """fp64 reference: the uniform mean of the floating tensors."""
    return {k: sum(sd[k].double() for sd in sds) / len(sds) for k in sds[0] if sds[0][k].is_floating_point()}


def _assert_avg(out: dict[str, torch.Tensor], sds: list[dict[str, torch.Tensor]]) -> None:
    ref = _mean(sds)
    for k, v in ref.items():
        torch.testing.assert_close(out[k].double(), v, rtol=1e-6, atol=1e-6)


# -- 1. Hugging Face Trainer runs with fractional epochs


TRAINER = [(50, 1.25), (100, 2.5), (150, 3.75), (200, 5.0)]


def _hf_trainer_run(root: Path) -> list[dict[str, torch.Tensor]]:
    """``checkpoint-N/`` folders as the Hugging Face Trainer writes them (model.safetensors,
    config.json, trainer_state.json with fractional epochs and throughput figures)."""
    sds = make_state_dicts(len(TRAINER), seed=3)
    for sd, (step, epoch) in zip(sds, TRAINER):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({k: v for k, v in sd.items()}, str(d / "model.safetensors"), {"format": "pt"})
        (d / "config.json").write_text("{}")
        state = {"global_step": step, "epoch": epoch, "log_history": [
            {"epoch": epoch, "step": step, "eval_loss": 1.0 / step, "eval_runtime": 0.41,
             "eval_samples_per_second": 950.2, "eval_steps_per_second": 30.1}]}
        (d / "trainer_state.json").write_text(json.dumps(state))
    return sds


def test_fractional_epochs_select_order_plan_and_provenance(tmp_path, run_cli):
    run = tmp_path / "out"
    sds = _hf_trainer_run(run)
    # --epochs 3: keeps epochs 3.75 and 5 (the folder numbers 150, 200 are steps, not epochs)
    p = ckptavg.plan(run, epochs="3:")
    assert [(i.path.name, i.epoch, i.step) for i in p.inputs] == [("checkpoint-150", 3.75, 150),
                                                                  ("checkpoint-200", 5, 200)]
    p = ckptavg.plan(run, epochs="2.5:3.75")
    assert [i.epoch for i in p.inputs] == [2.5, 3.75]
    code, out, _ = run_cli("merge", run, "-o", tmp_path / "x.pt", "--epochs", "2.5:", "--dry-run")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [r[1] for r in rows] == ["2.5", "3.75", "5"]
    # ordered by epoch too (no step anywhere): same order
    assert [i.epoch for i in ckptavg.plan(run, order="epoch").inputs] == [1.25, 2.5, 3.75, 5]
    code, _, err = run_cli("merge", run, "-o", tmp_path / "avg.safetensors", "--epochs", "3:")
    assert code == 0, err
    _assert_avg(load_file(tmp_path / "avg.safetensors"), sds[2:])
    with safe_open(tmp_path / "avg.safetensors", "pt") as f:
        meta = f.metadata()
    assert [e["epoch"] for e in json.loads(meta["ckptavg_inputs"])] == [3.75, 5]
    assert float(meta["epoch"]) == 5
    # steps stay integers
    with pytest.raises(CkptavgError, match="integers"):
        ckptavg.plan(run, steps="2.5:")


def test_inspect_fractional_epochs_and_no_throughput_metrics(tmp_path, run_cli):
    run = tmp_path / "out"
    _hf_trainer_run(run)
    code, out, _ = run_cli("inspect", run, "--json")
    assert code == 0
    rows = json.loads(out)["checkpoints"]
    assert [r["epoch"] for r in rows] == [1.25, 2.5, 3.75, 5]
    for r in rows:
        assert set(r["metrics"]) == {"eval_loss"}
    code, out, _ = run_cli("inspect", run)
    assert "eval_runtime" not in out and "samples_per_second" not in out and " 3.75 " in out


# -- 3. duplicates: last.ckpt, earlier ckptavg outputs, two files at one step


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_lightning_last_ckpt_is_skipped_in_globs(lightning_run, tmp_path, run_cli, how):  # noqa: F811
    folder, files, _seen = lightning_run
    run = tmp_path / "ckpts"
    run.mkdir()
    for f in files:
        shutil.copy(f, run / f.name)
    last = run / "last.ckpt"  # Lightning's save_last=True writes a copy, save_last="link" a link
    if how == "copy":
        shutil.copy(files[-1], last)
    else:
        last.symlink_to(run / files[-1].name)
    out = tmp_path / "swa.pt"
    code, _, err = run_cli("merge", f"{run}/*.ckpt", "-o", out)
    assert code == 0, err
    assert "skipped last.ckpt" in err and f"name it: {last}" in err
    sds = [torch.load(f, weights_only=True)["state_dict"] for f in files]
    _assert_avg(torch.load(out, weights_only=True), sds)


def test_earlier_ckptavg_output_in_the_folder_is_skipped(tmp_path, run_cli):
    run = tmp_path / "runs"
    run.mkdir()
    sds = make_state_dicts(3, seed=1)
    for i, sd in enumerate(sds, 1):
        torch.save({"epoch": i, "state_dict": sd}, run / f"ckpt{i}.pt")
    code, _, err = run_cli("merge", run, "-o", run / "swa.safetensors")
    assert code == 0, err
    for pattern in (run, f"{run}/*"):
        code, _, err = run_cli("merge", pattern, "-o", tmp_path / "again.pt")
        assert code == 0, err
        assert "earlier ckptavg output" in err and f"name it: {run / 'swa.safetensors'}" in err
        _assert_avg(torch.load(tmp_path / "again.pt", weights_only=True), sds)
        (tmp_path / "again.pt").unlink()
    # named on purpose: included
    p = ckptavg.plan([run / "ckpt1.pt", run / "swa.safetensors"], order="given")
    assert len(p.inputs) == 2


def test_two_checkpoints_at_one_step_are_refused(tmp_path):
    run = tmp_path / "fs"
    _fairseq_run(run)
    # fairseq with --save-interval-updates: the end of epoch 4 is also update 1000
    shutil.copy(run / "checkpoint4.pt", run / "checkpoint_4_1000.pt")
    with pytest.raises(CkptavgError) as e:
        ckptavg.plan(run)
    msg = str(e.value)
    assert "checkpoint4.pt" in msg and "checkpoint_4_1000.pt" in msg and "step 1000" in msg


def test_power_ema_snapshots_of_different_profiles_share_a_step(tmp_path):
    sds = make_state_dicts(2, seed=2)
    for sd, sigma in zip(sds, (0.05, 0.10)):
        save_file(sd, str(tmp_path / f"snap_{sigma}.safetensors"), {"step": "4096", "sigma_rel": str(sigma)})
    p = ckptavg.plan(tmp_path)
    assert len(p.inputs) == 2 and all(i.step == 4096 for i in p.inputs)
    save_file(sds[0], str(tmp_path / "snap_again.safetensors"), {"step": "4096", "sigma_rel": "0.05"})
    with pytest.raises(CkptavgError, match="both record step 4096"):
        ckptavg.plan(tmp_path)


def test_readme_fairseq_example_does_what_fairseqs_script_does(tmp_path, run_cli):
    run = tmp_path / "checkpoints"
    _fairseq_run(run)  # checkpoint1..4.pt, checkpoint_5_1100.pt, checkpoint_last.pt, checkpoint_best.pt
    more = make_state_dicts(3, seed=8)
    for e, sd in zip((5, 6, 7), more):  # three more epochs, as fairseq would write them
        ck = torch.load(run / "checkpoint4.pt", weights_only=True)
        ck["model"] = sd
        ck["optimizer_history"][-1]["num_updates"] = 250 * e
        ck["extra_state"]["train_iterator"]["epoch"] = e + 1
        torch.save(ck, run / f"checkpoint{e}.pt")
    # --save-interval-updates 250: the end of epoch 7 is also saved as checkpoint_7_1750.pt
    shutil.copy(run / "checkpoint7.pt", run / "checkpoint_7_1750.pt")
    with pytest.raises(CkptavgError, match="checkpoint7.pt and .*checkpoint_7_1750.pt both record step 1750"):
        ckptavg.plan(run)
    line = next(x for x in README.splitlines() if x.startswith("| fairseq") and "`ckptavg merge" in x)
    cmd = [c.strip("'") for c in re.search(r"`ckptavg merge ([^`]*)`", line).group(1).split()]
    n = int(cmd[cmd.index("--last") + 1])
    # fairseq's scripts/average_checkpoints.py --num-epoch-checkpoints N: the N highest-numbered
    # files named checkpoint<E>.pt, averaged uniformly
    numbered = sorted((int(m.group(1)), f) for f in run.iterdir()
                      if (m := re.fullmatch(r"checkpoint(\d+)\.pt", f.name)))
    chosen = [f for _, f in numbered[-n:]]
    assert 1 < n < len(numbered)
    args = [str(tmp_path / c) if c.startswith("checkpoints/") else c for c in cmd]
    args[args.index("-o") + 1] = str(tmp_path / "averaged.pt")
    code, _, err = run_cli("merge", *args)
    assert code == 0, err
    out = torch.load(tmp_path / "averaged.pt", weights_only=True)
    _assert_avg(out["model"], [torch.load(f, weights_only=True)["model"] for f in chosen])


def test_best_tie_earliest_wins_and_the_plan_says_so(tmp_path):
    for i, acc in enumerate([0.8, 0.9, 0.9, 0.7], 1):
        torch.save({"epoch": i, "metrics": {"val_acc": acc}, "state_dict": make_state_dicts(1, seed=i)[0]},
                   tmp_path / f"e{i}.pt")
    p = ckptavg.plan(tmp_path, best=1, metric="val_acc")
    assert [i.path.name for i in p.inputs] == ["e2.pt"]
    assert any("tie" in n and "e2.pt" in n and "e3.pt" in n for n in p.notes)
    assert not any("tie" in n for n in ckptavg.plan(tmp_path, best=2, metric="val_acc").notes)
    assert "the earliest wins" in README


# -- 4. wrapper prefixes


def test_mixed_wrapper_prefixes_are_matched_with_a_note(tmp_path, run_cli):
    sds = make_state_dicts(3, seed=4)
    torch.save({f"module.{k}": v for k, v in sds[0].items()}, tmp_path / "a1.pt")  # DDP
    torch.save({f"_orig_mod.{k}": v for k, v in sds[1].items()}, tmp_path / "a2.pt")  # torch.compile
    torch.save(sds[2], tmp_path / "a3.pt")
    code, _, err = run_cli("merge", tmp_path / "a1.pt", tmp_path / "a2.pt", tmp_path / "a3.pt", "-o",
                           tmp_path / "out.pt")
    assert code == 0, err
    assert "wrapper prefixes" in err and "'module.'" in err and "'_orig_mod.'" in err
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(out) == set(sds[2])
    _assert_avg(out, sds)


def test_other_prefix_mismatch_suggests_strip_prefix(tmp_path, run_cli):
    sds = make_state_dicts(2, seed=4)
    torch.save({f"model.{k}": v for k, v in sds[0].items()}, tmp_path / "b1.pt")
    torch.save(sds[1], tmp_path / "b2.pt")
    code, _, err = run_cli("merge", tmp_path / "b1.pt", tmp_path / "b2.pt", "-o", tmp_path / "out.pt")
    assert code == 1 and "--strip-prefix model. would make the names agree" in err
    code, _, err = run_cli("merge", tmp_path / "b1.pt", tmp_path / "b2.pt", "-o", tmp_path / "out.pt",
                           "--strip-prefix", "model.")
    assert code == 0, err


# -- 5, 8, 9: notes, power-ema on epochs, CLI details


def test_lightning_plain_output_note(lightning_run, tmp_path, run_cli):  # noqa: F811
    folder, _files, _seen = lightning_run
    code, _, err = run_cli("merge", folder, "-o", tmp_path / "swa.ckpt")
    assert code == 0 and "load_from_checkpoint" in err and "--keep-structure" in err
    code, _, err = run_cli("merge", folder, "-o", tmp_path / "swa2.ckpt", "--keep-structure")
    assert code == 0 and "cannot load" not in err


def test_extensionless_output_and_last_too_large_are_noted(tmp_path, run_cli):
    run = tmp_path / "runs"
    run.mkdir()
    for i, sd in enumerate(make_state_dicts(6), 1):
        torch.save(sd, run / f"ckpt{i}.pt")
    code, out, _ = run_cli("merge", run, "-o", tmp_path / "swa", "--last", "10", "--dry-run")
    assert code == 0
    assert "no file extension" in out and "Hugging Face model folder" in out
    assert "--last 10: only 6 checkpoints are available" in out


def test_power_ema_on_epochs_when_no_step_is_recorded(tmp_path):
    sds = make_state_dicts(4, seed=7)
    epochs = [2, 4, 6, 10]
    for name, e, sd in zip("dbca", epochs, sds):
        torch.save({"epoch": e, "state_dict": sd}, tmp_path / f"{name}.pt")
    gamma = 6.94
    p = ckptavg.plan(tmp_path, method="power-ema", gamma=gamma)
    assert [i.epoch for i in p.inputs] == epochs
    assert any("epochs are the time axis" in n for n in p.notes)
    # reference: integrate the density (g+1) t^g / T^(g+1) over each checkpoint's share of [0, T]
    T = epochs[-1]
    bounds = [0.0] + [(a + b) / 2 for a, b in zip(epochs, epochs[1:])] + [float(T)]
    ref = [(bounds[i + 1] / T) ** (gamma + 1) - (bounds[i] / T) ** (gamma + 1) for i in range(len(epochs))]
    assert [i.weight for i in p.inputs] == pytest.approx(ref, rel=1e-12)


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ckptavg", "merge", "x.pt", "-o", "y.pt", "--epoch", "3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("ckptavg: error: No such option") and "--epochs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Usage:" not in r.stderr


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ckptavg", "merge", "missing.pt", "-o", "y.pt", "--debug"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointReadError" in r.stderr


def test_summary_uses_human_units(tmp_path, run_cli):
    for i, sd in enumerate(make_state_dicts(2), 1):
        torch.save(sd, tmp_path / f"c{i}.pt")
    code, _, err = run_cli("merge", tmp_path / "c1.pt", tmp_path / "c2.pt", "-o", tmp_path / "o.pt")
    assert code == 0
    size = os.path.getsize(tmp_path / "o.pt")
    assert re.search(r", \d+(\.\d)? (B|KB) in (\d+ ms|\d+\.\d s)", err), err
    assert "0.0 MB" not in err and size > 0


def test_output_help_lists_every_readme_extension(run_cli):
    _, out, _ = run_cli("merge", "--help")
    help_text = " ".join(out.split())
    start = README.index("# ckptavg merge\n")
    section = README[start:README.index("## Examples", start)]
    exts = set(re.findall(r"`(\.[a-z.]+)`", section))
    assert {".safetensors", ".pt", ".pth.tar"} <= exts
    for ext in exts:
        assert ext in help_text, ext


# -- 10. start-up


def test_help_version_and_completion_do_not_import_torch():
    code = (
        "import sys, click, ckptavg.cli as c\n"
        "ctx = click.Context(c.cli, info_name='ckptavg')\n"
        "c.cli.get_help(ctx)\n"
        "sub = c.cli.get_command(ctx, 'merge')\n"
        "sub.get_help(click.Context(sub, info_name='merge', parent=ctx))\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
        "for args in (['--version'], ['merge', '--help']):\n"
        "    try:\n"
        "        c.cli.main(args, prog_name='ckptavg')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    assert 'torch' not in sys.modules, args\n"
        "import os\n"
        "os.environ.update(_CKPTAVG_COMPLETE='bash_complete', COMP_WORDS='ckptavg merge --ep', COMP_CWORD='2')\n"
        "try:\n"
        "    c.cli.main([], prog_name='ckptavg', complete_var='_CKPTAVG_COMPLETE')\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'completion imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "--epochs" in r.stdout  # the completion answered


# -- 7. the README's Python snippets run as written, in order


def _readme_python_blocks() -> list[str]:
    start = README.index("# Python API")
    section = README[start:README.index("\n## Reference", start)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    blocks = _readme_python_blocks()
    assert len(blocks) == 2
    runs = tmp_path / "runs"
    runs.mkdir()
    for e, sd in enumerate(make_state_dicts(20, seed=9), 1):
        torch.save({"epoch": e, "step": 10 * e, "metrics": {"val_acc": 0.5 + 0.01 * e}, "state_dict": sd},
                   runs / f"epoch={e}.ckpt")
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    loader = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    ns: dict = {"model": SmallNet(), "loader": loader}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert (tmp_path / "swa.safetensors").is_file() and (tmp_path / "ema.pt").is_file()
    assert [p.name for p in ns["report"].files] == [f"epoch={e}.ckpt" for e in range(16, 21)]
    try:
        from ckptavg.bn import load_spec  # noqa: F401
    except ImportError:
        pytest.skip("BatchNorm recalibration (the ckptavg.bn package) is not on this branch")
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "from tests.conftest import SmallNet\n"
        "def build():\n    return SmallNet()\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]\n"
    )
    (tmp_path / "bn.toml").write_text('[model]\nfactory = "net.py:build"\n\n[data]\nloader = "net.py:batches"\n')
    monkeypatch.syspath_prepend(str(ROOT))
    exec(compile(blocks[1], "README.md", "exec"), ns)
    assert (tmp_path / "swa_bn.safetensors").is_file() and (tmp_path / "swa_bn.pt").is_file()
    assert math.isfinite(float(load_file(tmp_path / "swa_bn.safetensors")["bn.running_var"].sum()))

"""The error contract: bad inputs, pickle safety, atomic output under signals and full disks,
determinism. Each bad input goes through the CLI: one line on stderr, no traceback, exit 1
(2 for usage errors), and nothing at the destination."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from .conftest import console_script, make_state_dicts, sigint_default, slow_chunks


def _good_run(folder, n=3, fmt="pt"):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, sd in enumerate(make_state_dicts(n)):
        p = folder / f"ck_{i}.{fmt}"
        if fmt == "pt":
            torch.save({"epoch": i, "state_dict": sd}, p)
        else:
            save_file(sd, str(p), metadata={"epoch": str(i)})
        paths.append(p)
    return paths


def _cli_fails(run_cli, args, code=1):
    got, out, err = run_cli("merge", *args)
    assert got == code, (got, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _st_bytes(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def test_truncated_torch_checkpoint(tmp_path, run_cli):
    paths = _good_run(tmp_path / "r")
    raw = paths[1].read_bytes()
    for cut in (len(raw) // 2, len(raw) - 10, 100):
        paths[1].write_bytes(raw[:cut])
        msg = _cli_fails(run_cli, [*paths, "-o", tmp_path / "o.pt"])
        assert "ck_1.pt: damaged or truncated torch checkpoint" in msg
    assert not (tmp_path / "o.pt").exists()


def test_truncated_safetensors(tmp_path, run_cli):
    paths = _good_run(tmp_path / "r", fmt="safetensors")
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[:-7])
    msg = _cli_fails(run_cli, [*paths, "-o", tmp_path / "o.safetensors"])
    assert "ck_2.safetensors" in msg and "truncated?" in msg
    paths[2].write_bytes(raw[:5])
    msg = _cli_fails(run_cli, [*paths, "-o", tmp_path / "o.safetensors"])
    assert "too short for a safetensors file" in msg


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("notes.pt", b"epoch 3 was good\n", "not a checkpoint (neither a torch zip file"),
        ("empty.pt", b"", "empty file, not a checkpoint"),
        ("text.safetensors", b"hello world, not a header at all", "header length"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, run_cli, name, content, needle):
    paths = _good_run(tmp_path / "r")
    bad = tmp_path / name
    bad.write_bytes(content)
    msg = _cli_fails(run_cli, [paths[0], bad, "-o", tmp_path / "o.pt"])
    assert name in msg and needle in msg


def test_zip_of_something_else(tmp_path, run_cli):
    paths = _good_run(tmp_path / "r")
    z = tmp_path / "docs.pt"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hi")
    msg = _cli_fails(run_cli, [paths[0], z, "-o", tmp_path / "o.pt"])
    assert "docs.pt: a zip file without data.pkl, not a torch checkpoint" in msg


@pytest.mark.parametrize(
    "header, data, needle",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "run past the end of the file"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "need 12"),
        ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown variant `F33`"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid value: integer `-2`"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 20, "the file holds 20"),
        ({"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}, b"\0" * 8, "run past the end"),
    ],
)
def test_safetensors_with_lying_header(tmp_path, run_cli, header, data, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_st_bytes(header, data))
    ok = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2)}, str(ok))
    msg = _cli_fails(run_cli, [ok, bad, "-o", tmp_path / "o.safetensors"])
    assert "bad.safetensors" in msg and needle in msg


def test_header_length_beyond_file(tmp_path, run_cli):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    msg = _cli_fails(run_cli, [bad, bad.with_name("x.safetensors"), "-o", tmp_path / "o.pt"])
    assert "x.safetensors: no such file" in msg or "header length" in msg
    msg = _cli_fails(run_cli, [bad, "-o", tmp_path / "o.pt"])
    assert "header length 1152921504606846976 is beyond the file size" in msg


def test_missing_tensor_shape_and_kind_mismatch_via_cli(tmp_path, run_cli):
    sds = make_state_dicts(2)
    del sds[0]["conv.bias"]
    torch.save(sds[0], tmp_path / "a_1.pt")
    torch.save(sds[1], tmp_path / "a_2.pt")
    msg = _cli_fails(run_cli, [tmp_path / "a_1.pt", tmp_path / "a_2.pt", "-o", tmp_path / "o.pt"])
    assert "a_1.pt: tensor 'conv.bias' missing" in msg
    sds = make_state_dicts(2)
    sds[0]["fc.bias"] = torch.zeros(11)
    torch.save(sds[0], tmp_path / "b_1.pt")
    torch.save(sds[1], tmp_path / "b_2.pt")
    msg = _cli_fails(run_cli, [tmp_path / "b_1.pt", tmp_path / "b_2.pt", "-o", tmp_path / "o.pt"])
    assert "b_1.pt: tensor 'fc.bias' has shape [11]" in msg
    sds = make_state_dicts(2)
    sds[1]["bn.running_var"] = sds[1]["bn.running_var"].to(torch.int32)
    torch.save(sds[0], tmp_path / "c_1.pt")
    torch.save(sds[1], tmp_path / "c_2.pt")
    msg = _cli_fails(run_cli, [tmp_path / "c_1.pt", tmp_path / "c_2.pt", "-o", tmp_path / "o.pt"])
    assert "tensor 'bn.running_var' is float32 but" in msg and "int32" in msg
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_via_cli(tmp_path, run_cli, bad_value):
    sds = make_state_dicts(3)
    sds[2]["bn.bias"][5] = bad_value
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"n_{i}.pt")
    files = [tmp_path / f"n_{i}.pt" for i in range(3)]
    msg = _cli_fails(run_cli, [*files, "-o", tmp_path / "o.pt"])
    assert "n_2.pt: tensor 'bn.bias' holds" in msg and "[5]" in msg and "--allow-nonfinite" in msg
    code, _, err = run_cli("merge", *files, "-o", tmp_path / "o.pt", "--allow-nonfinite")
    assert code == 0, err


def test_output_folder_is_created_and_unwritable_destination(tmp_path, run_cli):
    paths = _good_run(tmp_path / "r")
    code, _, err = run_cli("merge", *paths, "-o", tmp_path / "new" / "deeper" / "o.pt")
    assert code == 0, err
    assert (tmp_path / "new" / "deeper" / "o.pt").exists()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    msg = _cli_fails(run_cli, [*paths, "-o", blocker / "o.pt"])
    assert "cannot create the output folder: " in msg and "afile is a file" in msg


def _malicious_checkpoint(path, marker, legacy=False):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    obj = {"state_dict": {"w": torch.zeros(3)}, "hook": Evil()}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path, run_cli, legacy):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _malicious_checkpoint(evil, marker, legacy)
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "good.pt")
    msg = _cli_fails(run_cli, [tmp_path / "good.pt", evil, "-o", tmp_path / "o.pt"])
    assert "evil.pt: refusing to load" in msg and "system" in msg and "--trust-pickle" in msg
    assert not marker.exists()
    # inspecting the plan does not run it either
    msg = _cli_fails(run_cli, [tmp_path / "good.pt", evil, "-o", tmp_path / "o.pt", "--dry-run"])
    assert not marker.exists()


def test_trust_pickle_opt_in_warns_once_per_file(tmp_path):
    marker = tmp_path / "ran"
    _malicious_checkpoint(tmp_path / "a_1.pt", marker)
    torch.save({"state_dict": {"w": torch.ones(3)}, "note": "plain"}, tmp_path / "a_2.pt")
    res = subprocess.run(console_script() + ["merge", str(tmp_path / "a_1.pt"), str(tmp_path / "a_2.pt"), "-o",
                                             str(tmp_path / "o.pt"), "--trust-pickle"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if "full unpickling" in ln]
    assert len(warnings) == 2 and any("a_1.pt" in w for w in warnings)
    assert marker.exists()  # the user asked for it
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert torch.allclose(got["w"], torch.full((3,), 0.5))


def _big_run(folder, n=3, elems=6_000_000):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(elems, generator=g)
    files = []
    for i in range(n):
        p = folder / f"big_{i}.pt"
        torch.save({"w": base + i, "v": base[:1000] * i}, p)
        files.append(p)
    return files


def _tmp_files(folder):
    return [p for p in folder.iterdir() if p.name.endswith(".ckptavg-tmp")]


# The command line with every chunk of the merge held up 5 ms: however fast the machine, the merge is
# still running when the signal lands.
_SLOW_CLI = slow_chunks(0.005) + """
import sys
from ckptavg.cli import main
sys.argv = ["ckptavg"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_merge_leaves_nothing(tmp_path, sig, code, existing):
    files = _big_run(tmp_path / "runs")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "avg.pt"
    if existing:
        dest.write_bytes(b"previous result")
    env = dict(os.environ, CKPTAVG_CHUNK_ELEMS="20000")  # many small chunks, each held up: a slow merge
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, "merge", *map(str, files), "-o", str(dest)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = _tmp_files(out_dir)
        if tmps and tmps[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "nothing was written" in err
    assert _tmp_files(out_dir) == []
    if existing:
        assert dest.read_bytes() == b"previous result"
    else:
        assert not dest.exists()


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_full_disk_leaves_nothing(tmp_path, fmt):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i in range(2):
        torch.save({"w": torch.randn(1_000_000) + i}, runs / f"c_{i}.pt")  # 4 MB output > 2 MB limit
    dest = tmp_path / f"avg.{fmt}"
    dest.write_bytes(b"old")
    res = subprocess.run(console_script() + ["merge", str(runs), "-o", str(dest)], capture_output=True, text=True,
                         preexec_fn=_limit_file_size, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "write failed: File too large" in res.stderr and "Traceback" not in res.stderr
    assert dest.read_bytes() == b"old"
    assert _tmp_files(tmp_path) == []


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_output_is_deterministic(tmp_path, fmt, run_cli):
    paths = _good_run(tmp_path / "r", n=4)
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.{fmt}"
        code, _, err = run_cli("merge", *paths, "-o", out, "--method", "ema", "--decay", "0.7")
        assert code == 0, err
        outs.append(out.read_bytes())
        time.sleep(1.1)  # a timestamp in the data would now differ
    assert outs[0] == outs[1]


def test_debug_shows_traceback(tmp_path):
    res = subprocess.run(console_script() + ["--debug", "merge", str(tmp_path / "none.pt"), "-o",
                                             str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr

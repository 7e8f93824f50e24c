"""Storage offsets of torch zip checkpoints come from each record's own local zip header, never
from torch's computation (which assumes its own writer's layout, a data descriptor after every
record): ckptavg's own .pt outputs and checkpoints re-packed by another zip tool read back exactly
as torch.load reads them."""

from __future__ import annotations

import zipfile

import torch

import ckptavg
from ckptavg.io import open_checkpoint


def _sd(scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"scalar": torch.tensor(3.0) * scale, "w": torch.randn(100, generator=g) * scale,
            "v": torch.randn(7, 9, generator=g).to(torch.bfloat16) * scale, "n": torch.tensor(4)}


def _assert_reads_as_torch_load(path) -> None:
    ref = torch.load(path, weights_only=True)
    ref = ref.get("state_dict", ref)
    got = ckptavg.average([path])
    assert set(got) == {k for k, v in ref.items() if isinstance(v, torch.Tensor)}
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k


def test_ckptavg_pt_output_reads_back_as_torch_loads_it(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(_sd(1.0), a)
    torch.save(_sd(2.0), b)
    out = tmp_path / "avg.pt"
    ckptavg.merge([a, b], out, order="given")  # a scalar first: every later storage was misread
    _assert_reads_as_torch_load(out)
    again = tmp_path / "again.safetensors"
    ckptavg.merge([out], again)  # merging an earlier output of ckptavg is a plain read
    assert torch.equal(ckptavg.average([again])["w"], torch.load(out)["w"])


def test_keep_structure_output_reads_back(tmp_path):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"epoch={k}-step={10 * (k + 1)}.ckpt")
        torch.save({"state_dict": _sd(k + 1.0), "epoch": k, "global_step": 10 * (k + 1),
                    "pytorch-lightning_version": "2.4.0"}, paths[-1])
    out = tmp_path / "keep.ckpt"
    ckptavg.merge(paths, out, keep_structure=True)
    _assert_reads_as_torch_load(out)


def test_checkpoint_repacked_by_another_zip_tool(tmp_path):
    src = tmp_path / "orig.pt"
    torch.save(_sd(1.5), src)
    repacked = tmp_path / "repacked.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.extra = b"\xfe\xca" + len(b"padding!").to_bytes(2, "little") + b"padding!"  # an unknown extra field
            zout.writestr(new, data)
    assert torch.equal(torch.load(repacked)["w"], torch.load(src)["w"])  # torch's own full load agrees
    _assert_reads_as_torch_load(repacked)
    with open_checkpoint(repacked) as ckpt:  # and the offsets are those of the local headers
        raw = repacked.read_bytes()
        for name, ref in ckpt.tensors.items():
            if ref.numel:
                n = ref.nbytes
                assert raw[ref.offset:ref.offset + n] == torch.load(repacked)[name].contiguous().view(-1).view(
                    torch.uint8).numpy().tobytes(), name


def test_big_endian_checkpoint_is_refused_before_torch_sees_it(tmp_path):
    """torch's meta loading crashes the process on a big-endian archive (exit 139 with no message):
    the byte order is read from the zip first, and such a file is a one-line error."""
    import subprocess
    import sys

    le, be = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save({"w": torch.randn(10), "v": torch.randn(3)}, le)
    with zipfile.ZipFile(le) as zin, zipfile.ZipFile(be, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, b"big" if info.filename.endswith("/byteorder") else zin.read(info))
    for args in (["inspect", str(be)], ["merge", str(be), str(le), "-o", str(tmp_path / "o.pt"), "--dry-run"]):
        p = subprocess.run([sys.executable, "-m", "ckptavg", *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert f"{be}: a big-endian torch checkpoint (its byteorder record says 'big')" in p.stdout + p.stderr
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "o.pt").exists()


def test_keep_structure_never_runs_a_callable_an_object_sets_for_pickling(tmp_path):
    """An allowed object from a checkpoint (timm's argparse.Namespace) whose own attributes name
    a pickling hook would choose what runs while --keep-structure saves it: refused, not called."""
    import argparse
    from pathlib import Path

    from ckptavg.errors import OutputError
    from ckptavg.io.torch_out import TorchWriter

    called = []
    args = argparse.Namespace(lr=0.1)
    args.__dict__["__reduce_ex__"] = lambda *a: called.append(a) or (dict, ())
    out = tmp_path / "o.pt"
    try:
        TorchWriter(Path(out), [], {"args": args, "epoch": 3})
    except OutputError as e:
        assert "Namespace object sets __reduce_ex__ itself" in str(e)
    else:
        raise AssertionError("the writer pickled an object that chose its own reduction")
    assert called == [] and not out.exists()

"""The read side trusts no claim a file makes (issue 23, items 2, 3, 11, 13): a storage record
named with two dtypes reads as torch.load reads it; a DCP chunk shorter than its own pickle, a
deflate bomb in any zip member torch decompresses (torch file, DCP chunk, DCP ``step`` item), a
zip member whose declared size lies, and DCP metadata of the wrong types are one-line errors;
a compressed storage record is refused with a message that says so."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckptavg.errors import CkptavgError
from ckptavg.io import open_checkpoint

from ._hostile_files import TensorSpec, storage_bytes, torch_zip

# --------------------------------------------------------------------------------------
# helpers: a zip writer that can lie, a deflate bomb, DCP folders rewritten blob by blob


@dataclass
class Deflated:
    """A member stored as the raw deflate stream ``raw`` of ``size`` bytes with CRC ``crc``;
    ``declared`` (default ``size``) is the size the zip headers claim."""

    raw: bytes
    crc: int
    size: int
    declared: int | None = None


def deflated(data: bytes) -> Deflated:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return Deflated(c.compress(data) + c.flush(), zlib.crc32(data), len(data))


def zip_bytes(members: list[tuple[str, bytes | Deflated]], *, stored_declared: dict[str, int] | None = None) -> bytes:
    """A zip of ``members`` (bytes: stored; :class:`Deflated`: method 8), headers as given."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, m in members:
        nb = name.encode()
        if isinstance(m, Deflated):
            method, crc, raw, usize = 8, m.crc, m.raw, m.size if m.declared is None else m.declared
        else:
            method, crc, raw, usize = 0, zlib.crc32(m), m, (stored_declared or {}).get(name, len(m))
        at = out.tell()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(raw), usize, len(nb), 0))
        out.write(nb + raw)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(raw), usize,
                                  len(nb), 0, 0, 0, 0, 0, at) + nb)
    cd = central.getvalue()
    out.write(cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(cd), out.tell(), 0))
    return out.getvalue()


def members(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


_PIECE = 16 << 20


@pytest.fixture(scope="module")
def zeros_piece() -> bytes:
    """A byte-aligned, non-final deflate stream of 16 MiB of zeros (about 16 KB): repeated, it
    inflates to any multiple of 16 MiB."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(_PIECE)) + c.flush(zlib.Z_FULL_FLUSH)


def bomb(data: bytes, zeros_piece: bytes, pieces: int = 48) -> Deflated:
    """``data`` followed by ``pieces`` x 16 MiB of zeros (768 MiB by default, under the 1 GiB cap on
    data.pkl), deflated (~0.8 MB)."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = head.compress(data) + head.flush(zlib.Z_FULL_FLUSH) + zeros_piece * pieces
    raw += zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    crc = zlib.crc32(data)
    z = bytes(_PIECE)
    for _ in range(pieces):
        crc = zlib.crc32(z, crc)
    return Deflated(raw, crc, len(data) + pieces * _PIECE)


def _quiet_dcp_save(sd: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=folder)
    return folder


def _quiet_dcp_load(sd: dict, folder: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=folder)
    return sd


def dcp_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"model": {"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)}, "step": 7}


@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory) -> Path:
    return _quiet_dcp_save(dcp_state(), tmp_path_factory.mktemp("dcp") / "step-7")


def rewrite_dcp(src: Path, dst: Path, edit) -> Path:
    """Copy DCP folder ``src`` to ``dst`` with each stored item's blob replaced by
    ``edit(fqn, blob)`` (the data files and the metadata's offsets rewritten to match)."""
    shutil.copytree(src, dst)
    md = dcp.FileSystemReader(str(src)).read_metadata()
    by_file = collections.defaultdict(list)
    for idx, info in md.storage_data.items():
        by_file[info.relative_path].append((idx, info))
    for rel, items in by_file.items():
        old = (src / rel).read_bytes()
        new = bytearray()
        for idx, info in sorted(items, key=lambda x: x[1].offset):
            blob = edit(idx.fqn, old[info.offset : info.offset + info.length])
            info.offset, info.length = len(new), len(blob)
            new += blob
        (dst / rel).write_bytes(bytes(new))
    with open(dst / ".metadata", "wb") as fh:
        pickle.dump(md, fh)
    return dst


def one_line_error(run_cli, *args) -> str:
    code, out, err = run_cli(*map(str, args))
    lines = err.strip().splitlines()
    assert code == 1, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: ") and "Traceback" not in err, err[-2000:]
    assert len(lines[0]) < 1000, len(lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------
# item 2: one storage record, two dtypes


@pytest.mark.parametrize("first,second", [
    ((torch.float32, 4, (4,)), (torch.int32, 4, (4,))),
    ((torch.int32, 4, (4,)), (torch.float32, 4, (4,))),
    ((torch.float64, 4, (4,)), (torch.float32, 8, (8,))),
    ((torch.float32, 8, (8,)), (torch.float64, 4, (2, 2))),
    ((torch.float16, 8, (8,)), (torch.bfloat16, 8, (2, 4))),
    ((torch.float32, 0, (0,)), (torch.int64, 2, (2,))),  # an empty first reference: torch keeps none
    ((torch.float32, 2, (2,)), (torch.float32, 4, (4,))),  # same dtype, the first names fewer elements
])
def test_storage_named_with_two_dtypes_reads_like_torch_load(tmp_path, first, second):
    (d1, n1, s1), (d2, n2, s2) = first, second
    stride = lambda s: tuple(int(torch.tensor(s[i + 1 :]).prod()) for i in range(len(s)))  # noqa: E731
    rec = n2 * d2.itemsize if n1 == 0 else None  # torch.load wants the record exactly as large as the storage
    a = TensorSpec(key="0", dtype=d1, numel=n1, size=s1, stride=stride(s1), record_bytes=rec)
    b = TensorSpec(key="0", dtype=d2, numel=n2, size=s2, stride=stride(s2))
    p = tmp_path / "two.pt"
    p.write_bytes(torch_zip({"a": a, "b": b, "c": TensorSpec(key="1", dtype=torch.float32)}))
    try:
        ref = torch.load(p, weights_only=True)
    except Exception:
        ref = None
    if ref is None:
        with pytest.raises(CkptavgError):
            ck = open_checkpoint(p)
            [r.materialize() for r in ck.tensors.values()]
        return
    ck = open_checkpoint(p)
    assert set(ck.tensors) == set(ref)
    for k, t in ref.items():
        got = ck.tensors[k].materialize()
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert got.contiguous().view(torch.uint8).tolist() == t.contiguous().view(torch.uint8).tolist(), k
    assert ref["b"].dtype == d1 or n1 == 0  # the case is real: torch gives b the first reference's dtype


def test_reference_outside_the_tree_is_refused_not_guessed(tmp_path):
    """A storage named first by a tensor the object tree drops (a dict key set twice), then by a
    kept tensor of another dtype: which dtype torch gives the kept one is not visible from the tree."""
    from ._hostile_files import Raw, pickle_bytes

    lost = TensorSpec(key="0", dtype=torch.float64, numel=4)
    kept = TensorSpec(key="0", dtype=torch.float32, numel=4)
    ops = b"".join(pickle_bytes(x)[0][2:-1] for x in ("v", lost, "v", kept))
    p = tmp_path / "lost.pt"
    p.write_bytes(torch_zip(Raw(b"}(" + ops + b"u"), extra={"archive/data/0": storage_bytes(lost)}))
    ref = torch.load(p, weights_only=True)
    assert ref["v"].dtype == torch.float64  # torch: the dropped reference decided
    with pytest.raises(CkptavgError, match="refusing to guess") as ei:
        open_checkpoint(p)
    assert "\n" not in str(ei.value)


# --------------------------------------------------------------------------------------
# item 3: a DCP chunk shorter than its own pickle


def _short_data_record(fqn: str, blob: bytes) -> bytes:
    if fqn != "model.w":
        return blob
    return zip_bytes([(n, d[:40] if "/data/" in n else d) for n, d in members(blob)])


def test_dcp_chunk_shorter_than_its_pickle_is_an_error(tmp_path, dcp_folder, run_cli):
    good = rewrite_dcp(dcp_folder, tmp_path / "step-6", lambda fqn, blob: zip_bytes(members(blob)))
    sd = open_checkpoint(good)  # a blob re-packed by another zip writer still reads exactly
    assert torch.equal(sd.tensors["w"].materialize(), dcp_state()["model"]["w"])
    bad = rewrite_dcp(dcp_folder, tmp_path / "step-8", _short_data_record)
    with pytest.raises(CheckpointException, match="record size"):  # the reference refuses the folder too
        _quiet_dcp_load({"model": {"w": torch.zeros(16, 16), "b": torch.zeros(16)}}, bad)
    with pytest.raises(CkptavgError) as ei:
        open_checkpoint(bad).tensors["w"].materialize()
    msg = str(ei.value)
    assert "\n" not in msg and str(bad) in msg and "'model.w'" in msg and "__0_0.distcp" in msg
    assert "holds 40" in msg
    line = one_line_error(run_cli, "merge", bad, good, "--order", "given", "-o", tmp_path / "out.pt")
    assert "'model.w'" in line and not (tmp_path / "out.pt").exists()


# --------------------------------------------------------------------------------------
# item 11: deflate bombs and lying sizes


_RSS = """
import resource, sys
from pathlib import Path
import ckptavg.io
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ck = ckptavg.io.open_checkpoint(Path(sys.argv[1]))
    [r.materialize() for r in ck.tensors.values()]
    print("OK")
except ckptavg.errors.CkptavgError as e:
    print("ERR", str(e).replace(chr(10), " ")[:300])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _rss_mb(path: Path) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", _RSS, str(path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    status, mb = r.stdout.strip().splitlines()[-2:]
    return status, int(mb)


def _pt_members() -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(12.0).reshape(3, 4), "step": 5}, buf)
    return members(buf.getvalue())


@pytest.mark.parametrize("where", ["pt data.pkl", "pt byteorder", "dcp chunk", "dcp step"])
def test_deflate_bomb_allocates_nothing(tmp_path, dcp_folder, zeros_piece, where):
    if where.startswith("pt"):
        target = "data.pkl" if where == "pt data.pkl" else "byteorder"
        m = [(n, bomb(d, zeros_piece) if n.endswith("/" + target) else d) for n, d in _pt_members()]
        path = tmp_path / "bomb.pt"
        path.write_bytes(zip_bytes(m))
    else:
        fqn = "model.w" if where == "dcp chunk" else "step"
        path = rewrite_dcp(dcp_folder, tmp_path / "bomb", lambda k, blob: zip_bytes(
            [(n, bomb(d, zeros_piece) if n.endswith("/data.pkl") and k == fqn else d) for n, d in members(blob)]))
    assert sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir())) < 3 << 20
    status, mb = _rss_mb(path)
    assert mb < 200, f"RSS grew by {mb} MB"  # before: zipfile and torch inflated the 768 MiB member
    assert status.startswith("ERR") and "zip bomb" in status, status


@pytest.mark.parametrize("lie", ["stored size", "deflated declares more", "deflated declares less"])
def test_member_whose_declared_size_lies(tmp_path, lie):
    m: list[tuple[str, bytes | Deflated]] = list(_pt_members())
    declared = None
    if lie == "stored size":
        declared = {next(n for n, _ in m if n.endswith("/data.pkl")): 10_000}
    else:
        m = [(n, deflated(d) if n.endswith("/data.pkl") else d) for n, d in m]
        k = next(i for i, (n, _) in enumerate(m) if n.endswith("/data.pkl"))
        d = m[k][1]
        assert isinstance(d, Deflated)
        d.declared = d.size * 3 if lie == "deflated declares more" else d.size - 7
    p = tmp_path / "lie.pt"
    p.write_bytes(zip_bytes(m, stored_declared=declared))
    with pytest.raises(CkptavgError) as ei:
        open_checkpoint(p)
    assert "\n" not in str(ei.value) and str(p) in str(ei.value) and "data.pkl" in str(ei.value)


def test_compressed_storage_record_says_it_is_compressed(tmp_path, run_cli):
    sd = {"w": torch.randn(64, 64), "b": torch.randn(4096)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    p = tmp_path / "deflated.pt"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in members(buf.getvalue()):
            zf.writestr(n, d)
    assert torch.equal(torch.load(p, weights_only=True)["w"], sd["w"])  # torch reads it
    line = one_line_error(run_cli, "inspect", p)
    assert "compressed" in line and str(p) in line and "holds" not in line


# --------------------------------------------------------------------------------------
# item 13: DCP metadata of the wrong types


class _ShadowedItems(collections.OrderedDict):
    """Pickles as an allowed ``collections.OrderedDict`` with BUILD state ``{"items": 5}``."""

    def __reduce__(self):
        return (collections.OrderedDict, (), {"items": 5}, None, iter(list(super().items())))


def _deep(depth: int) -> bytes:
    return b"]" * depth + b"N" + b"a" * depth


_SENTINEL = "CKPTAVG-SENTINEL"


def _edit_metadata(folder: Path, case: str) -> None:
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    sdm, sto = md.state_dict_metadata, md.storage_data
    w = sdm["model.w"]
    idx = next(k for k in sto if k.fqn == "model.w")
    raw = None
    if case == "int key":
        sdm[5] = sdm.pop("model.b")
    elif case == "int offsets":
        info = sto.pop(idx)
        object.__setattr__(idx, "offset", 0)  # (the frozen dataclass would turn it into a torch.Size)
        sto[idx] = info
    elif case in ("inf size", "negative size", "huge size", "float offset"):
        if case == "inf size":
            w.size = [float("inf"), 16]
        elif case == "negative size":
            w.size = torch.Size([-16, 16])
            w.chunks[0].sizes = torch.Size([-16, 16])
        elif case == "huge size":
            w.size = torch.Size([1 << 40, 16])
            w.chunks[0].sizes = torch.Size([1 << 40, 16])
        else:
            w.chunks[0].offsets = [0.0, 0]
    elif case == "NUL in path":
        sto[idx].relative_path = "__0_0.distcp\0evil"
    elif case == "shadowed items":
        md.state_dict_metadata = _ShadowedItems(sdm)
    elif case in ("deep offset", "deep size"):
        if case == "deep offset":
            sto[idx].offset = _SENTINEL
        else:
            w.size = _SENTINEL
        raw = pickle.dumps(md, protocol=2)
        s = _SENTINEL.encode()
        raw = raw.replace(b"X" + struct.pack("<I", len(s)) + s, _deep(200_000))
    elif case == "15 MB path":
        sto[idx].relative_path = "x" * (15 << 20)
    elif case == "15 MB key":
        sdm["k" * (15 << 20)] = sdm.pop("model.b")
    else:
        raise AssertionError(case)
    (folder / ".metadata").write_bytes(raw if raw is not None else pickle.dumps(md))


@pytest.mark.parametrize("case", ["int key", "int offsets", "inf size", "negative size", "huge size", "float offset",
                                  "NUL in path", "shadowed items", "deep offset", "deep size", "15 MB path",
                                  "15 MB key"])
def test_dcp_metadata_of_wrong_types_is_one_line(tmp_path, dcp_folder, run_cli, case):
    folder = tmp_path / "step-9"
    shutil.copytree(dcp_folder, folder)
    _edit_metadata(folder, case)
    if case == "shadowed items":  # read through the shadow: dict's own items, the right data
        code, _, err = run_cli("merge", folder, dcp_folder, "--order", "given", "-o", tmp_path / "out.pt")
        assert code == 0, err
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        want = dcp_state()["model"]
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        return
    line = one_line_error(run_cli, "merge", folder, dcp_folder, "--order", "given", "-o", tmp_path / "out.pt")
    assert str(folder) in line
    assert not (tmp_path / "out.pt").exists()


def test_safetensors_header_is_not_json_bomb(tmp_path, run_cli):
    """(a sanity check of the existing safetensors path under the same contract: a header that
    claims 10 GB is refused without reading it)"""
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 10 << 30) + json.dumps({"a": {"dtype": "F32", "shape": [1],
                                                                 "data_offsets": [0, 4]}}).encode())
    line = one_line_error(run_cli, "inspect", p)
    assert str(p) in line


def test_big_endian_dcp_chunk_is_an_error_not_a_crash(tmp_path, dcp_folder):
    """(item 10 for DCP chunks: torch's meta loading of a big-endian blob crashes the process)"""
    bad = rewrite_dcp(dcp_folder, tmp_path / "step-8", lambda fqn, blob: zip_bytes(
        [(n, b"big" if n.endswith("/byteorder") and fqn == "model.w" else d) for n, d in members(blob)]))
    status, _ = _rss_mb(bad)  # (in a subprocess: a crash must not take pytest down)
    assert status.startswith("ERR") and "'model.w'" in status and "byte order" in status, status

"""Seeded fuzzing of the read side's new surfaces (issue 23): the zip members of a torch file
(content with correct CRCs, declared sizes, compression, names, duplicates, bombs), a DCP
folder's ``.metadata`` (typed edits of every field, and raw byte flips) and its chunk and
``step`` blobs (the same member edits), and a safetensors header (byte edits).

Each damaged input must either read exactly as the independent reader reads it
(``torch.load(weights_only=True)``, ``dcp.load`` with the same restricted metadata, or
``safetensors.torch.load_file``), or fail with a one-line :class:`CkptavgError`: no other
exception, no partial output (every fourth case also runs ``ckptavg merge`` and checks the
destination), and no large allocation. Fixed seeds and a bounded number of cases (set
CKPTAVG_FUZZ_READS=N for N times more).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from ckptavg.errors import CkptavgError
from ckptavg.io import open_checkpoint
from ckptavg.io.dcp_metadata import read_metadata

from .test_hostile_reads import Deflated, bomb, dcp_state, deflated, members, rewrite_dcp, zip_bytes

SCALE = int(os.environ.get("CKPTAVG_FUZZ_READS", "1"))
_SPECIALS = [-1, 0, 1, 3, 8, 15, 16, 17, 1 << 31, 1 << 40, (1 << 63) - 1, 1.5, float("inf"), float("nan"), None, "x",
             True, (4,), [16, 16]]


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def memory_guard():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _hwm()


@pytest.fixture(scope="module")
def small_zeros() -> bytes:
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(16 << 20)) + c.flush(zlib.Z_FULL_FLUSH)


def _one_line(e: CkptavgError) -> None:
    s = str(e)
    assert "\n" not in s and 0 < len(s) < 1000, s[:2000]


def _read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as c:
        return {k: r.materialize().clone() for k, r in c.tensors.items()}


def _same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for k, t in ref.items():
        g = got[k]
        assert g.dtype == t.dtype and g.shape == t.shape, k
        assert g.contiguous().reshape(-1).view(torch.uint8).tolist() == \
            t.contiguous().reshape(-1).view(torch.uint8).tolist(), k


def _merge_leaves_nothing_partial(run_cli, src: Path, good: Path, out: Path) -> None:
    code, _, err = run_cli("merge", str(src), str(good), "--order", "given", "-o", str(out))
    if code == 0:
        assert out.exists()
        out.unlink()
        return
    lines = err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not out.exists() and not [p for p in out.parent.iterdir() if "ckptavg-tmp" in p.name]


# --------------------------------------------------------------------------------------
# zip members (torch files and DCP blobs)


def mutate_members(rng: random.Random, mem: list[tuple[str, bytes]], zeros: bytes) -> bytes:
    """One random structural edit of a torch zip's members; the zip rebuilt with right CRCs."""
    m: list[tuple[str, bytes | Deflated]] = list(mem)
    declared: dict[str, int] = {}
    k = rng.randrange(len(m))
    name, data = mem[k]
    kind = rng.choice(["pickle bytes", "pickle bytes", "truncate", "extend", "deflate", "declared", "deflated lie",
                       "rename", "drop", "duplicate", "byteorder", "bomb"])
    if kind == "pickle bytes":
        k = next(i for i, (n, _) in enumerate(m) if n.endswith("/data.pkl"))
        b = bytearray(mem[k][1])
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        m[k] = (mem[k][0], bytes(b))
    elif kind == "truncate":
        m[k] = (name, data[: rng.randrange(max(1, len(data)))])
    elif kind == "extend":
        m[k] = (name, data + bytes(rng.randrange(1, 64)))
    elif kind == "deflate":
        m[k] = (name, deflated(data))
    elif kind == "declared":
        declared[name] = rng.choice([0, len(data) - 1, len(data) + 1, len(data) * 2, 1 << 31])
    elif kind == "deflated lie":
        d = deflated(data)
        d.declared = max(0, d.size + rng.choice([-5, -1, 1, 100, 1 << 20]))
        m[k] = (name, d)
    elif kind == "rename":
        m[k] = (name[:-1] + rng.choice("07x"), data)
    elif kind == "drop":
        del m[k]
    elif kind == "duplicate":
        m.insert(rng.randrange(len(m) + 1), (name, data))
    elif kind == "byteorder":
        k = next((i for i, (n, _) in enumerate(m) if n.endswith("/byteorder")), k)
        m[k] = (m[k][0], rng.choice([b"big", b"", b"LITTLE", b"little\n", b"little"]))
    else:
        k = next(i for i, (n, _) in enumerate(m) if n.endswith("/data.pkl"))
        m[k] = (mem[k][0], bomb(mem[k][1], zeros, pieces=rng.choice([1, 4])))
    return zip_bytes(m, stored_declared=declared)


def _pt_members() -> list[tuple[str, bytes]]:
    g = torch.Generator().manual_seed(5)
    big = torch.randn(6, 5, generator=g)
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(4, 3, generator=g), "wt": big.t(), "slice": big[1:3],
                               "h": torch.randn(3, generator=g).half(), "n": torch.tensor(7)}, "step": 5}, buf)
    return members(buf.getvalue())


def _torch_reference(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:
        return None
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else None


def test_fuzz_torch_zip_members(tmp_path, memory_guard, small_zeros, run_cli):
    rng = random.Random(2301)
    mem = _pt_members()
    good = tmp_path / "good.pt"
    good.write_bytes(zip_bytes(list(mem)))
    _same(_read(good), _torch_reference(good) or {})
    outcomes = {"same": 0, "refused": 0}
    for case in range(80 * SCALE):
        path = tmp_path / f"m{case % 4}.pt"
        path.write_bytes(mutate_members(rng, mem, small_zeros))
        reference = _torch_reference(path)
        try:
            got = _read(path)
        except CkptavgError as e:
            _one_line(e)
            outcomes["refused"] += 1
        else:
            assert reference is not None, f"case {case}: ckptavg read a file torch.load refuses"
            _same(got, reference)
            outcomes["same"] += 1
        assert _hwm() - memory_guard < 300 << 20, f"case {case}: a large allocation"
        if case % 4 == 0:
            _merge_leaves_nothing_partial(run_cli, path, good, tmp_path / "out.pt")
    assert min(outcomes.values()) >= 8 * SCALE, outcomes  # both outcomes reached


# --------------------------------------------------------------------------------------
# DCP folders


class _RestrictedReader(FileSystemReader):
    """torch's own DCP reader (its planner and chunk reads), with ``.metadata`` unpickled by the
    restricted unpickler instead of ``pickle.load`` (a fuzzed pickle must not run anything)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self._folder = folder

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_metadata(self._folder, False)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def _dcp_reference(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    target = {"model": {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in like.items()}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, storage_reader=_RestrictedReader(folder))
    except (Exception, CheckpointException):
        return None
    return target["model"]


def _check_dcp_case(folder: Path, case: int, outcomes: dict[str, int]) -> None:
    try:
        got = _read(folder)
    except CkptavgError as e:
        _one_line(e)
        outcomes["refused"] += 1
        return
    reference = _dcp_reference(folder, got)
    assert reference is not None, f"case {case}: ckptavg read a folder dcp.load refuses"
    _same(got, reference)
    outcomes["same"] += 1


@pytest.fixture(scope="module")
def dcp_good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dcpf") / "step-7"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dcp_state(), checkpoint_id=folder)
    return folder


def _edit_metadata_object(rng: random.Random, md) -> None:
    sdm, sto = md.state_dict_metadata, md.storage_data
    fqn = rng.choice(["model.w", "model.b"])
    tmd = sdm[fqn]
    kind = rng.choice(["chunk", "size", "dtype", "storage", "path", "drop storage", "drop chunk", "dup chunk",
                       "rename"])
    if kind in ("chunk", "size"):
        dims = list(tmd.size)
        target = tmd.chunks[0] if kind == "chunk" else tmd
        attr = rng.choice(["offsets", "sizes"]) if kind == "chunk" else "size"
        vals = list(getattr(target, attr))
        vals[rng.randrange(len(dims))] = rng.choice(_SPECIALS)
        setattr(target, attr, vals if rng.random() < 0.5 else tuple(vals))
    elif kind == "dtype":
        tmd.properties.dtype = rng.choice([torch.float16, torch.float64, torch.int32, torch.bfloat16, "float32",
                                           None])
    elif kind in ("storage", "path"):
        info = next(v for k, v in sto.items() if k.fqn == fqn)
        if kind == "path":
            info.relative_path = rng.choice(["", "../x", "/etc/passwd", "__0_0.distcp\0", "nope.distcp", 5])
        else:
            attr = rng.choice(["offset", "length"])
            v = getattr(info, attr)
            setattr(info, attr, rng.choice([v - 1, v + 1, v - 100, v + 7, -1, 1 << 40, 0, 1.0, None]))
    elif kind == "drop storage":
        del sto[next(k for k in sto if k.fqn == fqn)]
    elif kind == "drop chunk":
        tmd.chunks.pop()
    elif kind == "dup chunk":
        tmd.chunks.append(tmd.chunks[0])
    else:
        sdm[fqn + rng.choice(["x", ".1", ""])] = sdm.pop(fqn)


def test_fuzz_dcp_metadata(tmp_path, memory_guard, dcp_good, run_cli):
    rng = random.Random(2302)
    raw = (dcp_good / ".metadata").read_bytes()
    outcomes = {"same": 0, "refused": 0}
    for case in range(60 * SCALE):
        folder = tmp_path / f"step-{case}"
        shutil.copytree(dcp_good, folder)
        if case % 3 == 2:  # raw byte flips of the pickle
            b = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            (folder / ".metadata").write_bytes(bytes(b))
        else:
            md = FileSystemReader(str(dcp_good)).read_metadata()
            _edit_metadata_object(rng, md)
            (folder / ".metadata").write_bytes(pickle.dumps(md))
        _check_dcp_case(folder, case, outcomes)
        assert _hwm() - memory_guard < 300 << 20, f"case {case}: a large allocation"
        if case % 4 == 0:
            _merge_leaves_nothing_partial(run_cli, folder, dcp_good, tmp_path / "out.pt")
        shutil.rmtree(folder)
    assert min(outcomes.values()) >= 3 * SCALE, outcomes


def test_fuzz_dcp_blobs(tmp_path, memory_guard, dcp_good, small_zeros, run_cli):
    rng = random.Random(2303)
    outcomes = {"same": 0, "refused": 0}
    for case in range(40 * SCALE):
        fqn = rng.choice(["model.w", "model.b", "step"])
        folder = rewrite_dcp(dcp_good, tmp_path / f"step-{case}", lambda k, blob, fqn=fqn: (
            mutate_members(rng, members(blob), small_zeros) if k == fqn else zip_bytes(members(blob))))
        _check_dcp_case(folder, case, outcomes)
        assert _hwm() - memory_guard < 300 << 20, f"case {case}: a large allocation"
        if case % 4 == 0:
            _merge_leaves_nothing_partial(run_cli, folder, dcp_good, tmp_path / "out.pt")
        shutil.rmtree(folder)
    assert min(outcomes.values()) >= 4 * SCALE, outcomes


# --------------------------------------------------------------------------------------
# safetensors header


def test_fuzz_safetensors_header_bytes(tmp_path, memory_guard):
    rng = random.Random(2304)
    g = torch.Generator().manual_seed(6)
    raw = save({"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).half(),
                "n": torch.tensor([1, 2, 3])}, metadata={"step": "3"})
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    harmless = [header.index(s) + 1 for s in (b'"w"', b'"h"', b'"n"', b'"3"')]  # a name, the step value
    outcomes = {"same": 0, "refused": 0}
    for case in range(80 * SCALE):
        b = bytearray(raw)
        if rng.random() < 0.3:  # a valid edit: another name, another step
            b[8 + rng.choice(harmless)] = ord(rng.choice("abq0123456789"))
        for _ in range(rng.randint(0 if rng.random() < 0.3 else 1, 3)):
            p = 8 + rng.randrange(n)
            b[p] = ord(rng.choice('0123456789",:{}[] FUIB8xe-.')) if rng.random() < 0.8 else rng.randrange(256)
        path = tmp_path / "h.safetensors"
        path.write_bytes(bytes(b))
        try:
            reference = load_file(str(path))
        except Exception:
            reference = None
        try:
            got = _read(path)
        except CkptavgError as e:
            _one_line(e)
            outcomes["refused"] += 1
        else:
            assert reference is not None, f"case {case}: ckptavg read a file safetensors refuses"
            _same(got, reference)
            outcomes["same"] += 1
        assert _hwm() - memory_guard < 300 << 20, f"case {case}: a large allocation"
    assert min(outcomes.values()) >= 5 * SCALE, outcomes

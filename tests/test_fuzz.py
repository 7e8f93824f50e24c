"""Property-based fuzzing of the readers with mutated .pt and .safetensors files.

Reading a mutated file must either succeed with the right data or raise CkptavgError:
never another exception, never a hang, never a large allocation. "The right data":

* safetensors: exactly what the reference reader (``safetensors.torch.load_file``) returns
  for the same bytes, and an error exactly when it refuses them;
* torch zip: the original names, shapes and dtypes, and a tensor's bytes may differ from the
  original only if a mutated byte lies inside that tensor's own zip record.

Byte mutations never reach the pickle (its CRC check refuses every mutated data.pkl), so
structure-aware tests also build files from valid parts: pickles of valid opcodes with hostile
tensor geometry, dtypes, globals that run code and deep nesting, zipped with correct CRCs (they
reach torch's unpickler) or written raw (legacy files); safetensors headers with hostile JSON;
HF folders with hostile index.json. Reading must give what ``torch.load(weights_only=True)`` /
``safetensors.torch.load_file`` gives for the same file, or raise CkptavgError.

The default run is short; set CKPTAVG_FUZZ_EXAMPLES (e.g. 5000) for a longer one.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ckptavg.errors import CkptavgError
from ckptavg.io import open_checkpoint

from ._hostile_files import Deep, Global, TensorSpec, legacy_pickle, safetensors_raw, torch_zip

EXAMPLES = int(os.environ.get("CKPTAVG_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _state_dict():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, generator=g)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g).bfloat16(),
        "view.t": big.t(),
        "view.slice": big[1:3],
        "count": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2, generator=g).half(),
    }


def _pt_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"epoch": 3, "global_step": 300, "metrics": {"acc": torch.tensor(0.5)}, "state_dict": _state_dict()},
               buf)
    return buf.getvalue()


def _st_bytes() -> bytes:
    sd = {k: v.contiguous() for k, v in _state_dict().items() if k not in ("view.t", "view.slice")}
    tmp = io.BytesIO()
    from safetensors.torch import save

    tmp.write(save(sd, metadata={"step": "300", "epoch": "3"}))
    return tmp.getvalue()


PT = _pt_bytes()
ST = _st_bytes()


def _record_spans(raw: bytes) -> dict[str, tuple[int, int]]:
    """For the original .pt: each storage key -> [local header start, data end)."""
    zf = zipfile.ZipFile(io.BytesIO(raw))
    spans = {}
    for info in zf.infolist():
        if "/data/" in info.filename:
            h = info.header_offset
            nlen, elen = struct.unpack("<HH", raw[h + 26 : h + 30])
            spans[info.filename.rsplit("/", 1)[1]] = (h, h + 30 + nlen + elen + info.file_size)
    return spans


PT_SPANS = _record_spans(PT)


def _storage_keys(raw: bytes) -> dict[str, str]:
    """For the original .pt: each state-dict tensor -> the key of the storage (record) holding it."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "o.pt")
        with open(p, "wb") as f:
            f.write(raw)
        with open_checkpoint(p) as c:
            return {name: ref.alias_key[0] for name, ref in c.tensors.items()}


PT_KEYS = _storage_keys(PT)


def _mutate(raw: bytes, kind: str, data) -> tuple[bytes, set[int]]:
    """Apply one mutation; return the new bytes and the positions it touched in the original."""
    b = bytearray(raw)
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(b) - 1))
        return bytes(b[:cut]), set(range(cut, len(b)))
    if kind == "bitflips":
        pos = data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8))
        for p in pos:
            b[p] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(b), set(pos)
    if kind == "overwrite":
        start = data.draw(st.integers(0, len(b) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        end = min(len(b), start + len(chunk))
        b[start:end] = chunk[: end - start]
        return bytes(b), set(range(start, end))
    if kind == "head":  # mutations concentrated in the first bytes (pickle / JSON header)
        pos = data.draw(st.lists(st.integers(0, min(len(b), 700) - 1), min_size=1, max_size=4))
        for p in pos:
            b[p] = data.draw(st.integers(0, 255))
        return bytes(b), set(pos)
    raise AssertionError(kind)


def _read_all(path):
    with open_checkpoint(path) as c:
        out = {}
        for name, ref in c.tensors.items():
            t = ref.materialize()
            # keep the raw bytes: a clone() of a bool tensor would normalise invalid bool bytes
            out[name] = (t.shape, t.dtype, t.reshape(-1).view(torch.uint8).clone())
            ref.release()
        return out


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


def _check_like_safetensors(path, memory_guard: int | None = None) -> None:
    """ckptavg reads exactly what the reference reader reads, and refuses what it refuses."""
    try:
        reference = load_file(str(path))
    except Exception:
        reference = None
    try:
        got = _read_all(path)
    except CkptavgError:
        got = None
    finally:
        if memory_guard is not None:
            assert _hwm() - memory_guard < 300 << 20, "a large allocation while reading a small file"
    if reference is None:
        assert got is None, "ckptavg accepted a file the safetensors reader refuses"
        return
    if got is None:
        # ckptavg is stricter only about gaps between tensors' bytes, which the format forbids
        return
    assert set(got) == set(reference)
    for k, v in reference.items():
        shape, dtype, raw_bytes = got[k]
        assert dtype == v.dtype and shape == v.shape
        assert torch.equal(raw_bytes, v.reshape(-1).view(torch.uint8))


MUTATIONS = st.sampled_from(["truncate", "bitflips", "overwrite", "head"])


@FUZZ
@given(kind=MUTATIONS, data=st.data())
def test_fuzz_torch_zip(tmp_path_factory, memory_guard, kind, data):
    raw, touched = _mutate(PT, kind, data)
    path = tmp_path_factory.mktemp("fz") / "m.pt"
    path.write_bytes(raw)
    original = _state_dict()
    try:
        got = _read_all(path)
    except CkptavgError:
        return
    finally:
        assert _hwm() - memory_guard < 300 << 20, "a large allocation while reading a small file"
    assert set(got) == set(original)
    for name, (shape, dtype, raw_bytes) in got.items():
        ref = original[name]
        assert shape == ref.shape and dtype == ref.dtype, name
        if not torch.equal(raw_bytes, ref.contiguous().reshape(-1).view(torch.uint8)):
            # only a mutation inside the zip record holding this tensor can change its data
            lo, hi = PT_SPANS[PT_KEYS[name]]
            assert any(lo <= p < hi for p in touched), name


@FUZZ
@given(kind=MUTATIONS, data=st.data())
def test_fuzz_safetensors(tmp_path_factory, memory_guard, kind, data):
    raw, _ = _mutate(ST, kind, data)
    path = tmp_path_factory.mktemp("fz") / "m.safetensors"
    path.write_bytes(raw)
    _check_like_safetensors(path, memory_guard)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header_edits(tmp_path_factory, data):
    """Edit the JSON header's fields (then fix up its length) to lie about tensors."""
    (n,) = struct.unpack("<Q", ST[:8])
    header = json.loads(ST[8 : 8 + n])
    payload = ST[8 + n :]
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    if field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X", 3]))
    elif field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(-2, 1 << 40), max_size=4))
    else:
        header[name]["data_offsets"] = data.draw(st.lists(st.integers(-5, 1 << 62), min_size=0, max_size=3))
    hb = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fz") / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + payload)
    _check_like_safetensors(path)


def test_fuzz_inputs_are_valid_to_begin_with(tmp_path):
    (tmp_path / "a.pt").write_bytes(PT)
    (tmp_path / "a.safetensors").write_bytes(ST)
    got = _read_all(tmp_path / "a.pt")
    for k, v in _state_dict().items():
        assert torch.equal(got[k][2], v.contiguous().reshape(-1).view(torch.uint8))
    assert set(_read_all(tmp_path / "a.safetensors")) == set(load_file(str(tmp_path / "a.safetensors")))


# -- structure-aware fuzzing: valid opcodes and valid zips, hostile content

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
_BIG = st.one_of(st.integers(-3, 40), st.sampled_from([1 << 31, 1 << 40, 1 << 62, (1 << 63) - 1, -(1 << 40)]))


@st.composite
def _tensor_specs(draw, key):
    ndim = draw(st.integers(0, 3))
    return TensorSpec(key=key, dtype=draw(st.sampled_from(_DTYPES)), numel=draw(st.integers(0, 24) | _BIG),
                      offset=draw(_BIG), size=tuple(draw(st.lists(_BIG, min_size=ndim, max_size=ndim))),
                      stride=tuple(draw(st.lists(_BIG, min_size=ndim, max_size=ndim))),
                      record_bytes=draw(st.none() | st.integers(0, 96)))


_CODE = st.builds(Global, st.sampled_from(["os", "posix", "builtins", "subprocess", "torch", "collections"]),
                  st.sampled_from(["system", "eval", "exec", "getattr", "Popen", "load"]),
                  st.just(("true",)))
_LEAVES = st.one_of(st.none(), st.booleans(), _BIG, st.floats(), st.text(max_size=8),
                    st.integers(0, 10**400).filter(lambda x: x > 10**300) | st.just(10**400), _CODE,
                    st.builds(Deep, st.integers(1, 3000), st.none()))


@st.composite
def _pickle_trees(draw):
    """{"state_dict": {name: tensor spec...}, other keys: hostile leaves} with storages shared or not."""
    n = draw(st.integers(1, 4))
    keys = [str(draw(st.integers(0, 2))) for _ in range(n)]
    sd = {f"t{i}": draw(_tensor_specs(k)) for i, k in enumerate(keys)}
    extra = draw(st.dictionaries(st.sampled_from(["epoch", "step", "metrics", "x"]), _LEAVES, max_size=3))
    return {"state_dict": sd, **extra} if draw(st.booleans()) else sd


def _reference_torch(path):
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:
        return None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else None


def _check_like_torch(path, memory_guard):
    reference = _reference_torch(path)
    try:
        got = _read_all(path)
    except CkptavgError:
        got = None
    finally:
        assert _hwm() - memory_guard < 300 << 20, "a large allocation while reading a small file"
    if got is None:
        return  # refusing is always allowed; never another exception
    assert reference is not None, "ckptavg accepted a file torch.load(weights_only=True) refuses"
    assert set(got) == set(reference)
    for k, v in reference.items():
        shape, dtype, raw_bytes = got[k]
        assert dtype == v.dtype and shape == v.shape, k
        assert torch.equal(raw_bytes, v.contiguous().reshape(-1).view(torch.uint8)), k


@FUZZ
@given(tree=_pickle_trees(), legacy=st.booleans())
def test_fuzz_structured_pickles(tmp_path_factory, memory_guard, tree, legacy):
    path = tmp_path_factory.mktemp("fz") / "p.pt"
    path.write_bytes(legacy_pickle(tree) if legacy else torch_zip(tree))
    _check_like_torch(path, memory_guard)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=8)


@st.composite
def _st_headers(draw):
    """A header as JSON text: entries with valid or hostile fields, duplicate keys, deep nesting."""
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        entry = {"dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "X"]) | _JSON_VALUES),
                 "shape": draw(st.lists(st.integers(0, 4), max_size=2) | _JSON_VALUES),
                 "data_offsets": draw(st.lists(st.integers(0, 40), min_size=2, max_size=2) | _JSON_VALUES)}
        name = draw(st.sampled_from(["a", "b", "a"]))  # duplicates allowed
        parts.append(f"{json.dumps(name)}: {json.dumps(entry)}")
    if draw(st.booleans()):
        parts.append(f'"__metadata__": {json.dumps(draw(_JSON_VALUES))}')
    if draw(st.booleans()):
        d = draw(st.integers(1, 5000))
        parts.append('"deep": ' + "[" * d + "]" * d)
    if draw(st.booleans()):
        parts.append('"huge": ' + "9" * draw(st.integers(20, 500)))
    return "{" + ", ".join(parts) + "}"


@FUZZ
@given(header=_st_headers(), data=st.binary(max_size=48))
def test_fuzz_safetensors_hostile_json(tmp_path_factory, memory_guard, header, data):
    path = tmp_path_factory.mktemp("fz") / "j.safetensors"
    path.write_bytes(safetensors_raw(header.encode(), data))
    _check_like_safetensors(path, memory_guard)


@FUZZ
@given(index=_JSON_VALUES | st.builds(lambda m: {"weight_map": m}, _JSON_VALUES)
       | st.builds(lambda v: {"weight_map": {"a": v}}, st.sampled_from(
           ["", ".", "..", "/etc/passwd", "model.safetensors", "shard.safetensors", "a/b", "index.json"])))
def test_fuzz_hf_index(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("fz") / "m"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(folder / "shard.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        with open_checkpoint(folder) as c:
            got = {k: r.materialize().clone() for k, r in c.tensors.items()}
    except CkptavgError:
        return
    # accepted: only an index that maps every listed tensor to the real shard
    assert index["weight_map"] and set(index["weight_map"].values()) == {"shard.safetensors"}
    assert set(got) == {"a"} and torch.equal(got["a"], torch.ones(2))

"""Engine internals that the merge tests do not reach: 16-bit cancellation, many tiny tensors,
output write-behind, and the worker threads (same bytes for any count, first error in plan
order)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg import engine
from ckptavg.errors import NonFiniteError, OptionError
from ckptavg.io import files

from .conftest import fp64_mean


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_cancellation_is_correctly_rounded(tmp_path, dtype):
    big = 2.0**30 if dtype == torch.bfloat16 else 2.0**14
    vals = [big, 1.0, -big]
    paths = []
    for i, v in enumerate(vals):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file({"w": torch.tensor([v, v / 2, 3.0], dtype=dtype)}, str(paths[-1]))
    got = ckptavg.average(paths, order="given")["w"]
    ref = fp64_mean([torch.tensor([v, v / 2, 3.0], dtype=dtype) for v in vals]).to(dtype)
    assert got[0].item() != 0.0  # float32 accumulation gave 0.0 here
    assert torch.equal(got, ref)


def test_many_tiny_tensors_merge_quickly(tmp_path):
    n = 20_000
    sds = [{f"layer.{i}.w": torch.full((4,), float(i + k) / 3) for i in range(n)} for k in range(2)]
    for sd in sds:
        sd["count"] = torch.tensor(7)
    paths = []
    for k, sd in enumerate(sds):
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file(sd, str(paths[-1]))
    t0 = time.perf_counter()
    ckptavg.merge(paths, tmp_path / "out.safetensors", order="given")
    took = time.perf_counter() - t0
    got = load_file(str(tmp_path / "out.safetensors"))
    for name in ("layer.0.w", "layer.12345.w", f"layer.{n - 1}.w"):
        assert torch.equal(got[name], fp64_mean([sd[name] for sd in sds]).float())
    assert torch.equal(got["count"], sds[-1]["count"])
    # the old per-tensor engine took ~6 s for this on a quiet machine; generous for shared CI
    assert took < 30, took


def test_write_behind_keeps_the_file_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "FLUSH_EVERY", 1000)
    dest = tmp_path / "o.bin"
    f = files.AtomicFile(dest)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (50_000,), dtype=torch.uint8, generator=g)
    mv = files.tensor_memoryview(data)
    pos = 0
    for size in (1, 7, 999, 1001, 4096, 13, 20_000):
        f.write(mv[pos : pos + size])
        pos += size
    f.write(mv[pos:])
    if files._sync_file_range is not None:  # Linux: writeback was started along the way
        assert f._flushed > 0
    f.commit()
    assert dest.read_bytes() == bytes(data.numpy())


def _mixed_checkpoints(tmp_path, n=4):
    """Large and tiny float tensors, bf16 ones, and integer buffers, in a file order that
    makes the engine pack, split and copy within the same units."""
    g = torch.Generator().manual_seed(3)
    paths, sds = [], []
    for k in range(n):
        sd = {
            "big": torch.randn(50, 23, generator=g),
            "tiny.0": torch.randn(3, generator=g),
            "steps": torch.tensor(10 * k),
            "tiny.1": torch.randn(2, 2, generator=g),
            "half": torch.randn(311, generator=g).to(torch.bfloat16),
            "ids": torch.arange(40, dtype=torch.int32) + k,
            "wide": torch.randn(7, 61, generator=g, dtype=torch.float64),
        }
        sds.append(sd)
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file(sd, str(paths[-1]))
    return paths, sds


def test_worker_count_does_not_change_a_byte(tmp_path, monkeypatch):
    paths, sds = _mixed_checkpoints(tmp_path)
    monkeypatch.setattr(engine.schedule, "BLOCK_ELEMS", 17)  # blocks cut through tensors and packed segments
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "97")
    outs = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("CKPTAVG_WORKERS", workers)
        ckptavg.merge(paths, tmp_path / f"w{workers}-{{last}}.safetensors", last=[4, 3], order="given")
        outs[workers] = [(tmp_path / f"w{workers}-{k}.safetensors").read_bytes() for k in (4, 3)]
    assert outs["1"] == outs["3"]
    got = load_file(str(tmp_path / "w3-4.safetensors"))
    for name in ("big", "tiny.0", "tiny.1", "half", "wide"):
        ref = fp64_mean([sd[name] for sd in sds])
        if name == "wide":
            torch.testing.assert_close(got[name], ref, rtol=1e-15, atol=1e-15)
        elif name == "half":
            assert torch.equal(got[name], ref.to(torch.bfloat16))  # float64 sums: correctly rounded
        else:
            torch.testing.assert_close(got[name].double(), ref, rtol=4e-6, atol=2e-6)
    assert torch.equal(got["ids"], sds[-1]["ids"]) and torch.equal(got["steps"], sds[-1]["steps"])
    last3 = load_file(str(tmp_path / "w3-3.safetensors"))  # an output whose first input is the second
    assert torch.equal(last3["half"], fp64_mean([sd["half"] for sd in sds[1:]]).to(torch.bfloat16))
    torch.testing.assert_close(last3["big"].double(), fp64_mean([sd["big"] for sd in sds[1:]]), rtol=4e-6, atol=2e-6)


def test_first_error_in_plan_order_is_reported(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    names = [f"layer.{i:02d}" for i in range(12)]
    paths = []
    for k in range(3):
        sd = {n: torch.randn(64, generator=g) for n in names}
        if k == 1:
            sd["layer.04"][10] = float("nan")  # the first bad tensor in plan order
            sd["layer.09"][0] = float("inf")
            sd["layer.11"][3] = float("nan")
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file(sd, str(paths[-1]))
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "64")  # one unit per tensor
    monkeypatch.setenv("CKPTAVG_WORKERS", "4")
    for attempt in range(5):
        out = tmp_path / f"o{attempt}.safetensors"
        with pytest.raises(NonFiniteError, match=r"c1\.safetensors: tensor 'layer\.04' holds nan at index \[10\]"):
            ckptavg.merge(paths, out, order="given")
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.safetensors", "c1.safetensors", "c2.safetensors"]


def test_interrupt_waits_for_every_thread(tmp_path, monkeypatch):
    """Ctrl-C while the main thread waits: the run must not return before its threads have
    ended (Python 3.11's interrupted Thread.join marks a running thread finished; a run that
    trusted it returned under a live thread, and the interpreter's teardown then aborted)."""
    paths, _ = _mixed_checkpoints(tmp_path, 3)
    monkeypatch.setenv("CKPTAVG_CHUNK_ELEMS", "97")
    monkeypatch.setenv("CKPTAVG_WORKERS", "2")
    real_read = engine.worker.read_runs

    def slow_read(*args):
        time.sleep(0.2)  # a worker is nearly always inside a read when the interrupt arrives
        return real_read(*args)

    def on_usr1(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.worker, "read_runs", slow_read)
    previous = signal.signal(signal.SIGUSR1, on_usr1)
    main = threading.main_thread().ident
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            ckptavg.merge(paths, tmp_path / "o.safetensors")
        alive = [t.name for t in threading.enumerate() if t.name.startswith("ckptavg-")]
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert alive == []
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_worker_count_is_an_option_error(tmp_path, monkeypatch, value):
    paths, _ = _mixed_checkpoints(tmp_path, 2)
    monkeypatch.setenv("CKPTAVG_WORKERS", value)
    with pytest.raises(OptionError, match="CKPTAVG_WORKERS must be a positive integer"):
        ckptavg.merge(paths, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_write_behind_drops_written_pages_from_the_cache(tmp_path, monkeypatch):
    """The output is not kept in the page cache once on disk (it would only evict other data)."""
    if files._sync_file_range is None or not hasattr(os, "posix_fadvise"):
        pytest.skip("sync_file_range/posix_fadvise not available here")
    monkeypatch.setattr(files, "FLUSH_EVERY", 1 << 16)
    dropped = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    dest = tmp_path / "o.bin"
    f = files.AtomicFile(dest)
    data = os.urandom(1 << 20)
    for k in range(0, len(data), 50_000):
        f.write(data[k : k + 50_000])
    f.commit()
    assert dest.read_bytes() == data
    assert dropped and dropped[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(dropped, dropped[1:]))  # contiguous, in order
    assert dropped[-1][0] + dropped[-1][1] >= len(data) // 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_output_is_fsynced_before_the_rename(tmp_path, monkeypatch, suffix):
    """Durability: the finished temporary file reaches the disk before it takes the output's
    name, and the folder's entry after."""
    paths, _ = _mixed_checkpoints(tmp_path, 2)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / f"avg.{suffix}"
    ckptavg.merge(paths, out)
    renames = [e for e in events if e[0] == "replace" and e[2] == str(out)]
    assert len(renames) == 1
    k = events.index(renames[0])
    tmp = renames[0][1]
    assert ("fsync", tmp) in events[:k]  # the file's data, before the rename
    assert ("fsync", str(tmp_path)) in events[k + 1 :]  # the folder entry, after it


@pytest.mark.parametrize("values,in_dtype,out_dtype,bad", [
    # float32 sums, divided in float64, cast to float16
    ([65519.0, 65519.0], torch.float32, "float16", False),  # the mean rounds down to 65504, the largest
    ([65520.0, 65520.0], torch.float32, "float16", True),  # ... and from 65520 up to inf
    ([-65519.0, -65521.0], torch.float32, "float16", True),
    # float64 sums, divided in place, cast to bfloat16
    ([3.0e38, 3.3e38], torch.float64, "bfloat16", False),
    ([3.4e38, 3.4e38], torch.float64, "bfloat16", True),  # bfloat16's largest is 3.39e38
    ([-3.5e38, 1.0], torch.float64, "bfloat16", False),
    ([-3.5e38, -3.5e38], torch.float64, "bfloat16", True),
])
def test_narrowing_cast_overflow_found_at_its_index(tmp_path, values, in_dtype, out_dtype, bad):
    """The overflow check of the cast to a narrower output dtype, at the edge of the range,
    in the middle of a chunk of several cache-sized blocks, against float64 ground truth."""
    n, k = 150_000, 131_077
    paths = []
    for i, v in enumerate(values):
        w = torch.zeros(n, dtype=in_dtype)
        w[k] = v
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file({"w": w}, str(paths[-1]))
    ref = (torch.tensor(values, dtype=in_dtype).double().sum() / len(values)).to(getattr(torch, out_dtype))
    assert torch.isfinite(ref).item() != bad  # the test's own premise
    out = tmp_path / "o.safetensors"
    if not bad:
        ckptavg.merge(paths, out, dtype=out_dtype)
        got = load_file(str(out))["w"]
        assert got[k] == ref and got.count_nonzero() == 1
    else:
        with pytest.raises(NonFiniteError, match=rf"tensor 'w': the average at index \[{k}\] overflows {out_dtype}"):
            ckptavg.merge(paths, out, dtype=out_dtype)
        assert not out.exists()


def test_float64_to_float32_overflow(tmp_path):
    paths = []
    for i in range(3):
        w = torch.ones(5, dtype=torch.float64)
        w[3] = 1e300 * (i + 1)
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file({"w": w}, str(paths[-1]))
    with pytest.raises(NonFiniteError, match=r"tensor 'w': the average at index \[3\] overflows float32"):
        ckptavg.merge(paths, tmp_path / "o.safetensors", dtype="float32")


def test_a_worker_alone_averages_one_unit(tmp_path):
    """The worker is a class of its own: built from a run's shared state, it processes one unit
    (read, accumulate, divide, cast) and lays out exactly the bytes a merge writes."""
    from ckptavg.engine.schedule import cut_units
    from ckptavg.engine.threads import Job
    from ckptavg.engine.worker import Worker
    from ckptavg.io.memory_out import MemoryWriter
    from ckptavg.options import MergeOptions
    from ckptavg.planner import build_plan

    g = torch.Generator().manual_seed(3)
    sds = [{"a": torch.randn(300, generator=g), "b": torch.randn(5, 7, generator=g).to(torch.bfloat16),
            "n": torch.tensor(k)} for k in range(3)]
    paths = []
    for k, sd in enumerate(sds):
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file(sd, str(paths[-1]))
    plan = build_plan(paths, MergeOptions(order="given", method="ema", decay=0.7))
    try:
        mem = MemoryWriter(plan.entries())
        state, copy_cap = engine._state(plan, [mem], [plan.weights], torch.device("cpu"), 1 << 20, 1, False)
        acc_of = [t.acc_dtype if t.kind == "average" else None for t in plan.tensors]
        units = list(cut_units(plan, 1 << 20, copy_cap, acc_of, [t.numel for t in plan.tensors]))
        worker = Worker(state)
        for idx, unit in enumerate(units):
            job = Job(idx, unit)
            state.acquire(job)
            worker.process(job)
            for w, mvs in job.pieces:
                for mv in mvs:
                    w.write(mv)
        mem.commit()
    finally:
        for i in plan.inputs:
            i.checkpoint.close()
    w = plan.weights.values
    ref = {name: sum(float(wk) * sd[name].double() for wk, sd in zip(w, sds)) for name in ("a", "b")}
    torch.testing.assert_close(mem.result["a"].double(), ref["a"], rtol=1e-6, atol=1e-7)  # float32 accumulation
    assert torch.equal(mem.result["b"], ref["b"].to(torch.bfloat16))  # bf16: summed in float64, one rounding
    assert mem.result["n"].item() == 2  # integers: the last checkpoint's

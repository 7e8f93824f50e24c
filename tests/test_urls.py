"""Checkpoints behind URLs (issue 22): merges from and to a real S3-compatible server (moto's, on
127.0.0.1) equal the same merges of local copies; a flaky server still gives the right output; a
server that dies mid-merge gives a one-line error and no output; outputs appear only when complete;
``memory://`` and ``file://`` URLs work as paths."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save, save_file

import ckptavg
from ckptavg.errors import CheckpointReadError
from ckptavg.io.urls import configure

from ._s3_server import FaultyProxy, MotoServer
from .test_bn_cli import bn_setup  # noqa: F401, F811  (a fixture)

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "ckpts"


def _sds(n: int = 3, size: int = 64 * 1024, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {"layer.weight": torch.randn(size, generator=g), "layer.bias": torch.randn(33, generator=g),
            "head.weight": torch.randn(16, 24, generator=g)}
    return [{k: v + 0.1 * i * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n)]


def _write_inputs(root: Path, sds: list[dict[str, torch.Tensor]]) -> None:
    import torch.distributed.checkpoint as dcp

    for i, sd in enumerate(sds):
        step = 100 * (i + 1)
        (root / "pt").mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {**sd, "steps": torch.tensor(step)}, "global_step": step},
                   root / "pt" / f"step-{step}.pt")
        (root / "st").mkdir(exist_ok=True)
        save_file(sd, str(root / "st" / f"step-{step}.safetensors"))
        hf = root / "hf" / f"checkpoint-{step}"
        hf.mkdir(parents=True)
        names = list(sd)
        save_file({names[0]: sd[names[0]]}, str(hf / "model-00001-of-00002.safetensors"))
        save_file({n: sd[n] for n in names[1:]}, str(hf / "model-00002-of-00002.safetensors"))
        wmap = {names[0]: "model-00001-of-00002.safetensors", **{n: "model-00002-of-00002.safetensors"
                                                                  for n in names[1:]}}
        (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        (hf / "config.json").write_text(json.dumps({"model_type": "toy", "step": step}))
        dcp.save({"model": dict(sd), "step": step}, checkpoint_id=str(root / "dcp" / f"step-{step}"))


@pytest.fixture(scope="module")
def server():
    s = MotoServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data(server, tmp_path_factory):
    """Local inputs in four formats, and the same files uploaded to the server."""
    root = tmp_path_factory.mktemp("local")
    sds = _sds()
    _write_inputs(root, sds)
    fs = server.fs()
    fs.mkdir(BUCKET)
    fs.put(str(root) + "/", f"{BUCKET}/in/", recursive=True)
    return root, sds


#: the backend's own retries off (s3fs's and botocore's): the faults reach ckptavg's retries, which are tested
NO_BACKEND_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5,
                                                      "read_timeout": 10}}


def _options(server, endpoint: str | None = None, **extra) -> str:
    return json.dumps({"endpoint_url": endpoint or server.endpoint, "key": "testing", "secret": "testing",
                       "skip_instance_cache": True, "use_listings_cache": False, **extra})


def _tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a model (file or folder), read back by ckptavg's own readers (no averaging:
    one checkpoint with weight 1 is copied bit for bit)."""
    return ckptavg.average([path], order="given")


def _download(fs, key: str, dest: Path) -> Path:
    if fs.isdir(key):
        fs.get(key + "/", str(dest) + "/", recursive=True)
    else:
        fs.get_file(key, str(dest))
    return dest


@pytest.mark.parametrize("fmt, out", [("pt", "avg.pt"), ("st", "avg.safetensors"), ("hf", "soup/"),
                                      ("dcp", "avg.dcp")])
def test_merge_from_s3_to_s3_equals_the_local_merge(server, data, run_cli, tmp_path, fmt, out):
    root, sds = data
    url = f"s3://{BUCKET}/in/{fmt}/"
    dest = f"s3://{BUCKET}/out-{fmt}/{out}"
    code, _o, err = run_cli("merge", url, "-o", dest, "--last", "2", "--storage-options", _options(server), "-q")
    assert code == 0, err
    local_out = tmp_path / ("local-" + out.rstrip("/"))
    ckptavg.merge([root / fmt], local_out, last=2)
    got = _download(server.fs(), dest.removeprefix("s3://").rstrip("/"), tmp_path / ("got-" + out.rstrip("/")))
    a, b = _tensors(got), _tensors(local_out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ref = (sds[1]["layer.weight"].double() + sds[2]["layer.weight"].double()) / 2
    torch.testing.assert_close(a["layer.weight"].double(), ref, rtol=4e-6, atol=2e-6)
    if fmt == "hf":  # the copied model files came from the last input folder on the server
        assert json.loads((got / "config.json").read_text())["step"] == 300
    if out.endswith(".safetensors"):  # provenance names the URLs, and no credential
        with open(got, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n))["__metadata__"]
        files = [f["file"] for f in json.loads(meta["ckptavg_inputs"])]
        assert files == [f"s3://{BUCKET}/in/st/step-200.safetensors", f"s3://{BUCKET}/in/st/step-300.safetensors"]
        assert "testing" not in json.dumps(meta)
    leftovers = [k for k in server.fs().find(f"{BUCKET}/out-{fmt}", withdirs=True) if "ckptavg-tmp" in k]
    assert leftovers == []


def test_inspect_and_globs_over_s3(server, data, run_cli):
    code, out, err = run_cli("inspect", f"s3://{BUCKET}/in/st/step-*.safetensors", "--json",
                             "--storage-options", _options(server))
    assert code == 0, err
    rows = json.loads(out)["checkpoints"]
    assert [r["step"] for r in rows] == [100, 200, 300]
    code, out, err = run_cli("inspect", f"s3://{BUCKET}/in/hf/checkpoint-*", "--storage-options", _options(server))
    assert code == 0, err
    assert out.count("hf-folder") == 3


def test_flaky_and_slow_server_still_gives_the_right_output(server, data, run_cli, tmp_path, monkeypatch):
    root, _sds_ = data
    proxy = FaultyProxy(server.endpoint, fail_every=3, delay=0.005)
    monkeypatch.setenv("CKPTAVG_RANGE_BYTES", "65536")  # many ranges per tensor, several in flight
    try:
        dest = f"s3://{BUCKET}/flaky/avg.safetensors"
        code, _o, err = run_cli("merge", f"s3://{BUCKET}/in/st/", "-o", dest, "-q",
                                "--storage-options", _options(server, proxy.endpoint, **NO_BACKEND_RETRIES))
        assert code == 0, err
        assert proxy.failed > 3  # the faults did happen, and were retried
    finally:
        proxy.stop()
        configure()
    got = load(server.fs().cat_file(dest.removeprefix("s3://")))
    ckptavg.merge([root / "st"], tmp_path / "ref.safetensors")
    ref = _tensors(tmp_path / "ref.safetensors")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_range_requests_in_flight_are_not_capped_by_the_connection_pool(server, run_cli, tmp_path, monkeypatch):
    # botocore's pool holds 10 connections by default: without a larger one, 16 requests in flight queue
    g = torch.Generator().manual_seed(7)
    (tmp_path / "in").mkdir()
    for i in range(3):  # 8 MiB each: 16 ranges of 512 KiB (the smallest range), each held up 0.1 s
        save_file({"w": torch.randn(2 << 20, generator=g)}, tmp_path / "in" / f"step-{i}.safetensors")
    server.fs().put(str(tmp_path / "in") + "/", f"{BUCKET}/pool/", recursive=True)
    proxy = FaultyProxy(server.endpoint, delay=0.1)
    monkeypatch.setenv("CKPTAVG_RANGE_BYTES", str(512 << 10))
    monkeypatch.setenv("CKPTAVG_MAX_REQUESTS", "16")
    try:
        code, _o, err = run_cli("merge", f"s3://{BUCKET}/pool/", "-o", tmp_path / "avg.safetensors", "-q",
                                "--storage-options", _options(server, proxy.endpoint))
        assert code == 0, err
        # the configured 16 at once, plus at most a read each of the engine's own threads (not fetched ahead)
        assert 10 < proxy.peak <= 16 + 4, proxy.peak
    finally:
        proxy.stop()
        configure()
    ckptavg.merge([tmp_path / "in"], tmp_path / "ref.safetensors")
    got, ref = _tensors(tmp_path / "avg.safetensors"), _tensors(tmp_path / "ref.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_server_dying_mid_merge_is_one_line_and_publishes_nothing(server, data, tmp_path):
    dest = f"s3://{BUCKET}/died/avg.safetensors"
    cmd = [sys.executable, "-m", "ckptavg", "merge", f"s3://{BUCKET}/in/st/", "-o", dest, "-q"]
    counter = FaultyProxy(server.endpoint)  # how many requests planning takes (the dry run reads no data)
    env = {**server.env(counter.endpoint), "CKPTAVG_RANGE_BYTES": "16384", "CKPTAVG_RETRIES": "1",
           "CKPTAVG_WORKERS": "1", "CKPTAVG_STORAGE_OPTIONS": json.dumps(NO_BACKEND_RETRIES)}
    try:
        assert subprocess.run([*cmd, "--dry-run"], capture_output=True, env=env, timeout=300).returncode == 0
    finally:
        counter.stop()
    proxy = FaultyProxy(server.endpoint, die_after=counter.count + 1)  # dies once the data is being read
    env["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        proxy.stop()
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    # which request meets the dead server first depends on timing: a data range, or the last check
    assert len(lines) == 1 and lines[0].startswith(f"ckptavg: error: s3://{BUCKET}/in/st/step-"), r.stderr
    assert "failed 2 times" in lines[0] and "EndpointConnectionError" in lines[0]
    fs = server.fs()
    assert not fs.exists(dest.removeprefix("s3://"))
    assert [k for k in fs.find(f"{BUCKET}/died", withdirs=True)] == []


def test_outputs_at_a_url_replace_only_earlier_ckptavg_outputs(server, data, run_cli):
    fs = server.fs()
    opts = _options(server)
    fs.pipe(f"{BUCKET}/theirs/notes.txt", b"keep me")
    code, _o, err = run_cli("merge", f"s3://{BUCKET}/in/st/", "-o", f"s3://{BUCKET}/theirs/", "--storage-options",
                            opts)
    assert code == 1 and "holds other files" in err and "notes.txt" in err
    assert fs.cat_file(f"{BUCKET}/theirs/notes.txt") == b"keep me"
    dest = f"s3://{BUCKET}/mine/"
    assert run_cli("merge", f"s3://{BUCKET}/in/st/", "-o", dest, "--shard-size", "100KB", "--storage-options",
                   opts, "-q")[0] == 0
    first = sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{BUCKET}/mine"))
    assert "model.safetensors.index.json" in first and len(first) == 3
    code, _o, err = run_cli("merge", f"s3://{BUCKET}/in/st/", "-o", dest, "--last", "1", "--storage-options", opts,
                            "-q")
    assert code == 0, err
    assert sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{BUCKET}/mine")) == ["model.safetensors"]
    fs.pipe(f"{BUCKET}/mine/eval.json", b"{}")
    code, _o, err = run_cli("merge", f"s3://{BUCKET}/in/st/", "-o", dest, "--storage-options", opts)
    assert code == 1 and "eval.json" in err


def test_each_byte_is_fetched_once_and_planning_costs_one_small_request_per_file(tmp_path, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    from ckptavg.io import remote_in

    mem = fsspec.filesystem("memory")
    g = torch.Generator().manual_seed(4)
    sizes = {}
    sds = []
    for i in range(3):  # 6 MiB each: several ranges per file
        sd = {"a": torch.randn(1 << 20, generator=g), "b": torch.randn(1 << 19, generator=g)}
        sds.append(sd)
        data = save(sd)
        mem.pipe(f"/once/run/step-{i}.safetensors", data)
        sizes[f"memory:///once/run/step-{i}.safetensors"] = len(data)
    fetched: list[tuple[str, int, int]] = []
    real = remote_in.fetch_range

    def counted(path, start, end):
        fetched.append((str(path), start, end))
        return real(path, start, end)

    monkeypatch.setattr(remote_in, "fetch_range", counted)
    configure()
    try:
        plan = ckptavg.plan("memory://once/run/")
        # the format check and the header share one request of 512 KiB per file (it used to be two of 8 MiB)
        assert sorted(fetched) == sorted((f, 0, remote_in.MIN_RANGE) for f in sizes)
        assert len(plan.inputs) == 3
        fetched.clear()
        ckptavg.merge("memory://once/run/", tmp_path / "avg.safetensors")
    finally:
        configure()
    got = load((tmp_path / "avg.safetensors").read_bytes())  # and what was read is right
    for k in sds[0]:
        torch.testing.assert_close(got[k].double(), sum(sd[k].double() for sd in sds) / 3, rtol=4e-6, atol=2e-6)
    for f, size in sizes.items():  # a merge (its planning included): every byte of every file once
        spans = sorted((a, b) for g_, a, b in fetched if g_ == f)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(b == c for (_a, b), (c, _d) in zip(spans, spans[1:])), spans  # contiguous, no overlap


def test_memory_urls_read_by_range_and_changed_objects_fail(tmp_path, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    sds = _sds(size=50_000, seed=3)
    for i, sd in enumerate(sds):
        buf = io.BytesIO()
        torch.save({"model": sd, "epoch": i}, buf)
        mem.pipe(f"/mem/run/epoch={i}.pt", buf.getvalue())
    configure(range_bytes=4096, max_requests=4)  # each tensor in many ranges, scattered into the buffers
    try:
        out = tmp_path / "avg.safetensors"
        report = ckptavg.merge(["memory://mem/run/"], out)
        assert [str(p) for p in report.files] == [f"memory:///mem/run/epoch={i}.pt" for i in range(3)]
        got = _tensors(out)
        for k in sds[0]:
            ref = sum(sd[k].double() for sd in sds) / 3
            torch.testing.assert_close(got[k].double(), ref, rtol=4e-6, atol=2e-6)
        ckptavg.merge(["memory://mem/run/"], "memory://mem/out/avg.safetensors")
        # the same bytes as the local output (its provenance names the same input URLs)
        assert mem.cat_file("/mem/out/avg.safetensors") == out.read_bytes()

        from ckptavg import engine

        real = engine.worker.read_runs
        done: list[int] = []

        def read_then_replace(*args):
            real(*args)
            if not done:
                done.append(1)
                buf = io.BytesIO()
                torch.save({"model": sds[0], "epoch": 1}, buf)
                mem.pipe("/mem/run/epoch=1.pt", buf.getvalue())

        monkeypatch.setattr(engine.worker, "read_runs", read_then_replace)
        with pytest.raises(CheckpointReadError, match="epoch=1.pt: changed while the merge read it"):
            ckptavg.merge(["memory://mem/run/"], "memory://mem/out2.safetensors")
        assert not mem.exists("/mem/out2.safetensors")
    finally:
        configure()


def test_file_urls_are_local_paths(tmp_path):
    sds = _sds(2, size=1000)
    for i, sd in enumerate(sds):
        save_file(sd, str(tmp_path / f"s{i}.safetensors"))
    report = ckptavg.merge([f"file://{tmp_path}/s*.safetensors"], f"file://{tmp_path}/out.safetensors")
    assert report.output == tmp_path / "out.safetensors"
    assert (tmp_path / "out.safetensors").is_file()


def test_unknown_protocol_and_bad_storage_options_are_one_line(run_cli):
    code, _o, err = run_cli("merge", "nosuchproto://b/x.pt", "-o", "y.pt")
    assert code == 2 and err.startswith("ckptavg: error: nosuchproto:// URLs") and "\n" not in err.strip()
    code, _o, err = run_cli("merge", "memory://b/x.pt", "-o", "y.pt", "--storage-options", "[1")
    assert code == 2 and "--storage-options must be a JSON object" in err


def test_range_reads_with_read_ahead_give_the_file_bytes():
    """Reads through the read-ahead ranges, the extended ranges of a read that missed them and the
    parallel pieces of a large read all put the right bytes in the right buffers."""
    fsspec = pytest.importorskip("fsspec")
    import random

    from ckptavg.io.files import input_file
    from ckptavg.io.remote_in import _BUDGET
    from ckptavg.io.urls import as_path

    data = bytes(random.Random(0).randbytes(300_000))
    fsspec.filesystem("memory").pipe("/mem/blob.bin", data)
    configure(range_bytes=8192, max_requests=3)
    try:
        f = input_file(as_path("memory://mem/blob.bin"), len(data))
        rng = random.Random(1)
        pos = 0
        while pos < len(data):
            if rng.random() < 0.3:
                f.advise_willneed(pos + rng.randrange(0, 5000), rng.randrange(1, 40_000))
            n = min(rng.randrange(1, 30_000), len(data) - pos)
            cuts = sorted(rng.sample(range(1, n), min(3, n - 1))) if n > 1 else []
            bufs = [bytearray(b - a) for a, b in zip([0, *cuts], [*cuts, n])]
            f.preadv_into([memoryview(b) for b in bufs], pos)
            assert b"".join(bufs) == data[pos : pos + n]
            pos += n - (rng.randrange(0, 100) if rng.random() < 0.1 and n > 100 else 0)  # sometimes re-read a bit
        assert f.pread(123, 45_678) == data[123 : 123 + 45_678]
        f.close()
        assert _BUDGET.used == 0  # every range fetched ahead was given back
        with pytest.raises(CheckpointReadError, match="file ended early"):
            f.pread(len(data) - 10, 20)
    finally:
        configure()


def test_watch_polls_a_bucket_and_uses_only_complete_checkpoints(server, data, run_cli, tmp_path, monkeypatch):
    root, _sds_ = data
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the watcher's state for a URL output
    fs = server.fs()
    for step in (100, 200):
        fs.put_file(str(root / "st" / f"step-{step}.safetensors"), f"{BUCKET}/live/step-{step}.safetensors")
    whole = (root / "st" / "step-300.safetensors").read_bytes()
    fs.pipe(f"{BUCKET}/live/step-300.safetensors", whole[: len(whole) // 2])  # still being uploaded
    out = f"s3://{BUCKET}/live-out/swa.safetensors"
    args = ["watch", f"s3://{BUCKET}/live/", "-o", out, "--once", "--settle", "0", "--json",
            "--storage-options", _options(server)]
    code, stdout, err = run_cli(*args)
    assert code == 0, err + stdout
    events = [json.loads(line) for line in stdout.splitlines()]
    skipped = [e for e in events if e["event"] == "skipped"]
    assert [(e["path"].rsplit("/", 1)[1], e["reason"]) for e in skipped] == [("step-300.safetensors", "incomplete")]
    published = next(e for e in events if e["event"] == "published")
    assert [i["path"].rsplit("/", 1)[1] for i in published["inputs"]] == ["step-100.safetensors",
                                                                          "step-200.safetensors"]
    ckptavg.merge([root / "st" / "step-100.safetensors", root / "st" / "step-200.safetensors"],
                  tmp_path / "ref.safetensors")
    got = load(fs.cat_file(out.removeprefix("s3://")))
    ref = _tensors(tmp_path / "ref.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # nothing new: --once exits 0 without publishing; the upload completes: the next run takes it
    code, stdout, _e = run_cli(*args)
    assert code == 0 and not any(json.loads(x)["event"] == "published" for x in stdout.splitlines())
    fs.pipe(f"{BUCKET}/live/step-300.safetensors", whole)
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    published = next(json.loads(x) for x in stdout.splitlines() if json.loads(x)["event"] == "published")
    assert len(published["inputs"]) == 3
    code, _o, err = run_cli("watch", f"s3://{BUCKET}/live/", "-o", out, "--once", "--prune",
                            "--storage-options", _options(server))
    assert code == 2 and "--prune deletes local checkpoints only" in err


def test_torchrun_ranks_read_urls_by_range(server, data, tmp_path, monkeypatch):
    """Under torchrun each rank reads its share of the tensors from the server, and writes its part of
    an output at a URL; the outputs equal the one-process merge of the local copies."""
    from .test_distributed import torchrun

    root, _sds_ = data
    monkeypatch.setenv("CKPTAVG_STORAGE_OPTIONS", _options(server))
    code, text = torchrun(2, "-m", "ckptavg", "merge", f"s3://{BUCKET}/in/st/", "-o", tmp_path / "out/", "-q",
                          cwd=tmp_path)
    assert code == 0, text
    ckptavg.merge([root / "st"], tmp_path / "ref.safetensors")
    got, ref = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # each rank uploads its shards under a temporary prefix; rank 0 publishes them with the index last
    for out, extra in (("tr/", ["--shard-size", "100KB"]), ("tr.dcp", [])):
        code, text = torchrun(2, "-m", "ckptavg", "merge", f"s3://{BUCKET}/in/st/", "-o", f"s3://{BUCKET}/{out}",
                              "-q", *extra, cwd=tmp_path)
        assert code == 0, text
        got_dir = _download(server.fs(), f"{BUCKET}/{out.rstrip('/')}", tmp_path / out.rstrip("/"))
        got = _tensors(got_dir)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    names = sorted(k.rsplit("/", 1)[1] for k in server.fs().find(f"{BUCKET}/tr"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    assert [k for k in server.fs().find(BUCKET, withdirs=True) if "ckptavg-tmp" in k] == []


def test_bn_and_merge_with_bn_spec_over_urls(server, bn_setup, run_cli, tmp_path):  # noqa: F811
    """``bn`` reads its model from a URL and writes its output to one; ``merge --bn-spec`` too: the
    results equal the same commands on local files."""
    tmp, spec, runs, _sds_, _mod = bn_setup
    fs = server.fs()
    fs.put(str(runs) + "/", f"{BUCKET}/bnruns/", recursive=True)
    opts = _options(server)
    model = f"s3://{BUCKET}/bnruns/epoch=3-step=30.ckpt"
    assert run_cli("bn", model, "--spec", spec, "-o", f"s3://{BUCKET}/bnout/bn.safetensors", "-q",
                   "--storage-options", opts)[0] == 0
    assert run_cli("bn", runs / "epoch=3-step=30.ckpt", "--spec", spec, "-o", tmp / "bn.safetensors", "-q")[0] == 0
    got, ref = load(fs.cat_file(f"{BUCKET}/bnout/bn.safetensors")), _tensors(tmp / "bn.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert run_cli("merge", f"s3://{BUCKET}/bnruns/", "--bn-spec", spec, "-o", f"s3://{BUCKET}/bnout/swa.pt", "-q",
                   "--storage-options", opts)[0] == 0
    assert run_cli("merge", runs, "--bn-spec", spec, "-o", tmp / "swa.pt", "-q")[0] == 0
    got_pt = torch.load(io.BytesIO(fs.cat_file(f"{BUCKET}/bnout/swa.pt")), weights_only=True)
    ref_pt = torch.load(tmp / "swa.pt", weights_only=True)
    assert got_pt.keys() == ref_pt.keys() and all(torch.equal(got_pt[k], ref_pt[k]) for k in ref_pt)


@pytest.mark.parametrize("fail_at", ["upload", "publish"])
def test_a_failed_folder_upload_leaves_nothing_at_the_destination(tmp_path, monkeypatch, fail_at):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    for i, sd in enumerate(_sds(2, size=5000, seed=5)):
        save_file(sd, str(tmp_path / f"s{i}.safetensors"))
    cls = type(mem)
    calls = {"n": 0}
    name = "put_file" if fail_at == "upload" else "copy"
    real = getattr(cls, name)

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("the store went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, flaky)
    from ckptavg.errors import OutputError

    with pytest.raises(OutputError, match="memory:///up/soup: (upload|publishing the uploaded folder) failed"):
        ckptavg.merge([tmp_path], "memory://up/soup/", shard_size="10KB")  # 2 shards and an index
    left = mem.find("/up", withdirs=True) if mem.exists("/up") else []
    assert [k for k in left if "soup" in k] == []  # neither the destination nor the temporary prefix

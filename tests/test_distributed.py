"""Merges across ranks under torchrun (gloo, CPU): 2 and 3 processes on one machine, a 2-node
rendezvous on localhost (also with a node that does not share the output's file system), and the
failure cases (NaN or truncated input, a killed rank).

Every published folder is compared tensor by tensor, byte for byte, with a single-process merge
of the same inputs. Each spawn costs a few seconds of torch imports, so spawns are few and small.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckptavg
from ckptavg.distributed import partition
from ckptavg.io.hf_folder_layout import shard_layout
from ckptavg.io.writer import Entry

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["CKPTAVG_DIST_TIMEOUT"] = "60"  # survivors never wait longer than this in a collective
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun_cmd(nproc: int, port: int, *args: str, nodes: tuple[int, int] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0"]
    if nodes is not None:
        cmd += ["--nnodes", "2", "--node-rank", str(nodes[0]), "--rdzv-id", f"ckptavg-test-{nodes[1]}"]
    return cmd + [str(a) for a in args]


def _start(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    # a session of its own, so that the finally clause can end torchrun and its workers together
    return subprocess.Popen(cmd, cwd=cwd, env={**_env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=TIMEOUT)
            out.append((p.returncode, so + se))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def torchrun(nproc: int, *args: str, cwd: Path) -> tuple[int, str]:
    return _finish([_start(_torchrun_cmd(nproc, _free_port(), *args), cwd)])[0]


def make_inputs(folder: Path, n: int = 3, *, nan_in: str | None = None) -> list[Path]:
    """``n`` torch checkpoints: a tied embedding/head pair (first and last in plan order), fp32,
    bf16 and int64 tensors; optionally a NaN in tensor ``nan_in`` of the second checkpoint."""
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        emb = torch.randn(64, 96, generator=g)
        sd = {"embed.weight": emb}
        for k in range(5):
            sd[f"block{k}.weight"] = torch.randn(96, 96, generator=g)
        sd["block2.scale"] = torch.randn(96, generator=g).bfloat16()
        sd["steps"] = torch.tensor([i, 2 * i], dtype=torch.int64)
        sd["head.weight"] = emb  # tied: one storage under two names
        if nan_in is not None and i == 1:
            sd[nan_in][3, 5] = float("nan")
        p = folder / f"ck{i}.pt"
        torch.save(sd, p)
        paths.append(p)
    return paths


def read_folder(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of a safetensors folder: name -> (dtype, shape, raw bytes)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def assert_same_as_single(out: Path, inputs: list[Path], tmp: Path, **opts) -> dict:
    ref = tmp / "single"
    ckptavg.merge(inputs, ref, distributed=False, **opts)
    got, want = read_folder(out), read_folder(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == want[k], k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert {f.name for f in out.glob("*.safetensors")} == set(index["weight_map"].values())
    return index


def no_leftovers(parent: Path) -> list[str]:
    return [q.name for q in parent.iterdir() if q.name.endswith(".ckptavg-tmp")]


# -- pure functions (no spawn)


def test_partition_contiguous_balanced_and_aliases_follow_their_source():
    assert partition([4, 4, 4, 4], 2) == [0, 0, 1, 1]
    assert partition([4, 4, 4, 4], 3) == [0, 1, 1, 2]
    assert partition([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert partition([4, 4, 0], 2, [None, None, 0]) == [0, 1, 0]
    assert partition([0, 0], 2) == [0, 0]
    owner = partition(list(range(1, 40)), 5)
    assert owner == sorted(owner) and set(owner) == set(range(5))  # contiguous, every rank gets a part
    entries = [Entry(f"t{i}", torch.float32, (10,)) for i in range(4)]  # 40 bytes each
    lay = shard_layout(entries, [0, 0, 1, 1], 2, shard_size=50)
    assert lay.names == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    assert lay.shard_of == [0, 1, 2, 3] and lay.shard_rank == [0, 0, 1, 1]
    assert shard_layout(entries, [0, 0, 0, 0], 2, 10**9).names == ["model.safetensors"]


# -- spawned runs


def test_two_ranks_console_script_bit_identical(tmp_path):
    import shutil

    exe = shutil.which("ckptavg", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the ckptavg console script is not installed")
    inputs = make_inputs(tmp_path)
    rc, text = torchrun(2, "--no-python", exe, "merge", *inputs, "-o", tmp_path / "out/", "--shard-size", "30KB",
                        cwd=tmp_path)
    assert rc == 0, text
    assert text.count("wrote ") == 1, text  # rank 0 reports, once
    index = assert_same_as_single(tmp_path / "out", inputs, tmp_path)
    wm = index["weight_map"]
    # the tied head (last in plan order) was written by rank 0, which owns its source: a lower shard
    # number than the tensor before it, which rank 1 wrote
    assert wm["head.weight"] < wm["steps"]
    assert no_leftovers(tmp_path) == []


_API_SCRIPT = """
import sys, torch.distributed as dist, ckptavg
from ckptavg.errors import CkptavgError
dist.init_process_group("gloo")
out, good, bad = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
report = ckptavg.merge(good, out, shard_size="30KB")
assert dist.is_initialized(), "ckptavg destroyed a group it did not create"
try:
    ckptavg.merge(bad, out + "-bad")
    outcome = "no error"
except CkptavgError as e:
    outcome = f"{type(e).__name__}: {e}"
dist.barrier()  # the group still works
with open(f"result-{dist.get_rank()}.txt", "w") as fh:  # one file per rank: stdout lines would interleave
    fh.write(f"RANK{dist.get_rank()} shards={len(report.extra['shards'])} error={outcome}")
dist.destroy_process_group()
"""


def test_three_ranks_api_in_initialised_group(tmp_path):
    good = make_inputs(tmp_path)
    (tmp_path / "bad").mkdir()
    bad = make_inputs(tmp_path / "bad", nan_in="block4.weight")  # rank 2's part
    script = tmp_path / "api_merge.py"
    script.write_text(_API_SCRIPT)
    out = tmp_path / "soup"
    rc, text = torchrun(3, script, out, ",".join(map(str, good)), ",".join(map(str, bad)), cwd=tmp_path)
    assert rc == 0, text
    assert_same_as_single(out, good, tmp_path, shard_size="30KB")
    lines = [(tmp_path / f"result-{r}.txt").read_text() for r in range(3)]
    for line in lines:  # every rank raised, naming the file and the tensor
        assert "NonFiniteError" in line or "DistributedError" in line, line
        assert "ck1.pt" in line and "'block4.weight'" in line, line
    assert [line.startswith("RANK2") for line in lines if "NonFiniteError" in line] == [True]
    assert not (tmp_path / "soup-bad").exists() and no_leftovers(tmp_path) == []


def test_two_nodes_rendezvous_on_localhost(tmp_path):
    inputs = make_inputs(tmp_path)
    port = _free_port()
    args = ["-m", "ckptavg", "merge", *map(str, inputs), "-o", str(tmp_path / "out/"), "--shard-size", "30KB"]
    procs = [_start(_torchrun_cmd(1, port, *args, nodes=(k, port)), tmp_path) for k in (0, 1)]
    results = _finish(procs)
    for rc, text in results:
        assert rc == 0, text
    index = assert_same_as_single(tmp_path / "out", inputs, tmp_path)
    assert len(set(index["weight_map"].values())) >= 2
    assert "2 ranks" in "".join(t for _, t in results)


def _own_mount_namespace() -> bool:
    """Whether a child may get a mount namespace of its own with a tmpfs in it (root with
    CAP_SYS_ADMIN): how a test gives one "node" a file system the other does not see."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs none {shlex.quote(d)}"], capture_output=True)
    return res.returncode == 0


def _union(folders: list[Path], dest: Path) -> Path:
    dest.mkdir()
    for f in folders:
        for q in f.iterdir():
            assert not (dest / q.name).exists(), q.name  # the nodes' parts do not overlap
            shutil.copyfile(q, dest / q.name)
    return dest


@pytest.mark.skipif(not _own_mount_namespace(), reason="needs unshare -m and mount (root)")
def test_two_nodes_without_a_shared_file_system(tmp_path):
    """Node 1 sees an empty file system of its own where the output goes (a tmpfs in its own mount
    namespace). Each node's rank writes its shards on its own disk and publishes them there; the
    node of rank 0 also holds the index; together they are the single-process merge. A second run
    replaces both nodes' earlier parts; a third, with foreign files at node 1's destination, fails
    on every rank before anything is published; in a fourth, rank 1 cannot move its part into place
    after rank 0 published: every rank fails and the part stays, complete, where the error says."""
    inputs = make_inputs(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    seen = tmp_path / "node1"  # what node 1 had after each run
    seen.mkdir()
    runs = [inputs, inputs[1:], inputs, inputs[:2]]
    ports = [_free_port() for _ in runs]

    def cmd(k: int, node: int) -> list[str]:
        # the last run: rank 1 cannot move its node's part into place
        module = "tests._node_publish_fails" if k == 3 else "ckptavg"
        args = ["-m", module, "merge", *map(str, runs[k]), "-o", f"{out}/", "--shard-size", "30KB"]
        return _torchrun_cmd(1, ports[k], *args, nodes=(node, ports[k]))

    q = shlex.quote
    steps = [f"mount -t tmpfs none {q(str(disk))} || exit 99"]
    for k in range(len(runs)):
        if k == 2:
            steps.append(f"rm -rf {q(str(out))} && mkdir {q(str(out))} && echo mine > {q(str(out / 'notes.txt'))}")
        if k == 3:
            steps.append(f"rm -rf {q(str(out))}")
        steps.append(f"{shlex.join(cmd(k, 1))} > {q(str(seen / f'log{k}'))} 2>&1; echo $? > {q(str(seen / f'rc{k}'))}")
        steps.append(f"cp -r {q(str(disk))} {q(str(seen / str(k)))}; ls -A {q(str(disk))} > {q(str(seen / f'ls{k}'))}")
    node1 = _start(["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(steps)], tmp_path)
    try:
        results = []
        for k in range(len(runs)):
            results.append(_finish([_start(cmd(k, 0), tmp_path)])[0])
            shutil.copytree(disk, tmp_path / f"host{k}")
    finally:
        (rc1, text1), = _finish([node1])
    assert rc1 == 0, text1
    for k in range(len(runs)):
        text = results[k][1] + (seen / f"log{k}").read_text()
        if k < 2:
            assert results[k][0] == 0 and (seen / f"rc{k}").read_text().strip() == "0", text
            assert "no shared file system" in text
            host, node = tmp_path / f"host{k}" / "out", seen / str(k) / "out"
            # the rendezvous, not --node-rank, decides which node runs rank 0: it has the index
            assert sorted(len(list(f.glob("*.json"))) for f in (host, node)) == [0, 1]
            assert len(list(host.glob("*.safetensors"))) >= 1 and len(list(node.glob("*.safetensors"))) >= 1
            ref = tmp_path / f"ref{k}"
            ref.mkdir()
            assert_same_as_single(_union([host, node], tmp_path / f"both{k}"), runs[k], ref)
            assert (seen / f"ls{k}").read_text().split() == ["out"]  # nothing left beside it on node 1
        elif k == 2:  # foreign files at node 1's destination: refused there before anything is published
            assert results[k][0] != 0 and (seen / f"rc{k}").read_text().strip() != "0", text
            assert f"{out}: the folder exists and holds other files ('notes.txt')" in text
            assert read_folder(tmp_path / "host2" / "out") == read_folder(tmp_path / "host1" / "out")
            assert [q.name for q in (seen / "2" / "out").iterdir()] == ["notes.txt"]
            assert no_leftovers(tmp_path / "host2") == [] and no_leftovers(seen / "2") == []
        else:  # rank 1 cannot move its node's part into place after rank 0 published: every rank fails,
            # the error names the folder the part stays in, and that part is complete
            assert results[k][0] != 0 and (seen / f"rc{k}").read_text().strip() != "0", text
            assert "terminate called" not in text
            kept = [f for f in (tmp_path / "host3", seen / "3") if no_leftovers(f)]
            assert len(kept) == 1, text
            part = kept[0] / no_leftovers(kept[0])[0]
            assert (f"this node's part stays in {out.parent / part.name}: cannot move it into place "
                    f"({os.strerror(errno.EROFS)}) (on rank 1 of 2; the other nodes' parts are published)") in text
            published = (seen / "3" / "out") if kept[0] == tmp_path / "host3" else (tmp_path / "host3" / "out")
            ref = tmp_path / "ref3"
            ref.mkdir()
            assert_same_as_single(_union([published, part], tmp_path / "both3"), runs[k], ref)


def _one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if "ckptavg: error:" in line]
    assert len(errors) == 1, text
    return errors[0]


def _every_rank_failed(text: str, n: int) -> None:
    # torchrun's failure report lists each worker that exited non-zero
    lines = [line.strip() for line in text.splitlines()]
    ranks = {int(line.split(":")[1].split()[0]) for line in lines if line.startswith("rank ")}
    codes = [line.split(":")[1].split()[0] for line in lines if line.startswith("exitcode ")]
    assert ranks == set(range(n)) and codes == ["1"] * n, text


# The CLI with rank 0 held up after each collective, as a loaded machine may deschedule it: rank 1
# (quiet) then exits first and torchrun sends SIGTERM to rank 0 before it has printed the error. This
# once made the NaN test fail under load (rank 0 exited 143, "terminated", no error line); the ranks now
# wait for each other once they agreed on the failure, so the delay must not change the outcome.
_SLOW_RANK0 = """
import os, sys, time
import torch.distributed as dist
_orig = dist.all_gather_object
def _slow(*a, **k):
    r = _orig(*a, **k)
    if os.environ["RANK"] == "0":
        time.sleep(1.5)
    return r
dist.all_gather_object = _slow
from ckptavg.cli import main
sys.argv = ["ckptavg"] + sys.argv[1:]
main()
"""


def test_nan_on_one_rank_nobody_publishes(tmp_path):
    inputs = make_inputs(tmp_path, nan_in="block4.weight")  # on rank 1 of 2
    (tmp_path / "slow_rank0.py").write_text(_SLOW_RANK0)
    rc, text = torchrun(2, tmp_path / "slow_rank0.py", "merge", *inputs, "-o", tmp_path / "out/", cwd=tmp_path)
    assert rc != 0
    line = _one_error_line(text)
    assert "ck1.pt" in line and "'block4.weight'" in line and "nan" in line, line
    _every_rank_failed(text, 2)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_truncated_input_nobody_publishes(tmp_path):
    g = torch.Generator().manual_seed(2)
    inputs = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        save_file({f"w{k}": torch.randn(64, 64, generator=g) for k in range(4)}, p)
        inputs.append(p)
    data = inputs[1].read_bytes()
    inputs[1].write_bytes(data[: len(data) - 1000])  # cuts into w3, rank 1's tensor
    rc, text = torchrun(2, "-m", "ckptavg", "merge", *inputs, "-o", tmp_path / "out/", cwd=tmp_path)
    assert rc != 0
    line = _one_error_line(text)
    assert "m1.safetensors" in line and "'w3'" in line, line
    _every_rank_failed(text, 2)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it has just exited
        pass


def test_killed_rank_nobody_publishes(tmp_path):
    g = torch.Generator().manual_seed(3)
    inputs = []
    for i in range(3):
        p = tmp_path / f"big{i}.safetensors"
        save_file({f"w{k}": torch.randn(1 << 20, generator=g) for k in range(8)}, p)  # 32 MiB each
        inputs.append(p)
    # many small steps: rank 1 is surely still at work when killed
    proc = _start(_torchrun_cmd(2, _free_port(), "-m", "ckptavg", "merge", *map(str, inputs), "-o",
                                str(tmp_path / "out/")), tmp_path, {"CKPTAVG_CHUNK_ELEMS": "8192"})
    try:
        victim = None
        deadline = time.monotonic() + TIMEOUT
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            # wait until rank 0 made the temporary folder (planning is over); then freeze the ranks,
            # so that however fast the machine, the merge cannot finish before rank 1 is killed
            if no_leftovers(tmp_path):
                ranks = _children(proc.pid)
                for pid in ranks:
                    _signal(pid, signal.SIGSTOP)
                for pid in ranks:
                    try:
                        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if b"RANK=1" in env:
                        victim = pid
                if victim is not None:
                    _signal(victim, signal.SIGKILL)
                for pid in ranks:
                    if pid != victim:
                        _signal(pid, signal.SIGCONT)
            time.sleep(0.002)
        assert victim is not None, "rank 1 was not found while the merge ran"
        rc, text = _finish([proc])[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0, text
    assert "Signal 9" in text or "SIGKILL" in text, text
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path) == [], text


# -- DCP output and BatchNorm recalibration across ranks


def _load_dcp_plain(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, loaded by ``dcp.load`` in this (single) process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(folder)).read_metadata()
    target = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=folder)
    return target


def _raw(t: torch.Tensor) -> tuple[str, tuple, bytes]:
    return str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_two_ranks_dcp_output_same_as_single_process(tmp_path):
    inputs = make_inputs(tmp_path)
    rc, text = torchrun(2, "-m", "ckptavg", "merge", *inputs, "-o", tmp_path / "out.dcp", cwd=tmp_path)
    assert rc == 0, text
    assert text.count("wrote ") == 1 and "2 data files written by 2 ranks" in text, text
    out = tmp_path / "out.dcp"
    assert sorted(q.name for q in out.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "ckptavg.json"]
    ckptavg.merge(inputs, tmp_path / "single.dcp", distributed=False)
    got, want = _load_dcp_plain(out), _load_dcp_plain(tmp_path / "single.dcp")
    assert sorted(got) == sorted(want)
    for k in want:
        assert _raw(got[k]) == _raw(want[k]), k
    # each rank wrote a share; the tied head is stored once, in the data file holding its source
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(out)).read_metadata()
    files = {idx.fqn: info.relative_path for idx, info in md.storage_data.items()}
    assert set(files.values()) == {"__0_0.distcp", "__1_0.distcp"}
    same = [info for idx, info in md.storage_data.items() if idx.fqn in ("embed.weight", "head.weight")]
    assert same[0] == same[1]
    assert no_leftovers(tmp_path) == []


def test_two_ranks_dcp_output_nan_nobody_publishes(tmp_path):
    inputs = make_inputs(tmp_path, nan_in="block4.weight")  # on rank 1 of 2
    rc, text = torchrun(2, "-m", "ckptavg", "merge", *inputs, "-o", tmp_path / "out.dcp", cwd=tmp_path)
    assert rc != 0
    line = _one_error_line(text)
    assert "ck1.pt" in line and "'block4.weight'" in line and "nan" in line, line
    _every_rank_failed(text, 2)
    assert not (tmp_path / "out.dcp").exists() and no_leftovers(tmp_path) == []


BN_MODEL_PY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0 = torch.nn.BatchNorm2d(3)  # input mean ~100 over a spread ~2: the shifted path
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(self.bn0(x + 100.0)))).mean((2, 3)))

def build():
    return Net().double()

def loader(n=5, batch_size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, 8, 8, generator=g, dtype=torch.float64) * (k + 1) + k, 0) for k in range(n)]
"""


def test_two_ranks_bn_precise_equals_single_process(tmp_path):
    (tmp_path / "models.py").write_text(BN_MODEL_PY)
    spec = tmp_path / "bn.toml"
    spec.write_text('[model]\nfactory = "models.py:build"\n[data]\nloader = "models.py:loader"\n')
    g = torch.Generator().manual_seed(5)
    inputs = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        net_sd = {"bn0.weight": torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
                  "bn0.bias": torch.randn(3, generator=g, dtype=torch.float64),
                  "bn0.running_mean": torch.zeros(3, dtype=torch.float64),
                  "bn0.running_var": torch.ones(3, dtype=torch.float64),
                  "bn0.num_batches_tracked": torch.tensor(7),
                  "conv.weight": torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64),
                  "conv.bias": torch.randn(6, generator=g, dtype=torch.float64),
                  "bn.weight": torch.rand(6, generator=g, dtype=torch.float64) + 0.5,
                  "bn.bias": torch.randn(6, generator=g, dtype=torch.float64),
                  "bn.running_mean": torch.zeros(6, dtype=torch.float64),
                  "bn.running_var": torch.ones(6, dtype=torch.float64),
                  "bn.num_batches_tracked": torch.tensor(7),
                  "head.weight": torch.randn(4, 6, generator=g, dtype=torch.float64),
                  "head.bias": torch.randn(4, generator=g, dtype=torch.float64)}
        save_file(net_sd, p)
        inputs.append(p)
    rc, text = torchrun(2, "-m", "ckptavg", "merge", *inputs, "-o", tmp_path / "out.dcp", "--bn-spec", spec,
                        "--buffers", "average", cwd=tmp_path)
    assert rc == 0, text
    assert "over 5 batches / 40 samples" in text, text
    got = _load_dcp_plain(tmp_path / "out.dcp")
    ckptavg.merge(inputs, tmp_path / "single.safetensors", bn_spec=str(spec), buffers="average", distributed=False)
    from safetensors.torch import load_file

    want = load_file(tmp_path / "single.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=0)
            assert not torch.equal(want[k], torch.zeros_like(want[k]) + (k.endswith("var")))  # recalibrated
        else:  # num_batches_tracked: the forward calls over every rank (5), as in one process
            assert _raw(got[k]) == _raw(want[k]), k
    assert got["bn.num_batches_tracked"].item() == 5
    # refused: torch mode across ranks (one error line, every rank non-zero)
    rc, text = torchrun(2, "-m", "ckptavg", "merge", *inputs, "-o", tmp_path / "t.dcp", "--bn-spec", spec,
                        "--bn-mode", "torch", cwd=tmp_path)
    assert rc != 0 and "--bn-mode torch cannot be split across ranks" in _one_error_line(text), text
    assert not (tmp_path / "t.dcp").exists() and no_leftovers(tmp_path) == []


_DIFFERING_PLANS = """
import os, sys
from ckptavg.cli import main
inputs = sys.argv[2].split(",")
if os.environ["RANK"] == "1":
    inputs.append(sys.argv[3])  # a checkpoint that appeared between the two ranks' discovery
main(["merge", *inputs, "-o", sys.argv[1], "--order", "given"])
"""


def test_ranks_that_plan_different_merges_fail_before_reading(tmp_path):
    inputs = make_inputs(tmp_path)
    script = tmp_path / "differ.py"
    script.write_text(_DIFFERING_PLANS)
    out = tmp_path / "soup"
    rc, text = torchrun(2, script, out, ",".join(map(str, inputs[:2])), inputs[2], cwd=tmp_path)
    assert rc != 0, text
    assert ("the ranks planned different merges (rank 0 selected 2 checkpoints, rank 1 selected 3; only one of them "
            f"sees {inputs[2]})") in text, text
    assert text.count("the ranks planned different merges") == 1, text  # printed once, by rank 0
    assert not out.exists() and no_leftovers(tmp_path) == []

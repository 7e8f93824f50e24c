"""Megatron/NeMo ``torch_dist`` checkpoints (issue 21, item 1), written by megatron-core itself
under torchrun on CPU: read without --trust-pickle (torch's own DCP planner classes in the restricted
unpickler), the iteration from ``common.pt``, tensor-parallel shards and replicated tensors averaged
equal to a float64 average computed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckptavg

pytest.importorskip("megatron.core")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory):
    from .test_distributed import torchrun

    root = tmp_path_factory.mktemp("megatron") / "run"
    root.mkdir()
    code, text = torchrun(2, str(HERE / "_megatron_worker.py"), str(root), "100", "200", "300", cwd=root.parent)
    assert code == 0, text
    return root


def test_torch_dist_root_is_a_folder_of_checkpoints_read_safely(megatron_run, run_cli):
    p = ckptavg.plan(megatron_run / "iter_*", last=2)  # the root's marker and refs are not checkpoints here
    assert [(i.path.name, i.step) for i in p.inputs] == [("iter_0000200", 200), ("iter_0000300", 300)]
    code, out, err = run_cli("inspect", megatron_run / "iter_0000100", "--json")
    assert code == 0, err
    row = json.loads(out)["checkpoints"][0]
    assert row["step"] == 100 and row["step_from"] == "recorded"  # from common.pt, not the folder name
    refs = [torch.load(megatron_run / f"ref_{i}.pt") for i in (200, 300)]
    out_sd = ckptavg.average(megatron_run / "iter_*", last=2)
    for name, key in (("decoder.weight", "w"), ("decoder.bias", "b"), ("decoder.layers.weight", "layers")):
        ref = (refs[0][key].double() + refs[1][key].double()) / 2
        torch.testing.assert_close(out_sd[name].double(), ref, rtol=4e-6, atol=2e-6)
    assert "decoder._extra_state" not in out_sd  # byte entries are not averaged


def test_a_truncated_distcp_is_one_line_naming_the_folder(megatron_run, tmp_path, run_cli):
    bad = tmp_path / "iter_0000400"
    shutil.copytree(megatron_run / "iter_0000300", bad)
    data = sorted(bad.glob("__*.distcp"), key=lambda q: q.stat().st_size)[-1]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, _o, err = run_cli("merge", megatron_run / "iter_0000300", bad, "-o", tmp_path / "avg.safetensors")
    assert code == 1 and str(bad) in err and err.count("\n") == 1
    assert not (tmp_path / "avg.safetensors").exists()


def _dcp_read(folder: Path, names: dict[str, tuple]) -> dict:
    """Tensors (name -> shape) and byte entries (name -> None) of a DCP folder, read by torch's own dcp.load in this
    process (no process group)."""
    import io

    import torch.distributed.checkpoint as dcp

    sd = {k: (torch.empty(shape) if shape is not None else io.BytesIO()) for k, shape in names.items()}
    dcp.load(sd, checkpoint_id=str(folder))
    return {k: (torch.load(v, weights_only=True) if isinstance(v, io.BytesIO) else v) for k, v in sd.items()}


_NAMES = {"decoder.weight": (8, 6), "decoder.bias": (6,), "decoder.layers.weight": (3, 4, 4),
          "decoder._extra_state/shard_0_1": None}


def test_megatron_output_is_a_root_megatron_loads_with_another_split(megatron_run, tmp_path, run_cli):
    """Item 2: Megatron inputs and -o DIR/ give a Megatron root (iter folder, sidecars, the marker written last)
    that megatron-core's own dist_checkpointing.load reads into a differently split sharded state dict, equal to a
    float64 average; _extra_state is copied from the last input; under torchrun the ranks write the same root."""
    from .test_distributed import torchrun

    out = tmp_path / "avg"
    code, _o, err = run_cli("merge", megatron_run, "--last", "2", "-o", f"{out}/", "--quiet")
    assert code == 0, err
    assert sorted(q.name for q in out.iterdir()) == ["iter_0000300", "latest_checkpointed_iteration.txt"]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "300"
    it = out / "iter_0000300"
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    one = _dcp_read(it, _NAMES)
    back = ckptavg.average(out)  # ckptavg reads the root it wrote (its marker, its iteration folder) back
    assert ckptavg.plan(out).inputs[0].step == 300
    code, text = torchrun(2, str(HERE / "_megatron_load_worker.py"), str(it), str(tmp_path), cwd=tmp_path)
    assert code == 0, text
    refs = [torch.load(megatron_run / f"ref_{i}.pt") for i in (200, 300)]
    avg = {k: (refs[0][k].double() + refs[1][k].double()) / 2 for k in ("w", "b", "layers")}
    for name, key in (("decoder.weight", "w"), ("decoder.bias", "b"), ("decoder.layers.weight", "layers")):
        torch.testing.assert_close(back[name].double(), avg[key], rtol=4e-6, atol=2e-6)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"loaded_{rank}.pt", weights_only=False)
        st, common = got["state"], got["common"]
        torch.testing.assert_close(st["decoder.weight"].double(), avg["w"][:, 3 * rank: 3 * rank + 3],
                                   rtol=4e-6, atol=2e-6)
        torch.testing.assert_close(st["decoder.bias"].double(), avg["b"], rtol=4e-6, atol=2e-6)
        torch.testing.assert_close(st["decoder.layers.weight"].double(), avg["layers"][..., 2 * rank: 2 * rank + 2],
                                   rtol=4e-6, atol=2e-6)
        assert st["decoder._extra_state"] == {"fp8": 300}  # the last input's, byte for byte
        assert common["iteration"] == 300 and "iter_0000200" in common["ckptavg"]["ckptavg_inputs"]

    # --extra-state-from / --output-step; replacing the earlier output ckptavg wrote is allowed
    code, _o, err = run_cli("merge", megatron_run, "--last", "2", "-o", f"{out}/", "--extra-state-from", "200",
                            "--output-step", "1000", "--quiet")
    assert code == 0, err
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1000"
    got = _dcp_read(out / "iter_0001000", _NAMES)
    assert got["decoder._extra_state/shard_0_1"] == [{"fp8": 200}]
    torch.testing.assert_close(got["decoder.weight"].double(), avg["w"], rtol=4e-6, atol=2e-6)
    code, _o, err = run_cli("merge", megatron_run, "--last", "2", "-o", f"{out}/", "--extra-state-from", "100")
    assert code == 2 and "no selected checkpoint is at step 100" in err

    # two ranks write the same root (each its own data file, rank 0 the rest)
    code, text = torchrun(2, "-m", "ckptavg", "merge", str(megatron_run), "--last", "2", "-o",
                          str(tmp_path / "tr") + "/", "--quiet", cwd=tmp_path)
    assert code == 0, text
    assert (tmp_path / "tr" / "latest_checkpointed_iteration.txt").read_text() == "300"
    two = _dcp_read(tmp_path / "tr" / "iter_0000300", _NAMES)
    for k in _NAMES:
        assert (torch.equal(one[k], two[k]) if isinstance(one[k], torch.Tensor) else one[k] == two[k]), k

    # --format hf: a Hugging Face folder from the same inputs
    code, _o, err = run_cli("merge", megatron_run, "--last", "2", "-o", f"{tmp_path / 'hf'}/", "--format", "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_megatron_root_errors_are_one_line_and_publish_nothing(megatron_run, tmp_path, run_cli):
    """Item 6: a marker naming a missing iteration, a missing common.pt, mismatched layouts, a folder of other
    files at the destination: one line naming the folder, nothing written."""
    root = tmp_path / "root"
    shutil.copytree(megatron_run, root, ignore=shutil.ignore_patterns("ref_*"))
    out = tmp_path / "avg"

    def fails(*args, code=1):
        rc, _o, err = run_cli("merge", *args, "-o", f"{out}/")
        assert rc == code and err.count("\n") == 1, err
        assert not out.exists() or not any(out.iterdir())
        return err

    (root / "latest_checkpointed_iteration.txt").write_text("400")
    assert "names iteration 400, but iter_0000400/ is missing" in fails(root)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    assert "'release'" in fails(root)
    (root / "latest_checkpointed_iteration.txt").write_text("300")
    (root / "iter_0000200" / "common.pt").unlink()
    err = fails(root)
    assert "iter_0000200" in err and "common.pt" in err
    shutil.rmtree(root / "iter_0000200")
    # a layout that does not match: another model saved under the same names
    import torch.distributed.checkpoint as dcp

    other = root / "iter_0000250"
    dcp.save({"decoder.weight": torch.zeros(4, 6), "decoder.bias": torch.zeros(6),
              "decoder.layers.weight": torch.zeros(3, 4, 4)}, checkpoint_id=str(other))
    shutil.copy(root / "iter_0000300" / "metadata.json", other)
    torch.save({"iteration": 250}, other / "common.pt")
    err = fails(root)
    assert "decoder.weight" in err
    shutil.rmtree(other)
    # the release layout resolves to ROOT/release
    shutil.copytree(root / "iter_0000300", root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    p = ckptavg.plan(root)
    assert [i.path.name for i in p.inputs] == ["release"]
    # an output folder holding a file ckptavg did not write is never replaced
    rc, _o, err = run_cli("merge", root / "iter_0000100", root / "iter_0000300", "-o", f"{out}/", "--quiet")
    assert rc == 0, err
    (out / "iter_0000300" / "notes.txt").write_text("mine")
    rc, _o, err = run_cli("merge", root / "iter_0000100", root / "iter_0000300", "-o", f"{out}/")
    assert rc == 1 and "iter_0000300/notes.txt" in err
    assert (out / "iter_0000300" / "notes.txt").read_text() == "mine"


def test_megatron_output_at_a_url(megatron_run, tmp_path):
    """A Megatron root uploaded to a URL (memory://): the same objects as the local output, the marker among them;
    an object ckptavg did not write inside the iteration folder stops a replacement."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://megatron-{tmp_path.name}/avg/"
    ckptavg.merge(megatron_run, url, last=2)
    ckptavg.merge(megatron_run, tmp_path / "local/", last=2)
    fs = fsspec.filesystem("memory")
    root = url[len("memory://"):].rstrip("/")
    names = sorted(k[len(root) + 2:] for k in fs.find(root))  # (memory keys start with "/")
    assert names == sorted(str(q.relative_to(tmp_path / "local")) for q in (tmp_path / "local").rglob("*")
                           if q.is_file())
    assert fs.cat(f"{root}/latest_checkpointed_iteration.txt") == b"300"
    fs.pipe(f"{root}/iter_0000300/notes.txt", b"mine")
    with pytest.raises(ckptavg.CkptavgError, match="iter_0000300/notes.txt"):
        ckptavg.merge(megatron_run, url, last=2)

"""An input rewritten in place or replaced while a merge reads it (training overwriting
``last.pt``, re-saving a step) is an error naming the file, and nothing is published: what was
read may mix old and new bytes."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg import engine
from ckptavg.errors import CheckpointReadError


def _inputs(tmp_path, n=3):
    paths = []
    for k in range(n):
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file({"w": torch.full((4096,), float(k)), "b": torch.full((7,), float(k))}, str(paths[-1]))
    return paths


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_input_changed_during_the_merge_fails_and_publishes_nothing(tmp_path, monkeypatch, how):
    paths = _inputs(tmp_path)
    victim = paths[1]
    real = engine.worker.read_runs
    done = []

    def read_then_rewrite(*args):
        real(*args)
        if not done:
            done.append(1)
            if how == "in place":  # same size, new bytes, as torch.save/save_file write in place
                with open(victim, "r+b") as fh:
                    fh.seek(-8, os.SEEK_END)
                    fh.write(b"\x00" * 8)
            else:
                tmp = victim.with_name("new.tmp")
                save_file({"w": torch.full((4096,), 9.0), "b": torch.full((7,), 9.0)}, str(tmp))
                os.replace(tmp, victim)

    monkeypatch.setattr(engine.worker, "read_runs", read_then_rewrite)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointReadError, match=f"{victim.name}: changed while the merge read it"):
        ckptavg.merge(paths, out, order="given")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("c")) == []


def test_unchanged_inputs_merge_as_before(tmp_path):
    paths = _inputs(tmp_path)
    out = tmp_path / "out.safetensors"
    ckptavg.merge(paths, out, order="given")
    assert torch.equal(ckptavg.average([out])["w"], torch.full((4096,), 1.0))

"""No output of a merge is, or holds, an input: every output of a template is checked (not only
the first), and so is every file of an input model folder; nothing is read or written then."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import OptionError


def _runs(folder, n=4):
    folder.mkdir()
    paths = []
    for k in range(n):
        paths.append(folder / f"ck{k + 1}.safetensors")
        save_file({"w": torch.full((8,), float(k))}, str(paths[-1]))
    return paths


def test_a_later_output_of_a_template_that_is_an_input(tmp_path):
    paths = _runs(tmp_path / "runs")
    before = paths[1].read_bytes()
    with pytest.raises(OptionError, match="ck2.safetensors: the output is also an input"):
        ckptavg.merge(paths, tmp_path / "runs" / "ck{last}.safetensors", last="5,2")  # ck5 is new, ck2 is not
    assert paths[1].read_bytes() == before
    assert not (tmp_path / "runs" / "ck5.safetensors").exists()  # nothing written at all


def test_a_file_inside_an_input_model_folder(tmp_path):
    m0 = tmp_path / "m0"
    m0.mkdir()
    save_file({"w": torch.ones(8)}, str(m0 / "model.safetensors"), metadata={"format": "pt"})
    m1 = tmp_path / "m1"
    shutil.copytree(m0, m1)
    before = (m0 / "model.safetensors").read_bytes()
    with pytest.raises(OptionError, match="the output is also an input"):
        ckptavg.merge([m0, m1], m0 / "model.safetensors")
    assert (m0 / "model.safetensors").read_bytes() == before


def test_a_folder_output_that_holds_an_input(tmp_path):
    out = tmp_path / "soup"
    first = ckptavg.merge(_runs(tmp_path / "runs"), out / "")  # an earlier ckptavg output folder
    assert first.bytes_written
    inside = out / "extra.safetensors"
    save_file({"w": torch.ones(8)}, str(inside))
    with pytest.raises(OptionError, match="would replace a folder that holds the input"):
        ckptavg.merge([inside, tmp_path / "runs" / "ck1.safetensors"], out / "")
    assert inside.exists()

"""Checks of a file's structure stay near-linear in its size (issue 23, item 12): duplicate zip
members among many, and DCP chunk overlaps when the split is along a later dimension."""

from __future__ import annotations

import warnings
import zipfile

import pytest
import torch

from ckptavg.errors import CheckpointReadError
from ckptavg.io import open_checkpoint
from ckptavg.io.dcp_in import _check_disjoint


def test_overlap_found_among_chunks_split_on_dimension_1():
    chunks = [((0, 2 * k), (4, 2)) for k in range(5000)]
    _check_disjoint("t", chunks)  # a clean tensor-parallel split along dim 1
    with pytest.raises(CheckpointReadError, match=r"t: the chunks at \[0, 4\] and \[0, 5\] overlap"):
        _check_disjoint("t", chunks + [((0, 5), (4, 3))])
    with pytest.raises(CheckpointReadError, match="overlap"):  # and along dim 0, as before
        _check_disjoint("t", [((0, 0), (4, 8)), ((3, 0), (4, 8))])


def test_duplicate_member_named_among_many(tmp_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(3)}, src)
    dup = tmp_path / "dup.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dup, "w", zipfile.ZIP_STORED) as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        names = [i.filename for i in zin.infolist()]
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        top = names[0].split("/")[0]
        for k in range(20000):
            zout.writestr(f"{top}/extra/{k}", b"")
        zout.writestr(f"{top}/extra/123", b"")
    with pytest.raises(CheckpointReadError, match=f"the zip holds two members named '{top}/extra/123'"):
        open_checkpoint(dup)

"""Write a PyTorch Distributed Checkpoint (DCP) folder, streaming.

``ckptavg merge runs/ -o avg.dcp`` (an output path ending in ``.dcp`` or ``.dcp/``) writes
a folder that ``torch.distributed.checkpoint.load`` reads into a model, plain or sharded
(FSDP/FSDP2, tensor parallel: DCP reshards on load):

* ``__0_0.distcp``: every tensor whole, one chunk each, as the ``torch.save`` archive torch's
  ``FileSystemWriter`` stores per chunk (written by ckptavg's streaming ``TorchWriter``, one
  archive after the other, so a tensor's bytes go to disk as the engine produces them);
* ``.metadata``: torch's own ``Metadata`` classes, pickled as torch pickles them; the keys are
  the output tensor names, flat (load with ``dcp.load(model.state_dict(), checkpoint_id=...)``;
  a state dict nested as ``{"model": ...}`` would look for ``model.``-prefixed keys);
* ``ckptavg.json``: the merge's provenance (ignored by DCP).

Tied names point at one stored chunk. Everything is written into a temporary sibling folder
renamed into place once complete (:func:`ckptavg.io.files.publish_folder`); an existing
destination is replaced only if empty or an earlier ckptavg DCP output.

Example::

    from ckptavg.io.dcp_out import DcpWriter
    w = DcpWriter(Path("avg.dcp"), entries, {"ckptavg_version": "1"})
    for t in tensors:
        w.write(t)
    w.commit()
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError
from .files import fsync_path, publish_folder, signals_blocked
from .hf_folder_out import check_destination
from .torch_out import StorageRef, TensorStub, TorchWriter
from .writer import Entry, StreamWriter

__all__ = ["DcpWriter", "DATA_NAME", "PROVENANCE_NAME", "check_dcp_destination", "is_dcp_output"]

DATA_NAME = "__0_0.distcp"
PROVENANCE_NAME = "ckptavg.json"
_METADATA_NAME = ".metadata"


def is_dcp_output(output: str | os.PathLike[str]) -> bool:
    """True if ``-o output`` asks for a DCP folder: the path ends in ``.dcp`` or ``.dcp/``.

    Example::

        is_dcp_output("avg.dcp/")  # True
    """
    s = os.fspath(output).rstrip("/" + os.sep)
    return s.lower().endswith(".dcp") and len(Path(s).name) > 4


def check_dcp_destination(dest: Path) -> str:
    """``"new"``, ``"empty"`` or ``"replace"`` (an earlier ckptavg DCP output is there);
    anything else at ``dest`` raises :class:`~ckptavg.errors.OutputError`.

    Example::

        check_dcp_destination(Path("avg.dcp"))  # "new" when nothing is there yet
    """
    if dest.is_dir() and not dest.is_symlink() and (dest / _METADATA_NAME).is_file():
        try:
            prov = json.loads((dest / PROVENANCE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            prov = None
        if isinstance(prov, dict) and "ckptavg_version" in prov:
            return "replace"
    return check_destination(dest)


class _BlobOut:
    """The ``AtomicFile`` face :class:`TorchWriter` writes through, placing one archive at the
    current end of the data file: positions are relative to the archive's start, so its zip
    offsets are too (torch reads each chunk as a file view starting there)."""

    def __init__(self, raw: Any, dest: Path) -> None:
        self.raw = raw
        self.dest = dest
        self.base = raw.tell()
        self.file = self  # TorchWriter's zip sink seeks and tells through .file

    def tell(self) -> int:
        return self.raw.tell() - self.base

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == os.SEEK_SET:
            pos += self.base
        return self.raw.seek(pos, whence) - self.base

    def write(self, data: Any) -> None:
        try:
            mv = memoryview(data).cast("B")
            while mv:
                n = self.raw.write(mv)
                mv = mv[n:]
        except OSError as e:
            raise OutputError(f"{self.dest}: write failed ({DATA_NAME}): {e.strerror}") from None

    def commit(self) -> None:
        pass  # the data file is synced once, when the whole folder is committed

    def abort(self) -> None:
        pass  # the folder writer removes the temporary folder


class DcpWriter(StreamWriter):
    """Streams a DCP folder: one chunk per tensor in ``__0_0.distcp``, then ``.metadata``.
    See the module docstring for the layout."""

    def __init__(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None) -> None:
        self.dest = Path(dest)
        self.mode = check_dcp_destination(self.dest)
        self.provenance = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._stored: list[tuple[int, int] | None] = [None] * len(entries)
        self._w: TorchWriter | None = None
        self._raw: Any = None
        self._done = False
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".ckptavg-tmp",
                                             dir=self.dest.parent))
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot write in {self.dest.parent}: {e.strerror}") from None
        try:
            self._raw = open(self.tmp / DATA_NAME, "xb", buffering=0)  # noqa: SIM115 (closed in commit/abort)
            super().__init__(entries)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.dest}: cannot create {DATA_NAME}: {e.strerror}") from None
        except BaseException:
            self.abort()
            raise

    # -- StreamWriter hooks: each tensor is one torch.save archive, streamed

    def _begin(self, i: int) -> None:
        e = self.entries[i]
        stub = TensorStub(StorageRef("0", e.dtype, e.nbytes), e.shape)
        self._w = TorchWriter(self.dest, [Entry(e.name, e.dtype, e.shape)], obj=stub, stubs=[stub],
                              out=_BlobOut(self._raw, self.dest))

    def _data(self, i: int, mv: memoryview) -> None:
        assert self._w is not None
        self._w.write(mv)

    def _end(self, i: int) -> None:
        assert self._w is not None
        out = self._w.out
        self._w.commit()
        self._w = None
        self._stored[i] = (out.base, self._raw.tell() - out.base)

    def _alias(self, i: int, src: int) -> None:
        e, s = self.entries[i], self.entries[src]
        if (e.dtype, tuple(e.shape)) != (s.dtype, tuple(s.shape)):
            raise OutputError(f"{self.dest}: tied tensor {e.name!r} differs from {s.name!r} in dtype or shape")
        self._stored[i] = self._stored[src]  # both names read the one stored chunk

    # -- finishing

    def _metadata(self) -> Any:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        sdm: dict[str, Any] = {}
        storage: dict[Any, Any] = {}
        for e, where in zip(self.entries, self._stored):
            assert where is not None
            zeros = torch.Size([0] * len(e.shape))
            size = torch.Size(e.shape)
            sdm[e.name] = TensorStorageMetadata(properties=TensorProperties(dtype=e.dtype), size=size,
                                                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=size)])
            storage[MetadataIndex(e.name, zeros, 0)] = _StorageInfo(DATA_NAME, where[0], where[1])
        return Metadata(state_dict_metadata=sdm, planner_data={e.name: (e.name,) for e in self.entries},
                        storage_data=storage, storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
                        version=CURRENT_DCP_VERSION)

    def commit(self) -> None:
        """Sync the data file, write ``.metadata`` and the provenance, rename the folder into place."""
        self._check_complete()
        try:
            try:
                self._raw.flush()
                os.fsync(self._raw.fileno())
                self._raw.close()
                with open(self.tmp / _METADATA_NAME, "xb") as fh:
                    pickle.dump(self._metadata(), fh)  # as torch's FileSystemWriter.finish pickles it
                (self.tmp / PROVENANCE_NAME).write_text(json.dumps(self.provenance, indent=2) + "\n",
                                                        encoding="utf-8")
                for n in (_METADATA_NAME, PROVENANCE_NAME):
                    fsync_path(self.tmp / n)
                with signals_blocked():
                    publish_folder(self.tmp, self.dest, self.mode)
                    self._done = True
            except OSError as e:
                raise OutputError(f"{self.dest}: cannot finish writing the DCP folder: {e.strerror}") from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Remove the temporary folder; the destination is left as it was."""
        if self._done:
            return
        self._done = True
        if self._w is not None:
            self._w.abort()
            self._w = None
        if self._raw is not None:
            try:
                self._raw.close()
            except OSError:
                pass
        tmp = getattr(self, "tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

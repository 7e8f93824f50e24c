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

Under torchrun (:mod:`ckptavg.distributed`) each rank writes its own tensors into
``__{rank}_0.distcp`` with a :class:`DcpPartWriter` and rank 0 writes ``.metadata`` from every
rank's records (:func:`write_dcp_metadata`).

Tied names point at one stored chunk. Everything is written into a temporary sibling folder
renamed into place once complete (:func:`ckptavg.io.folders.publish_folder`); an existing
destination is replaced only if empty or an earlier ckptavg output holding only the files
ckptavg wrote there (a file added to it later is never deleted: the merge is refused).

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
from .files import TMP_SUFFIX, fsync_path, signals_blocked
from .folders import publish_folder
from .hf_folder_layout import check_destination
from .kinds import OutputKind, OutputSetup, RankPart
from .torch_out import StorageRef, TensorStub, TorchWriter
from .writer import Entry, FolderPart, StreamWriter, local_entries

__all__ = ["KIND", "DcpWriter", "DcpPartWriter", "DATA_NAME", "PROVENANCE_NAME", "check_dcp_destination", "data_name",
           "dcp_metadata", "is_dcp_output", "make_temporary_folder", "write_dcp_metadata"]

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
    """``"new"``, ``"empty"`` or ``"replace"`` (an earlier ckptavg DCP or folder output holding
    only files ckptavg wrote is there: ``.metadata``, ``ckptavg.json``, ``__R_N.distcp``);
    anything else at ``dest`` raises :class:`~ckptavg.errors.OutputError`, naming the first
    file ckptavg did not write (see :mod:`ckptavg.io.folders`).

    Example::

        check_dcp_destination(Path("avg.dcp"))  # "new" when nothing is there yet
    """
    return check_destination(dest)


class _BlobOut:
    """The ``AtomicFile`` face :class:`TorchWriter` writes through, placing one archive at the
    current end of the data file: positions are relative to the archive's start, so its zip
    offsets are too (torch reads each chunk as a file view starting there)."""

    def __init__(self, raw: Any, dest: Path, name: str = DATA_NAME) -> None:
        self.raw = raw
        self.dest = dest
        self.name = name
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
            raise OutputError(f"{self.dest}: write failed ({self.name}): {e.strerror}") from None

    def commit(self) -> None:
        pass  # the data file is synced once, when the whole folder is committed

    def abort(self) -> None:
        pass  # the folder writer removes the temporary folder


def data_name(rank: int) -> str:
    """The data file of ``rank`` in a DCP folder (torch's own naming, ``__{rank}_0.distcp``).

    Example::

        data_name(1)  # '__1_0.distcp'
    """
    return f"__{rank}_0.distcp"


#: where one tensor's chunk is stored: (data file name relative to the folder, offset, length)
Record = tuple[str, int, int]


class DcpPartWriter(StreamWriter):
    """One data file of a DCP folder: each entry streamed as one chunk (a ``torch.save`` archive)
    into ``folder / name``; :meth:`records` says where each entry's chunk lies. Used alone by
    one rank of a merge across ranks (:mod:`ckptavg.distributed`) and, as the base of
    :class:`DcpWriter`, by a single-process merge.

    Example::

        part = DcpPartWriter(Path("avg.dcp"), tmp_folder, data_name(rank), my_entries)
        for t in my_tensors:
            part.write(t)
        part.finish()
        records = part.records()  # {"fc.weight": ("__1_0.distcp", 0, 4711), ...}
    """

    def __init__(self, dest: Path, folder: Path, name: str, entries: Sequence[Entry]) -> None:
        self.dest = Path(dest)
        self.folder = Path(folder)
        self.name = name
        self._stored: list[tuple[int, int] | None] = [None] * len(entries)
        self._w: TorchWriter | None = None
        self._raw: Any = None
        self._closed = False
        try:
            self._raw = open(self.folder / name, "xb", buffering=0)  # noqa: SIM115 (closed in finish/abort)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot create {name}: {e.strerror}") from None
        try:
            super().__init__(entries)
        except BaseException:
            self._close_part(remove=True)
            raise

    # -- StreamWriter hooks: each tensor is one torch.save archive, streamed

    def _begin(self, i: int) -> None:
        e = self.entries[i]
        stub = TensorStub(StorageRef("0", e.dtype, e.nbytes), e.shape)
        self._w = TorchWriter(self.dest, [Entry(e.name, e.dtype, e.shape)], obj=stub, stubs=[stub],
                              out=_BlobOut(self._raw, self.dest, self.name))

    def _data(self, i: int, mv: memoryview) -> None:
        assert self._w is not None
        self._w.write(mv)

    def _end(self, i: int) -> None:
        assert self._w is not None
        out: Any = self._w.out  # the _BlobOut this entry's archive was written through
        self._w.commit()
        self._w = None
        self._stored[i] = (out.base, self._raw.tell() - out.base)

    def _alias(self, i: int, src: int) -> None:
        e, s = self.entries[i], self.entries[src]
        if (e.dtype, tuple(e.shape)) != (s.dtype, tuple(s.shape)):
            raise OutputError(f"{self.dest}: tied tensor {e.name!r} differs from {s.name!r} in dtype or shape")
        self._stored[i] = self._stored[src]  # both names read the one stored chunk

    # -- finishing

    def finish(self) -> None:
        """Check every entry was written, then flush, fsync and close the data file."""
        self._check_complete()
        try:
            self._raw.flush()
            os.fsync(self._raw.fileno())
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot finish writing {self.name}: {e.strerror}") from None
        self._close_part(remove=False)

    def records(self) -> dict[str, Record]:
        """Entry name -> (data file, offset, length) of its chunk, for the ``.metadata``."""
        out = {}
        for e, where in zip(self.entries, self._stored):
            assert where is not None, e.name
            out[e.name] = (self.name, where[0], where[1])
        return out

    def _close_part(self, remove: bool) -> None:
        if self._w is not None:
            self._w.abort()
            self._w = None
        if self._raw is not None and not self._closed:
            self._closed = True
            try:
                self._raw.close()
            except OSError:
                pass
        if remove:
            try:
                (self.folder / self.name).unlink()
            except OSError:
                pass

    def abort(self) -> None:
        """Close and remove this data file (the folder is its creator's to remove)."""
        self._close_part(remove=True)


def dcp_metadata(entries: Sequence[Entry], records: Mapping[str, Record],
                 byte_records: Mapping[str, Record] | None = None) -> Any:
    """torch's ``Metadata`` of a DCP folder holding every entry whole, one chunk each, at ``records``
    (and byte entries, stored as they are, at ``byte_records``).

    Example::

        md = dcp_metadata(plan.entries(), part.records())
    """
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for e in entries:
        name, offset, length = records[e.name]
        zeros = torch.Size([0] * len(e.shape))
        size = torch.Size(e.shape)
        sdm[e.name] = TensorStorageMetadata(properties=TensorProperties(dtype=e.dtype), size=size,
                                            chunks=[ChunkStorageMetadata(offsets=zeros, sizes=size)])
        storage[MetadataIndex(e.name, zeros, 0)] = _StorageInfo(name, offset, length)
    for key, (name, offset, length) in (byte_records or {}).items():
        sdm[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(name, offset, length)
    return Metadata(state_dict_metadata=sdm, planner_data={k: (k,) for k in sdm},
                    storage_data=storage, storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
                    version=CURRENT_DCP_VERSION)


def write_dcp_metadata(folder: Path, entries: Sequence[Entry], records: Mapping[str, Record],
                       provenance: Mapping[str, str], byte_records: Mapping[str, Record] | None = None) -> None:
    """Write (and fsync) ``.metadata`` and ``ckptavg.json`` into the temporary ``folder``. Raises ``OSError``.

    Example::

        write_dcp_metadata(tmp, plan.entries(), records, plan.provenance())
    """
    with open(folder / _METADATA_NAME, "xb") as fh:
        pickle.dump(dcp_metadata(entries, records, byte_records), fh)  # as torch's FileSystemWriter.finish pickles it
    (folder / PROVENANCE_NAME).write_text(json.dumps(dict(provenance), indent=2) + "\n", encoding="utf-8")
    for n in (_METADATA_NAME, PROVENANCE_NAME):
        fsync_path(folder / n)


def make_temporary_folder(dest: Path) -> Path:
    """A fresh temporary sibling folder of ``dest`` (renamed into place when complete).

    Example::

        tmp = make_temporary_folder(Path("avg.dcp"))  # avg.dcp's parent / .avg.dcp.XXXX.ckptavg-tmp
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent))
    except OSError as e:
        raise OutputError(f"{dest}: cannot write in {dest.parent}: {e.strerror}") from None


class DcpWriter(FolderPart, DcpPartWriter):
    """Streams a DCP folder: one chunk per tensor in ``__0_0.distcp``, then ``.metadata``. See the
    module docstring for the layout.

    With ``part`` (a merge across ranks), it writes this rank's tensors into ``__{rank}_0.distcp``
    of the shared temporary folder; :meth:`finish` returns its chunk records, rank 0 writes
    ``.metadata`` from every rank's (:meth:`complete`) and the ranks publish together
    (:class:`~ckptavg.io.writer.FolderPart`)."""

    def __init__(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None, *,
                 part: RankPart | None = None, subfolder: str = "") -> None:
        dest = Path(dest)
        self.part = part
        self.all_entries = list(entries)
        self.provenance = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._done = False
        if part is not None:
            self.mode, self.tmp = part.mode, part.tmp
            folder = self._subfolder(dest, subfolder)
            DcpPartWriter.__init__(self, dest, folder, data_name(part.rank), local_entries(entries, part.mine()))
            return
        self.mode = check_dcp_destination(dest)
        self.tmp = make_temporary_folder(dest)
        try:
            DcpPartWriter.__init__(self, dest, self._subfolder(dest, subfolder), DATA_NAME, entries)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _subfolder(self, dest: Path, name: str) -> Path:
        """The folder the DCP files go into: the temporary folder, or a folder inside it (a Megatron
        root's ``iter_XXXXXXX/``, made by whichever rank comes first)."""
        if not name:
            return self.tmp
        try:
            (self.tmp / name).mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"{dest}: cannot create {name} in {self.tmp}: {e.strerror}") from None
        return self.tmp / name

    def _complete_folder(self, records: Mapping[str, Record]) -> None:
        """Write what makes the data files a checkpoint (``.metadata``, the provenance) into the
        temporary folder, from every entry's chunk records. Raises ``OSError``."""
        write_dcp_metadata(self.folder, self.all_entries, records, self.provenance)

    def annotate(self, metadata: Mapping[str, str]) -> None:
        """Add to the provenance (written when the folder is completed, so it can say what happened
        after the data was streamed: the BatchNorm recalibration)."""
        self.provenance.update(metadata)

    def finish(self) -> dict[str, Record]:  # type: ignore[override]
        """Sync and close the data file; return where each of its entries' chunks lies."""
        super().finish()
        return self.records()

    def complete(self, payloads: Sequence[Any]) -> None:
        """Rank 0: ``.metadata`` (every rank's records) and ``ckptavg.json`` into the temporary folder."""
        every: dict[str, Record] = {}
        for records in payloads:
            every.update(records)
        try:
            self._complete_folder(every)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot write the DCP metadata: {e.strerror}") from None

    def commit(self) -> None:
        """Sync the data file, write ``.metadata`` and the provenance, rename the folder into place."""
        try:
            records = self.finish()
            try:
                self._complete_folder(records)
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
        """Remove the temporary folder (a rank's part: only its data file); the destination is
        left as it was."""
        if self._done:
            return
        self._done = True
        if self.part is not None:
            super().abort()
            return
        self._close_part(remove=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def report(self) -> dict[str, Any]:
        """Details for the merge report of an output written by several ranks."""
        if self.part is None:
            return {}
        w = self.part.world
        return {"data_files": [data_name(r) for r in range(w)],
                "output_notes": [f"DCP folder, {w} data file{'s' if w != 1 else ''} written by {w} "
                                 f"rank{'s' if w != 1 else ''}"]}


class DcpKind(OutputKind):
    """``-o NAME.dcp``: a PyTorch Distributed Checkpoint folder (see the module docstring)."""

    name = "dcp"
    single_file = False
    parts = True

    def matches(self, path: str) -> bool:
        return is_dcp_output(path)

    def check_destination(self, dest: Path) -> str:
        return check_dcp_destination(dest)

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> DcpWriter:
        return DcpWriter(dest, entries, metadata)

    def open_part(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup,
                  part: RankPart) -> DcpWriter:
        return DcpWriter(dest, entries, metadata, part=part)


KIND = DcpKind()

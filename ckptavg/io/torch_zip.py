"""The zip records of a ``torch.save`` archive (a whole file, or a window of one: a DCP chunk
blob), checked before torch or ckptavg decompresses anything or allocates from a size the zip
claims.

What holds once :class:`ZipRecords` is built: one ``data.pkl`` under one top-level folder, no
two members of one name, every member's data (by its own local header) inside the file or
window, a stored member's declared size equal to the bytes it stores, and a compressed member
(other than a storage, which is never decompressed: one that is used is refused) declaring at
most :data:`MAX_RATIO` times its compressed size (and at most :data:`MAX_PICKLE` bytes for
``data.pkl``, :data:`MAX_SMALL_MEMBER` for the others); ``data.pkl`` decompresses, in bounded
pieces, to exactly its declared size and CRC. torch's own reader (miniz) allocates a member's
declared size before decompressing it, so these bounds are what torch can then allocate.

:func:`exact_offsets` makes ``torch.load(map_location="meta")`` take storage offsets from the
local headers, and numbers each storage it creates in the order torch's loader asked for them
(:class:`SeqOffset`), which tells which of several references to one record torch uses.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import io
import struct
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import CheckpointReadError
from .files import InputFile

__all__ = ["ZipRecords", "exact_offsets", "SeqOffset", "MAX_PICKLE", "MAX_RATIO", "MAX_SMALL_MEMBER", "short"]

#: Largest ``data.pkl`` read (declared size).
MAX_PICKLE = 1 << 30
#: Largest declared size of a compressed member other than ``data.pkl`` and storages.
MAX_SMALL_MEMBER = 1 << 20
#: Largest ratio of declared to compressed size of a compressed member torch decompresses
#: (torch's own pickles compress about 4:1; a deflate bomb about 1000:1).
MAX_RATIO = 50
_SLACK = 64 << 10  # members declaring up to this many bytes are never refused for their ratio
_PIECE = 1 << 20


def short(e: BaseException | str, n: int = 200) -> str:
    s = " ".join(str(e).split())
    return (s[:n] + "...") if len(s) > n else s


def kind_checks_pickle(kind: str, pkl: zipfile.ZipInfo) -> bool:
    """Whether ``data.pkl`` is read through once here: always when compressed (its real size and
    CRC, in bounded pieces), and for whole files (its CRC) but not for each DCP chunk's small
    stored pickle (its size is checked against the blob; torch reads it whole anyway)."""
    return pkl.compress_type != zipfile.ZIP_STORED or kind == "torch checkpoint"


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a file as a seekable read-only file (for :mod:`zipfile`)."""

    def __init__(self, fh: Any, start: int, length: int) -> None:
        self._fh, self._start, self._len, self._pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos if whence == 0 else self._pos + pos if whence == 1 else self._len + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n:
            self._fh.seek(self._start + self._pos)
            n = self._fh.readinto(memoryview(b)[:n]) or 0
        self._pos += n
        return n


class ZipRecords:
    """The zip directory of a torch archive, checked the way torch's own loader sees it.

    ``where`` starts every message (the file, or the file and DCP key); ``kind`` names what is
    damaged (``"torch checkpoint"``, ``"DCP chunk"``). Offsets are relative to ``start``.

    Example::

        recs = ZipRecords(InputFile(path, size), str(path))
        name, size = recs.record_at(offset)  # the stored record whose data starts at offset
    """

    def __init__(self, f: InputFile, where: str, kind: str = "torch checkpoint", start: int = 0,
                 length: int | None = None) -> None:
        self.f, self.where, self.kind, self.start = f, where, kind, start
        self.length = f.size - start if length is None else length
        self.byteorder: bytes | None = None
        try:
            with f.open_stream(buffering=0) as fh:
                self._read_directory(fh)
        except CheckpointReadError:
            raise
        except OSError as e:
            raise CheckpointReadError(f"{where}: cannot read: {e.strerror}") from None

    def _read_directory(self, fh: Any) -> None:
        try:
            zf = zipfile.ZipFile(io.BufferedReader(_Window(fh, self.start, self.length), 1 << 13))
            infos = zf.infolist()
            self._check_directory([i.filename for i in infos])
            for i in infos:
                if "/data/" not in i.filename:
                    self._check_member(i)
            pkl = next(i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1)
            if kind_checks_pickle(self.kind, pkl):
                self._check_pickle(zf, pkl)
            bo = pkl.filename[: -len("data.pkl")] + "byteorder"
            if bo in zf.NameToInfo:
                with zf.open(bo) as bh:
                    self.byteorder = bh.read(64)
        except CheckpointReadError:
            raise
        except zipfile.BadZipFile as e:
            if "CRC" in str(e):
                raise self._err("a record fails its CRC check") from None
            raise self._err(f"its zip directory is unreadable: {short(e)}", damaged=False) from None
        except Exception as e:  # zipfile raises many types on damaged directories
            raise self._err(f"its zip directory is unreadable: {short(e)}", damaged=False) from None
        recs = sorted((i.header_offset, i.file_size, i.compress_size, i.compress_type, i.filename) for i in infos)
        self._starts = [r[0] for r in recs]
        self._recs = recs

    def _err(self, msg: str, damaged: bool = True) -> CheckpointReadError:
        if damaged:
            return CheckpointReadError(f"{self.where}: damaged {self.kind}: {msg}")
        return CheckpointReadError(f"{self.where}: damaged or truncated {self.kind} ({msg})")

    def _check_directory(self, names: list[str]) -> None:
        if len(set(names)) != len(names):  # (counted once: a zip can hold 100,000 members)
            dup = next(n for n, c in collections.Counter(names).items() if c > 1)
            raise CheckpointReadError(f"{self.where}: ambiguous {self.kind}: the zip holds two members named "
                                      f"{short(repr(dup), 80)}")
        if not any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names):
            if any(n.endswith("constants.pkl") for n in names):
                raise CheckpointReadError(f"{self.where}: a TorchScript archive, not a checkpoint of weights")
            raise CheckpointReadError(f"{self.where}: a zip file without data.pkl, not a torch checkpoint")
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1:
            raise CheckpointReadError(
                f"{self.where}: ambiguous {self.kind}: the zip has {len(tops)} top-level folders "
                f"({short(', '.join(sorted(tops)[:4]), 80)}); torch expects one")

    def _check_member(self, i: zipfile.ZipInfo) -> None:
        """A member torch may decompress: its stored bytes inside the file, its declared size bounded."""
        label = repr(i.filename.split("/")[-1][:80])
        end = self.data_start(i.header_offset) + i.compress_size
        if end > self.length:
            raise self._err(f"record {label} runs past the end of its bytes ({end} > {self.length}; truncated?)")
        if i.compress_type == zipfile.ZIP_STORED:
            if i.compress_size != i.file_size:
                raise self._err(f"record {label} declares {i.file_size} bytes but stores {i.compress_size}")
            return
        cap = MAX_PICKLE if i.filename.endswith("/data.pkl") else MAX_SMALL_MEMBER
        if i.file_size > cap or (i.file_size > _SLACK and i.file_size > MAX_RATIO * i.compress_size):
            raise self._err(
                f"record {label} declares {i.file_size} bytes compressed into {i.compress_size} (ratio above "
                f"{MAX_RATIO} or size above {cap}): refusing to decompress it (a zip bomb?)")

    def _check_pickle(self, zf: zipfile.ZipFile, pkl: zipfile.ZipInfo) -> None:
        """``data.pkl`` decompresses to exactly its declared size and CRC, read in bounded pieces."""
        if pkl.file_size > MAX_PICKLE:
            raise self._err(f"data.pkl is implausibly large ({pkl.file_size} bytes)")
        got = 0
        try:
            with zf.open(pkl) as fh:
                if pkl.CRC == 0:
                    fh._expected_crc = None  # type: ignore[attr-defined]  # (a writer that records none)
                while piece := fh.read(_PIECE):
                    got += len(piece)
        except EOFError:
            raise self._err(f"record 'data.pkl' holds fewer bytes than the {pkl.file_size} it declares") from None
        except zipfile.BadZipFile as e:
            if "CRC" in str(e):
                raise self._err("record 'data.pkl' fails its CRC check") from None
            raise
        if got != pkl.file_size:
            raise self._err(f"record 'data.pkl' holds {got} bytes, not the {pkl.file_size} it declares")

    def record_at(self, offset: int) -> tuple[str, int]:
        """(name, size) of the stored record whose data starts exactly at ``offset``, as the
        record's own local zip header says (not as any reader computed it)."""
        k = bisect.bisect_right(self._starts, offset) - 1
        if k < 0:
            raise self._err("a storage lies before every record")
        h, size, csize, ctype, name = self._recs[k]
        label = repr(name.split("/")[-1][:80])
        start = self.data_start(h)
        if offset != start:
            raise self._err(f"a storage is located at byte {offset}, which is not where record {label} keeps its "
                            f"data (byte {start}, by its local header)")
        if ctype != zipfile.ZIP_STORED:
            raise self._err(
                f"record {label} is compressed (zip method {ctype}): ckptavg reads tensor data in place, from "
                "uncompressed records as torch.save writes them; load the file with torch.load and save it again")
        if csize != size:
            raise self._err(f"record {label} declares {size} bytes but stores {csize}")
        if start + size > self.length:
            raise self._err(f"record {label} runs past the end of its bytes ({start + size} > {self.length}; "
                            "truncated?)")
        return name, size

    def data_start(self, header: int) -> int:
        """Where a record's data begins: after its local header (30 bytes), name and extra field,
        whose lengths the local header itself gives (they may differ from the central directory's)."""
        head = self.f.pread(self.start + header, 30) if 0 <= header <= self.length - 30 else b""
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise self._err(f"no local zip header at byte {header}")
        n, e = struct.unpack("<HH", head[26:30])
        return header + 30 + n + e


class SeqOffset(int):
    """A storage's record offset that also says in which order torch's loader created the
    storage (``seq``): torch keeps the first storage it loads for a record and gives it to every
    later reference, whatever dtype and size those name."""

    seq: int = -1


class _ExactOffsets:
    """torch's zip reader, but saying that the archive has no ``.format_version``: torch then takes
    each storage's offset from the record's own local header (``get_record_offset``) instead of
    computing it from the layout its own writer would have produced (a data descriptor after
    every record), which is wrong for any zip another writer made, ckptavg's own included."""

    def __init__(self, reader: Any, calls: list[int]) -> None:
        self._reader = reader
        self._calls = calls

    def has_record(self, name: str) -> bool:
        return False if name == ".format_version" else bool(self._reader.has_record(name))

    def get_record_offset(self, name: str) -> int:
        off = SeqOffset(self._reader.get_record_offset(name))
        off.seq = len(self._calls)
        self._calls.append(int(off))
        return off

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


_EXACT_LOCK = threading.Lock()
_REAL_OPENER = torch.serialization._open_zipfile_reader


class _Opener(_REAL_OPENER):
    """torch's zip reader opener, handing torch an :class:`_ExactOffsets` (defined once: a class
    made per load would cost more than the load of a small DCP chunk)."""

    calls: list[int] = []

    def __enter__(self) -> Any:
        _Opener.calls.clear()  # a retried load starts again
        return _ExactOffsets(super().__enter__(), _Opener.calls)


@contextlib.contextmanager
def exact_offsets() -> Iterator[list[int]]:
    """While it is active, ``torch.load`` reads storage offsets from the local zip headers
    (:class:`_ExactOffsets`); it yields the list of offsets torch asked for, in order (one per
    storage torch created). torch offers no option for this, so its reader's opener is replaced
    for the duration of one load (under a lock: loads on other threads wait).

    Example::

        with exact_offsets() as calls:
            obj = torch.load(path, map_location="meta", weights_only=True)
    """
    calls: list[int] = []
    with _EXACT_LOCK:
        _Opener.calls = calls
        torch.serialization._open_zipfile_reader = _Opener  # type: ignore[misc]
        try:
            yield calls
        finally:
            torch.serialization._open_zipfile_reader = _REAL_OPENER  # type: ignore[misc]

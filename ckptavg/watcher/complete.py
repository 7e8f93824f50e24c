"""Is a checkpoint complete? Judged per format from listings, sizes and a few header bytes, never
from tensor data, through a :class:`Source` (anything that can list a folder, stat a path and read
a byte range: the local file system today, object storage later).

* a safetensors file: its header parses and the file is exactly as long as the header says;
* a torch zip file: its end-of-central-directory record is the last thing in the file
  (``torch.save`` writes it last); a legacy torch pickle has no such record: its size alone;
* a Hugging Face folder: its index (or ``model.safetensors``) and every shard it names, each
  complete as a file; a Trainer ``checkpoint-N/`` folder also needs ``trainer_state.json``
  (written at the end of the save);
* a folder holding diffusers component folders (a training script's ``checkpoint-N/`` with
  ``unet/``, ``unet_ema/``) is not one checkpoint: watch the component by name
  (``'run/checkpoint-*/unet'``; a merge would choose one, a watch must not switch as they appear);
* a DCP folder: ``.metadata`` (``dcp.save`` writes it last);
* a Megatron ``iter_NNNNNNN/`` folder beside ``latest_checkpointed_iteration.txt``: the marker
  names this iteration or a later one (Megatron writes the marker last).

Whatever the format, the watcher also waits until a checkpoint's :func:`stamp` has stopped
changing (:mod:`ckptavg.watcher.loop`).

Example::

    verdict = judge(LocalSource(), Path("runs/step-100.safetensors"))
    verdict.complete, verdict.reason   # (False, 'safetensors: 4096 of 8192 bytes written')
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..io.urls import is_remote

__all__ = ["Source", "LocalSource", "Verdict", "judge", "stamp", "looks_like_checkpoint_folder", "component_folders"]

_MAX_HEADER = 100 * 2**20
_EOCD = b"PK\x05\x06"
_TRAINER_RE = re.compile(r"^checkpoint-\d+$")
_MEGATRON_RE = re.compile(r"^iter_(\d{7})$")
_MARKER = "latest_checkpointed_iteration.txt"
_TRAILING_NUMBER_RE = re.compile(r"\d+$")
# Hugging Face model folders, then diffusers component folders (unet/, transformer/...)
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
               "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
_HF_SINGLE = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.bin")
_SHARD_RE = re.compile(r"^(?:model|pytorch_model|diffusion_pytorch_model)-\d{5}-of-\d{5}\.(?:safetensors|bin)$")

Stamp = tuple[object, ...]


class Source(Protocol):
    """What the watcher needs of a storage: list a folder, stat a path, read a byte range."""

    def listdir(self, folder: Path) -> list[tuple[str, bool]] | None:
        """(name, is a folder) of each entry, or None when the folder does not exist."""

    def stat(self, path: Path) -> Stamp | None:
        """An identity of the content (changes when it is rewritten), or None when absent."""

    def size(self, path: Path) -> int | None:
        """The size in bytes, or None when absent."""

    def read(self, path: Path, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (``offset < 0``: from the end); raises OSError."""


class LocalSource:
    """The local file system (stamps from :func:`ckptavg.io.files.file_stamp`), and URLs (object
    storage through fsspec: fresh listings, the store's ETag or generation as the stamp, range reads;
    always polled)."""

    def listdir(self, folder: Path) -> list[tuple[str, bool]] | None:
        if is_remote(folder):
            return _remote_listdir(folder)
        try:
            with os.scandir(folder) as it:
                return [(e.name, e.is_dir()) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            return None

    def stat(self, path: Path) -> Stamp | None:
        from ..io.files import file_stamp

        return _remote_stamp(path) if is_remote(path) else file_stamp(path)

    def size(self, path: Path) -> int | None:
        if is_remote(path):
            st = _remote_stamp(path)
            return None if st is None else int(st[0])  # type: ignore[call-overload]
        try:
            return os.stat(path).st_size
        except OSError:
            return None

    def read(self, path: Path, offset: int, n: int) -> bytes:
        if is_remote(path):
            return _remote_read(path, offset, n)
        with open(path, "rb") as f:
            if offset < 0:
                f.seek(max(0, f.seek(0, os.SEEK_END) + offset))
            else:
                f.seek(offset)
            return f.read(n)


def _remote_listdir(folder: Path) -> list[tuple[str, bool]] | None:
    from ..errors import CheckpointReadError

    try:
        folder.fs.invalidate_cache(folder.key)  # type: ignore[attr-defined]
        return [(q.name, q.is_dir()) for q in folder.iterdir()]
    except (FileNotFoundError, NotADirectoryError, CheckpointReadError):
        return None  # absent for now (or the store unreachable for a while): like a missing folder


def _remote_stamp(path: Path) -> tuple[object, ...] | None:
    from ..errors import CheckpointReadError
    from ..io.remote_in import remote_stamp

    try:
        st = remote_stamp(path)
    except CheckpointReadError:
        return None
    return None if st is None or path.is_dir() else st


def _remote_read(path: Path, offset: int, n: int) -> bytes:
    from ..errors import CheckpointReadError
    from ..io.remote_in import fetch_range

    st = _remote_stamp(path)
    if st is None:
        raise FileNotFoundError(2, "gone", str(path))
    size = int(st[0])  # type: ignore[call-overload]
    start = max(0, size + offset) if offset < 0 else min(offset, size)
    end = min(size, start + n)
    try:
        return fetch_range(path, start, end) if end > start else b""
    except CheckpointReadError as e:
        raise OSError(str(e)) from None


@dataclass(frozen=True)
class Verdict:
    """What :func:`judge` found: complete or not, why not, the format it looks like."""

    complete: bool
    reason: str = ""
    format: str = ""


def stamp(src: Source, path: Path, is_dir: bool) -> Stamp | None:
    """The identity of a checkpoint: a file's stamp, or a folder's sorted (relative name, stamp)
    of every file in it (two levels deep); None when it is absent."""
    if not is_dir:
        return src.stat(path)
    out: list[tuple[str, Stamp | None]] = []
    top = src.listdir(path)
    if top is None:
        return None
    for name, sub in sorted(top):
        if sub:
            for name2, sub2 in sorted(src.listdir(path / name) or []):
                if not sub2:
                    out.append((f"{name}/{name2}", src.stat(path / name / name2)))
        else:
            out.append((name, src.stat(path / name)))
    return tuple(out)


def looks_like_checkpoint_folder(src: Source, path: Path) -> bool:
    """A folder that is (or is becoming) one checkpoint: it holds checkpoint data or an index."""
    names = {n for n, _d in src.listdir(path) or []}
    if ".metadata" in names or any(n in names for n in _HF_INDEXES + _HF_SINGLE):
        return True
    return any(n.endswith(".distcp") or _SHARD_RE.match(n) for n in names)


def component_folders(src: Source, path: Path) -> list[Path]:
    """The diffusers component sub-folders (``unet/``, ``unet_ema/``...) of a folder that is not a
    checkpoint itself (a diffusers training script's ``checkpoint-N/``); none otherwise."""
    if looks_like_checkpoint_folder(src, path):
        return []
    subs = [path / n for n, d in sorted(src.listdir(path) or []) if d and not n.startswith(".")]
    return [q for q in subs
            if any(n.startswith("diffusion_pytorch_model") for n, _d in src.listdir(q) or [])]


def judge(src: Source, path: Path, is_dir: bool | None = None) -> Verdict:
    """Whether the checkpoint at ``path`` is completely written, from its format's own marks."""
    if is_dir is None:
        is_dir = src.listdir(path) is not None
    return _judge_folder(src, path) if is_dir else _judge_file(src, path)


def _judge_file(src: Source, path: Path) -> Verdict:
    size = src.size(path)
    if size is None:
        return Verdict(False, "gone")
    if size == 0:
        return Verdict(False, "empty so far")
    try:
        head = src.read(path, 0, 8)
        if path.name.lower().endswith(".safetensors") or _safetensors_head(head, size):
            return _judge_safetensors(src, path, size, head)
        if head.startswith(b"PK\x03\x04"):
            return _judge_zip(src, path, size)
    except OSError as e:
        return Verdict(False, f"cannot read: {e.strerror or e}")
    if head[:1] == b"\x80":
        return Verdict(True, format="torch-legacy")  # a pickle has no end mark: its size alone
    return Verdict(False, "not a checkpoint (neither safetensors nor a torch file)", "unknown")


def _safetensors_head(head: bytes, size: int) -> bool:
    return len(head) == 8 and 0 < struct.unpack("<Q", head)[0] < min(size, _MAX_HEADER)


def _judge_safetensors(src: Source, path: Path, size: int, head: bytes) -> Verdict:
    if len(head) < 8:
        return Verdict(False, "safetensors: header length not written yet", "safetensors")
    n = struct.unpack("<Q", head)[0]
    if n > _MAX_HEADER:
        return Verdict(False, "safetensors: implausible header length", "safetensors")
    if size < 8 + n:
        return Verdict(False, f"safetensors: header being written ({size} of {8 + n} bytes)", "safetensors")
    try:
        header = json.loads(src.read(path, 8, n))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return Verdict(False, f"safetensors: header does not parse ({e})", "safetensors")
    if size < 8 + n + end:
        return Verdict(False, f"safetensors: {size} of {8 + n + end} bytes written", "safetensors")
    return Verdict(True, format="safetensors")


def _judge_zip(src: Source, path: Path, size: int) -> Verdict:
    tail = src.read(path, -min(size, 22 + 65535), 22 + 65535)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return Verdict(False, "torch zip: no end-of-central-directory record yet", "torch")
    comment = struct.unpack("<H", tail[at + 20 : at + 22])[0]
    if at + 22 + comment != len(tail):
        return Verdict(False, "torch zip: end record is not at the end of the file", "torch")
    return Verdict(True, format="torch")


def _judge_folder(src: Source, path: Path) -> Verdict:
    entries = src.listdir(path)
    if entries is None:
        return Verdict(False, "gone")
    names = {n for n, d in entries if not d}
    m = _MEGATRON_RE.match(path.name)
    if m is not None and src.size(path.parent / _MARKER) is not None:
        try:
            text = src.read(path.parent / _MARKER, 0, 64).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        if not text.isdigit() or int(text) < int(m.group(1)):
            return Verdict(False, f"{_MARKER} does not name this iteration yet", "megatron")
    if ".metadata" in names:
        return Verdict(True, format="dcp")
    comps = component_folders(src, path)
    if comps:  # checkpoint-N/ of a diffusers script: unet_ema/ may be written before unet/, so never guess
        shown = ", ".join(q.name for q in comps)
        example = path.parent / _TRAILING_NUMBER_RE.sub("*", path.name) / comps[0].name
        return Verdict(False, f"holds model components ({shown}), not one checkpoint: watch the component by "
                       f"name, e.g. '{example}'", "unknown")
    if _TRAINER_RE.match(path.name) and "trainer_state.json" not in names:
        return Verdict(False, "trainer_state.json not written yet (the Trainer writes it last)", "hf-folder")
    for index in _HF_INDEXES:
        if index in names:
            return _judge_index(src, path, index, names)
    for single in _HF_SINGLE:
        if single in names:
            v = _judge_file(src, path / single)
            return Verdict(v.complete, v.reason and f"{single}: {v.reason}", "hf-folder")
    if any(n.endswith(".distcp") for n in names):
        return Verdict(False, "DCP: .metadata not written yet (dcp.save writes it last)", "dcp")
    return Verdict(False, "no index or model file yet", "")


def _judge_index(src: Source, path: Path, index: str, names: set[str]) -> Verdict:
    try:
        data = json.loads(src.read(path / index, 0, 64 * 2**20))
        shards = sorted(set(data["weight_map"].values()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return Verdict(False, f"{index}: does not parse yet ({e})", "hf-folder")
    for shard in shards:
        if shard not in names:
            return Verdict(False, f"shard {shard} not written yet", "hf-folder")
        v = _judge_file(src, path / shard)
        if not v.complete:
            return Verdict(False, f"{shard}: {v.reason}", "hf-folder")
    return Verdict(True, format="hf-folder")

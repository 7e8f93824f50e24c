"""Hugging Face model folders as output: sharded safetensors, streamed, published atomically.

``ckptavg merge ft1/ ft2/ ft3/ -o soup/`` writes ``soup/`` the way ``save_pretrained`` does:

* the weights as ``model-0000k-of-0000n.safetensors`` shards of at most ``shard_size``
  bytes of tensor data each (a single tensor larger than that gets a shard of its own),
  plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...},
  "weight_map": {name: shard}}``); a model that fits in one shard is written as a single
  ``model.safetensors`` without an index, as ``save_pretrained`` does;
* every shard carries ``{"format": "pt"}`` and the merge's provenance (method, inputs
  with their weights, epochs and steps) in its ``__metadata__``; the index's ``metadata``
  records the provenance too;
* the non-weight files of the last selected input that is a model folder (``config.json``,
  ``generation_config.json``, tokenizer files, custom code...) are copied along, so
  ``from_pretrained`` loads the result. Training state (``trainer_state.json``,
  ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin``), other
  weight files (``.bin``, ``.pt``, ``.h5``, ``.onnx``, ``.gguf``...) and sub-folders are
  not copied. With ``dtype`` given, ``config.json``'s ``torch_dtype``/``dtype`` is updated.
  When that input is a diffusers component folder (``unet/``, ``transformer/``...), the weights
  keep diffusers' names (``diffusion_pytorch_model.safetensors``, or
  ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` with
  ``diffusion_pytorch_model.safetensors.index.json``), so ``UNet2DModel.from_pretrained`` loads it.
  Only regular files really inside the folder are copied: a symlink whose target lies outside
  it (except a Hugging Face hub cache snapshot's links into its repository's ``blobs``) and
  FIFOs, sockets or devices are skipped with a warning on stderr. A copy never gets more
  permission bits than its source has (a 0600 file stays 0600), under the umask;
* the metadata (index and every shard header) lists under ``ckptavg_files`` the files ckptavg
  wrote into the folder, so that a later run knows what it may replace.

Shards are written one after the other, tensor by tensor, as the engine produces them:
memory stays bounded by the engine's buffers whatever the model size.

Everything is written into a temporary sibling folder (``.NAME.*.ckptavg-tmp``) that is
renamed to the destination only once complete; on any error or interrupt it is removed.
SIGINT and SIGTERM are held back during the final renames and during that cleanup, so an
interrupt (or a second Ctrl-C) can neither split a replacement nor leave the folder behind.

**An existing destination folder** is replaced only if it is empty or is an earlier
ckptavg output holding nothing but the files ckptavg wrote there; it is then replaced as a
whole, atomically where the OS allows (:mod:`ckptavg.io.folders`). A folder of other files,
or an earlier output to which a file was added since (eval results, notes), is refused before
anything is read, naming the first such file: **ckptavg never deletes a file it did not
write**. Move that file out, or choose another folder.

**Tied weights** (one tensor under several names, e.g. GPT-2's ``lm_head.weight`` and
``transformer.wte.weight`` in a ``torch.save``-d state dict): safetensors cannot share
bytes between names, so each name gets its own copy of the (single, averaged once)
tensor. Inputs that are Hugging Face folders already omit tied duplicates, and so then
does the output; ``from_pretrained`` ties the weights again from the config either way.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptavgWarning, OutputError
from ..units import DEFAULT_SHARD_SIZE
from .dtypes import TORCH_TO_SAFETENSORS
from .files import TMP_SUFFIX, fsync_path, make_parent, remove_created, signals_blocked, umask
from .folders import FILES_KEY, publish_folder
from .hf_folder_in import weights_stem
from .hf_folder_layout import (
    Extras,
    check_destination,
    folder_extras,
    index_name,
    is_folder_output,
    shard_layout,
)
from .kinds import OutputKind, OutputSetup, RankPart
from .safetensors_out import safetensors_header
from .urls import as_path, is_remote
from .writer import Entry, FolderPart, StreamWriter, local_entries

__all__ = ["KIND", "HFFolderKind", "ShardedSafetensorsWriter", "check_storable", "copy_file"]


class ShardedSafetensorsWriter(FolderPart, StreamWriter):
    """Streams a Hugging Face model folder: shards in order, index, copied files, then
    one rename. See the module docstring for the layout and the rules.

    With ``part`` (a merge across ranks), it writes only that rank's shards into the shared
    temporary folder (rank 0 also the index and the copied files), and the ranks publish
    together (:class:`~ckptavg.io.writer.FolderPart`)."""

    def __init__(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, copy_source: Path | None = None,
                 config_dtype: torch.dtype | None = None, part: RankPart | None = None,
                 stem: str = "model", dequantized: bool = False) -> None:
        self.dest = Path(dest)
        self.part = part
        self.rank = part.rank if part is not None else 0
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.metadata.setdefault("format", "pt")
        self.mode = check_destination(self.dest) if part is None else part.mode
        entries = list(entries)
        check_storable(self.dest, entries)
        extras = folder_extras(as_path(copy_source)) if copy_source is not None else Extras([], [])
        self.copy_source = as_path(copy_source) if copy_source is not None and self.rank == 0 else None
        self.config_dtype = config_dtype
        self.dequantized = dequantized  # scaled float8 inputs read as float32: the config loses quantization_config
        owner = part.owner if part is not None else [0] * len(entries)
        self.layout = shard_layout(entries, owner, part.world if part is not None else 1, shard_size, stem)
        self.names = self.layout.names
        self.index_name = index_name(stem)
        taken = set(self.names) | {self.index_name}
        self.copy_files = [(n, src) for n, src in extras.files if n not in taken] if self.copy_source else []
        if self.copy_source is not None:
            for note in extras.skipped:
                warnings.warn(note, CkptavgWarning, stacklevel=2)
        # every rank lists the same files: what a later run may replace (ckptavg.io.folders)
        written = list(self.names) + ([self.index_name] if len(self.names) > 1 else [])
        written += [n for n, _src in extras.files if n not in taken]
        self.metadata[FILES_KEY] = json.dumps(written, separators=(",", ":"))
        self.total_size = sum(e.nbytes for e in entries)
        self.total_parameters = sum(e.nbytes // e.dtype.itemsize for e in entries)
        self.weight_map = {e.name: self.names[k] for e, k in zip(entries, self.layout.shard_of)}
        self.copied: list[str] = []
        mine = self.layout.local(self.rank)
        self._mine = [k for k, r in enumerate(self.layout.shard_rank) if r == self.rank]
        local = local_entries(entries, mine)
        self._lay_out(local, [self.layout.shard_of[g] for g in mine], self._mine)
        self._created: list[Path] = []
        if part is not None:
            self.tmp = part.tmp
        else:
            self._created = make_parent(self.dest)
            try:
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=TMP_SUFFIX,
                                                 dir=self.dest.parent))
            except OSError as e:
                remove_created(self._created)
                raise OutputError(f"{self.dest}: cannot write in {self.dest.parent}: {e.strerror}") from None
        try:
            super().__init__(local)
        except BaseException:
            self.abort()
            raise

    def _lay_out(self, entries: Sequence[Entry], shard_of: Sequence[int], shards: Iterable[int]) -> None:
        """The headers and data offsets of the shards this writer writes (``shards``, numbered as
        in :attr:`names`); entry ``i`` goes to shard ``shard_of[i]``. Also used by a rank that
        writes some shards of a folder written by several (:mod:`ckptavg.distributed`)."""
        self._shard_of = list(shard_of)
        self._headers: dict[int, bytes] = {}
        self._offset = [0] * len(entries)
        for k in shards:
            idx = [i for i, s in enumerate(self._shard_of) if s == k]
            head, offs = safetensors_header(self.dest, [entries[i] for i in idx], self.metadata)
            self._headers[k] = head
            for i, off in zip(idx, offs):
                self._offset[i] = off
        self._k = -1
        self._fd: int | None = None
        self._done = False

    # -- shard files

    def _shard_path(self, k: int) -> Path:
        return self.tmp / self.names[k]

    def _close_shard(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError as e:
                raise OutputError(f"{self.dest}: cannot finish writing {self.names[self._k]}: {e.strerror}") from None
            finally:
                os.close(fd)

    def _open_shard(self, k: int) -> None:
        if k == self._k:
            return
        self._close_shard()
        self._k = k
        try:
            self._fd = os.open(self._shard_path(k), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot create {self.names[k]}: {e.strerror}") from None
        self._write(memoryview(self._headers[k]))

    def _write(self, mv: memoryview) -> None:
        assert self._fd is not None
        try:
            while mv:
                n = os.write(self._fd, mv)
                mv = mv[n:]
        except OSError as e:
            raise OutputError(f"{self.dest}: write failed ({self.names[self._k]}): {e.strerror}") from None

    # -- _StreamWriter hooks

    def _begin(self, i: int) -> None:
        self._open_shard(self._shard_of[i])

    def _data(self, i: int, mv: memoryview) -> None:
        self._write(mv)

    def _alias(self, i: int, src: int) -> None:
        # one copy per name: re-read the source entry's bytes from its (maybe earlier) shard
        self._open_shard(self._shard_of[i])
        k = self._shard_of[src]
        n = self.entries[src].nbytes
        pos = len(self._headers[k]) + self._offset[src]
        chunk = 8 << 20
        buf = bytearray(min(n, chunk))
        try:
            rfd = os.open(self._shard_path(k), os.O_RDONLY)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot re-read {self.names[k]}: {e.strerror}") from None
        try:
            done = 0
            while done < n:
                m = min(chunk, n - done)
                got = os.preadv(rfd, [memoryview(buf)[:m]], pos + done)
                if got != m:
                    raise OutputError(f"{self.dest}: could not re-read written data of {self.entries[src].name!r}")
                self._write(memoryview(buf)[:m])
                done += m
        finally:
            os.close(rfd)
        self.bytes_written += n

    # -- finishing

    def report(self) -> dict[str, Any]:
        """Details for the merge report: shard files, copied files and a summary note."""
        n = len(self.names)
        if self.part is not None:
            world = self.part.world
            note = f"{n} shard{'s' if n != 1 else ''} written by {world} rank{'s' if world != 1 else ''}"
            return {"shards": list(self.names), "rank_of_shard": list(self.layout.shard_rank),
                    "output_notes": [note]}
        note = f"{n} shard{'s' if n != 1 else ''}"
        if self.copied:
            note += f"; copied {', '.join(self.copied)} from {self.copy_source}"
        elif self.copy_source is None:
            note += "; no input is a model folder, so no config or tokenizer files were copied"
        return {"shards": list(self.names), "copied_files": list(self.copied),
                "copied_from": os.fspath(self.copy_source) if self.copy_source else None, "output_notes": [note]}

    def _write_index(self) -> None:
        if len(self.names) <= 1:
            return
        meta: dict[str, Any] = {"total_size": self.total_size, "total_parameters": self.total_parameters}
        meta.update({k: v for k, v in self.metadata.items() if k != "format"})
        index = {"metadata": meta, "weight_map": self.weight_map}
        (self.tmp / self.index_name).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        fsync_path(self.tmp / self.index_name)

    def _copy_extras(self) -> None:
        for name, src in self.copy_files:
            target = self.tmp / name
            try:
                copy_file(src, target, self._new_config if name == "config.json" else None)
            except OSError as e:
                raise OutputError(f"{self.dest}: cannot copy {src}: {e.strerror}") from None
            fsync_path(target)
            self.copied.append(name)

    def _new_config(self, data: bytes) -> bytes | None:
        """``config.json`` with ``torch_dtype``/``dtype`` set to the output dtype and, from dequantized
        float8 inputs, without ``quantization_config`` (None: keep it as it is)."""
        if self.config_dtype is None and not self.dequantized:
            return None
        try:
            cfg = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(cfg, dict):
            return None
        changed = False
        if self.dequantized and "quantization_config" in cfg:
            del cfg["quantization_config"]
            changed = True
        dtype = self.config_dtype if self.config_dtype is not None else (torch.float32 if self.dequantized else None)
        for key in ("torch_dtype", "dtype"):
            if dtype is not None and key in cfg:
                cfg[key] = str(dtype).removeprefix("torch.")
                changed = True
        if not changed:
            return None
        return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def _publish(self) -> None:
        """Rename the finished folder into place. Called with SIGINT/SIGTERM blocked (see
        :meth:`commit`); see :func:`~ckptavg.io.files.publish_folder`."""
        publish_folder(self.tmp, self.dest, self.mode)
        self._done = True  # published: from here on nothing may undo it

    def finish(self) -> None:
        """Close this writer's last shard (writing the shards of empty tensors only) and, on rank 0,
        write the index and copy the model files: the folder is complete but not published."""
        self._check_complete()
        for k in self._mine:
            if not self._shard_path(k).exists():
                self._open_shard(k)  # a shard of empty tensors only (or of no tensor at all)
        self._close_shard()
        if self.rank == 0:
            self._write_index()
            self._copy_extras()

    def commit(self) -> None:
        """Finish the last shard, write the index, copy the model files and rename into place."""
        try:
            self.finish()
            with signals_blocked():
                try:
                    self._publish()
                except OSError as e:
                    raise OutputError(
                        f"{self.dest}: cannot move the finished folder into place: {e.strerror}"
                    ) from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Remove the temporary folder (a rank's part: only its own shards, the folder is its
        creator's); the destination is left as it was. A second Ctrl-C during the cleanup waits
        until it is done (signals are blocked meanwhile)."""
        if self._done:
            return
        self._done = True
        with signals_blocked():
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = None
            if self.part is not None:
                for k in self._mine:
                    try:
                        self._shard_path(k).unlink()
                    except OSError:
                        pass
                return
            tmp = getattr(self, "tmp", None)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            remove_created(self._created)


_CONFIG_LIMIT = 64 << 20  # a config.json larger than this is copied as it is


def copy_file(src: Path, target: Path, rewrite: Callable[[bytes], bytes | None] | None = None) -> None:
    """Copy the regular file ``src`` to the new file ``target`` (``rewrite`` may replace the bytes
    of a small file), giving ``target`` at most ``src``'s permission bits, under the umask: a
    0600 file stays 0600. ``src`` is opened without following a symlink and must be a regular
    file when opened. Raises ``OSError``.

    Example::

        copy_file(Path("ft1/tokenizer.json"), Path(".soup.tmp/tokenizer.json"))
    """
    if is_remote(src):  # a file of an input folder behind a URL: no permissions to keep
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with src.open("rb") as fh:
                if rewrite is not None and src.stat().st_size <= _CONFIG_LIMIT:
                    raw = fh.read()
                    _write_all(fd, rewrite(raw) or raw)
                    return
                while chunk := fh.read(1 << 20):
                    _write_all(fd, chunk)
        finally:
            os.close(fd)
        return
    sfd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        mode = stat.S_IMODE(st.st_mode) & 0o777
        dfd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the umask applies
        try:
            os.fchmod(dfd, mode & ~umask())
            data = None
            if rewrite is not None and st.st_size <= _CONFIG_LIMIT:
                data = rewrite(os.pread(sfd, st.st_size, 0))
            if data is not None:
                _write_all(dfd, data)
            else:
                while chunk := os.read(sfd, 1 << 20):
                    _write_all(dfd, chunk)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]


def check_storable(dest: Path, entries: Sequence[Entry]) -> None:
    """Refuse, before anything is written, a tensor whose dtype safetensors cannot store."""
    for e in entries:
        if e.dtype not in TORCH_TO_SAFETENSORS:
            raise OutputError(f"{dest}: tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot store")


class HFFolderKind(OutputKind):
    """``-o DIR/``: a Hugging Face model folder of sharded safetensors (see the module docstring)."""

    name = "hf-folder"
    single_file = False
    options = frozenset({"shard_size"})
    parts = True

    def matches(self, path: str) -> bool:
        return is_folder_output(path)

    def check_destination(self, dest: Path) -> str:
        return check_destination(dest)

    def check_entries(self, dest: Path, entries: Sequence[Entry]) -> None:
        check_storable(dest, entries)

    def notes(self, dest: Path, objects: Sequence[Any], keep_structure: bool) -> list[str]:
        name = os.fspath(dest)
        if name.endswith(("/", os.sep)) or dest.is_dir():
            return []
        return [f"{dest}: no file extension, so the output is a Hugging Face model folder (sharded safetensors); "
                "for one file, end the name in .safetensors or .pt"]

    def _options(self, setup: OutputSetup) -> dict[str, Any]:
        # the last model folder (or diffusers component folder) gives the copied files and the file names
        source, fmt = next(((p, f) for p, f in reversed(setup.sources) if f in ("hf-folder", "diffusers")),
                           (None, "hf-folder"))
        size = DEFAULT_SHARD_SIZE if setup.shard_size is None else setup.shard_size
        return {"shard_size": size, "copy_source": source, "config_dtype": setup.dtype, "stem": weights_stem(fmt),
                "dequantized": any(getattr(c, "dequantized", False) for c in setup.checkpoints)}

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> ShardedSafetensorsWriter:
        return ShardedSafetensorsWriter(dest, entries, metadata, **self._options(setup))

    def open_part(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup,
                  part: RankPart) -> ShardedSafetensorsWriter:
        return ShardedSafetensorsWriter(dest, entries, metadata, part=part, **self._options(setup))


KIND = HFFolderKind()

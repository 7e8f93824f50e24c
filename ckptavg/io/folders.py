"""Folder outputs: which files of an existing output folder ckptavg wrote, publishing a finished
folder (an atomic exchange where the OS has one), and recovering from a replacement that was
killed half-way.

**Files a user added to an earlier output folder are never deleted.** An earlier ckptavg output
is replaced only if every entry in it is a regular file ckptavg wrote there: for a Hugging Face
folder the names its provenance lists (``ckptavg_files`` in the index's metadata or the weights'
safetensors header: shards, index, copied config and tokenizer files; an output written before
that list existed: its weight files and index only), for a DCP folder ``.metadata``,
``ckptavg.json`` and ``__R_N.distcp``. Anything else (eval results, notes, a sub-folder, a
symlink) makes the merge fail before anything is read, with a one-line error naming the folder
and the first such entry; move it out of the folder (or choose another output folder) to
proceed. The check is repeated just before the old folder is swapped out (a folder that is no
longer an earlier ckptavg output by then is left as it is, and the merge fails).

**Replacing** a folder renames the finished temporary folder to ``.NAME.XXXXXXXX.ckptavg-new``,
then on Linux exchanges it with the destination in one ``renameat2(RENAME_EXCHANGE)`` call, so
the destination always exists and is always complete, and removes the old folder. Where the OS
or the file system has no exchange (not Linux, or ``EINVAL``/``ENOSYS``), the old folder is
renamed to ``.NAME.XXXXXXXX.ckptavg-old`` and the new one renamed in: a process killed between
those two renames leaves no destination.

**Leftovers of a killed replacement** (``.NAME.XXXXXXXX.ckptavg-new`` / ``-old`` beside the
destination) are dealt with by the next run that writes the same destination, before it reads
anything: when the destination is missing, the newest ``-old`` folder (the last output that was
complete and published) is renamed back to it; every other such leftover is removed (it is either
the old output already replaced, or a new one whose run never reported success). A note on
stderr says what was done. Temporary folders of a run killed while writing
(``.NAME.XXXXXXXX.ckptavg-tmp``) are not touched: another run may be writing there.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import shutil
import stat
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..errors import CkptavgWarning, OutputError
from .files import PUBLISHED, fsync_path, read_small_json, umask

__all__ = ["FILES_KEY", "INDEX_NAME", "SINGLE_NAME", "earlier_output", "foreign_entry", "owned", "check_replaceable",
           "recover_leftovers", "exchange", "publish_folder"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: the index and single-file names of folder outputs: Hugging Face's, then diffusers' (component folders)
_INDEX_NAMES = (INDEX_NAME, "diffusion_pytorch_model.safetensors.index.json")
_SINGLE_NAMES = (SINGLE_NAME, "diffusion_pytorch_model.safetensors", "adapter_model.safetensors")
#: metadata key (index and safetensors header) listing the files ckptavg wrote into a folder (JSON list)
FILES_KEY = "ckptavg_files"
PROVENANCE_NAME = "ckptavg.json"
_SHARD_RE = re.compile(r"^(?:model|diffusion_pytorch_model)-\d{5}-of-\d{5}\.safetensors$")
_DCP_OWN_RE = re.compile(r"^(\.metadata|ckptavg\.json|__\d+_\d+\.distcp)$")
# a Megatron checkpoint root (ckptavg.io.megatron): the marker, one iteration folder and what it holds
_MEGATRON_MARKER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_\d{7,}$")
_MEGATRON_OWN_RE = re.compile(r"^(\.metadata|ckptavg\.json|__\d+_\d+\.distcp|metadata\.json|common\.pt)$")
_MAX_HEADER = 100 * 1024 * 1024
_MAX_PROVENANCE = 64 << 20  # ckptavg.json: the merge's provenance (its inputs listed)


def _header_metadata(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as fh:  # (a method call: the path may be a URL's)
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER:
            return None
        header = json.loads(fh.read(n).decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _hf_metadata(folder: Path) -> dict[str, Any] | None:
    """The provenance of a Hugging Face folder ckptavg wrote (index metadata, else the single file's
    or the first shard's safetensors header), or None if it has none of ckptavg's."""
    idx = next((folder / n for n in _INDEX_NAMES if (folder / n).is_file()), None)
    if idx is not None:
        data = json.loads(idx.read_text(encoding="utf-8"))
        meta = data.get("metadata") if isinstance(data, dict) else None
    else:
        # model.safetensors, a diffusers component's or an adapter folder's weights
        single = next((folder / n for n in _SINGLE_NAMES if (folder / n).is_file()), folder / SINGLE_NAME)
        if not single.is_file():
            names = sorted(q.name for q in folder.iterdir())
            if not names or not all(_SHARD_RE.match(n) for n in names):
                return None
            single = folder / names[0]
        meta = _header_metadata(single)
    return meta if isinstance(meta, dict) and "ckptavg_version" in meta else None


def earlier_output(folder: Path) -> frozenset[str] | None:
    """If ``folder`` is an earlier ckptavg output (Hugging Face or DCP folder), the names of the
    entries ckptavg wrote there; else None.

    Example::

        earlier_output(Path("soup"))  # frozenset({'model.safetensors', 'config.json', ...}) or None
    """
    try:
        if (folder / _MEGATRON_MARKER).is_file():
            return _megatron_root_output(folder)
        if (folder / ".metadata").is_file() and (folder / PROVENANCE_NAME).is_file():
            prov = read_small_json(folder / PROVENANCE_NAME, _MAX_PROVENANCE)
            if isinstance(prov, dict) and "ckptavg_version" in prov:
                return frozenset(q.name for q in folder.iterdir() if _DCP_OWN_RE.match(q.name))
        meta = _hf_metadata(folder)
        if meta is None:
            return None
        listed = meta.get(FILES_KEY)
        names = json.loads(listed) if isinstance(listed, str) else None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return frozenset(names)
        # written before ckptavg listed its files: its weight files and index only
        return frozenset(q.name for q in folder.iterdir()
                         if q.name in _SINGLE_NAMES[:2] + _INDEX_NAMES or _SHARD_RE.match(q.name))
    except (OSError, ValueError, struct.error, UnicodeDecodeError, RecursionError):
        return None


def _megatron_root_output(folder: Path) -> frozenset[str] | None:
    """A Megatron checkpoint root ckptavg wrote: the marker and one ``iter_XXXXXXX/`` folder holding
    ckptavg's provenance (its files are checked by :func:`foreign_entry`)."""
    subs = [q for q in folder.iterdir() if q.name != _MEGATRON_MARKER]
    if len(subs) != 1 or not _ITER_RE.match(subs[0].name):
        return None
    prov = read_small_json(subs[0] / PROVENANCE_NAME, _MAX_PROVENANCE)
    if not (isinstance(prov, dict) and "ckptavg_version" in prov):
        return None
    return frozenset({_MEGATRON_MARKER, subs[0].name})


def owned(own: frozenset[str], rel: str) -> bool:
    """Whether the file at ``rel`` (a path relative to an earlier output, ``/``-separated: an object
    store's listing) is one ckptavg wrote, given :func:`earlier_output`'s names."""
    head, _, rest = rel.partition("/")
    if not rest:
        return rel in own
    return head in own and bool(_ITER_RE.match(head)) and bool(_MEGATRON_OWN_RE.match(rest))


def foreign_entry(folder: Path, own: frozenset[str]) -> str | None:
    """The first entry (in name order) of ``folder`` that is not a regular file named in ``own``
    (in a Megatron root ckptavg wrote, its ``iter_XXXXXXX/`` folder, holding only files ckptavg writes)."""
    for name in sorted(os.listdir(folder)):
        if name not in own:
            return name
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode) and _ITER_RE.match(name):
            inner = sorted(os.listdir(folder / name))
            bad = next((n for n in inner if not _MEGATRON_OWN_RE.match(n)), None)
            bad = bad or foreign_entry(folder / name, frozenset(inner))
            if bad is not None:
                return f"{name}/{bad}"
        elif not stat.S_ISREG(mode):
            return name
    return None


def check_replaceable(dest: Path) -> bool:
    """Whether ``dest`` (an existing, non-empty folder) is an earlier ckptavg output holding only
    files ckptavg wrote; False if it is not a ckptavg output at all. An earlier output that also
    holds another entry raises :class:`~ckptavg.errors.OutputError` naming it.

    Example::

        check_replaceable(Path("soup"))  # True: replace it; False: not ckptavg's
    """
    own = earlier_output(dest)
    if own is None:
        return False
    try:
        extra = foreign_entry(dest, own)
    except OSError as e:
        raise OutputError(f"{dest}: cannot list the output folder: {e.strerror}") from None
    if extra is not None:
        raise OutputError(
            f"{dest}: the folder is an earlier ckptavg output but also holds {extra!r}, not one of the files ckptavg "
            "wrote there (replacing the folder would delete it): move it out of the folder, or choose another output "
            "folder"
        )
    return True


def _leftover_re(dest: Path) -> re.Pattern[str]:
    return re.compile(r"^\." + re.escape(dest.name) + r"\.[a-z0-9_]{8}\.ckptavg-(new|old)$")


def recover_leftovers(dest: Path) -> list[str]:
    """Put right what a replacement of ``dest`` killed half-way left beside it (see the module
    docstring): restore the newest ``-old`` folder when ``dest`` is missing, remove the other
    leftovers. Returns (and warns with) one note per action.

    Example::

        recover_leftovers(Path("soup"))  # [] when nothing was left behind
    """
    parent = dest.parent
    pattern = _leftover_re(dest)
    try:
        names = [n for n in os.listdir(parent) if pattern.match(n)]
    except OSError:
        return []
    found: list[tuple[float, str, Path]] = []
    for n in names:
        try:
            st = os.lstat(parent / n)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.append((st.st_mtime, n, parent / n))
    notes: list[str] = []
    if not os.path.lexists(dest):
        olds = sorted(f for f in found if f[1].endswith("-old"))
        if olds:
            _, _, back = olds[-1]
            try:
                os.rename(back, dest)
                notes.append(f"{dest}: restored the earlier output from {back.name}, left by a replacement that "
                             "was interrupted")
                found.remove(olds[-1])
            except OSError as e:
                notes.append(f"{dest}: could not restore the earlier output from {back}: {e.strerror}")
                found = []
    for _, n, path in found:
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"{dest}: removed {n}, left beside it by a replacement that was interrupted")
    for note in notes:
        warnings.warn(note, CkptavgWarning, stacklevel=2)
    return notes


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276}


def _load_renameat2() -> Any:
    """A callable ``(olddirfd, old, newdirfd, new, flags) -> int`` for Linux ``renameat2``: libc's
    (glibc 2.28+), else the raw system call; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = _SYSCALL_RENAMEAT2.get(platform.machine())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long

    def call(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> int:
        return int(syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(old),
                           ctypes.c_int(newdirfd), ctypes.c_char_p(new), ctypes.c_uint(flags)))

    return call


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` (both must exist) in one atomic step; False, with nothing
    changed, where the OS or the file system has no such call. Raises ``OSError`` otherwise.

    Example::

        if not exchange(Path(".soup.x.ckptavg-new"), Path("soup")):
            ...  # fall back to two renames
    """
    fn = _renameat2
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _step(point: str) -> None:
    """Called between the steps of a replacement (``"exchanged"``, ``"moved-aside"``); does nothing
    (tests stop a process here)."""


def _settle_modes(tmp: Path) -> None:
    """The folder gets the umask's mode; its files keep theirs, the umask applied (never widened:
    a copied file that was 0600 stays 0600)."""
    mask = umask()
    os.chmod(tmp, 0o777 & ~mask)
    for q in tmp.iterdir():
        st = os.lstat(q)
        if stat.S_ISREG(st.st_mode):
            mode = stat.S_IMODE(st.st_mode) & 0o777 & ~mask
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(q, mode)


def _sibling(dest: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".ckptavg-{kind}", dir=dest.parent))


def _empty_folder(path: Path) -> bool:
    try:
        return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    except OSError:
        return False


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _replace(tmp: Path, dest: Path) -> None:
    own = earlier_output(dest)
    if own is None:  # replaced by another folder since it was checked
        raise OutputError(f"{dest}: the folder changed since it was checked and is no longer an earlier ckptavg "
                          "output; it was left as it is")
    extra = foreign_entry(dest, own)
    if extra is not None:  # added since the destination was checked
        raise OutputError(f"{dest}: the folder now also holds {extra!r}, not one of the files ckptavg wrote there "
                          "(replacing the folder would delete it): move it out of the folder, or choose another "
                          "output folder")
    new = _sibling(dest, "new")
    try:
        os.rename(tmp, new)  # onto the empty folder just made: a complete output, recognisably named
    except BaseException:
        _rmdir_quietly(new)
        raise
    try:
        if exchange(new, dest):
            _step("exchanged")
        else:
            old = _sibling(dest, "old")
            try:
                os.rename(dest, old)
            except BaseException:
                _rmdir_quietly(old)  # still the empty folder just made
                raise
            _step("moved-aside")
            try:
                os.rename(new, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            new = old
    except BaseException:
        try:
            os.rename(new, tmp)  # the caller's clean-up removes it
        except OSError:
            shutil.rmtree(new, ignore_errors=True)
        raise
    fsync_path(dest.parent, directory=True)
    shutil.rmtree(new, ignore_errors=True)  # the old output


def publish_folder(tmp: Path, dest: Path, mode: str) -> None:
    """Rename the finished folder ``tmp`` to ``dest``: ``mode="replace"`` swaps out an earlier
    output (see the module docstring: an atomic exchange where the OS has one; the old folder is
    then removed), else ``dest`` must be absent or empty. Raises ``OSError`` (``OutputError`` if
    a file ckptavg did not write appeared in the folder being replaced). Call it with signals
    blocked (:func:`~ckptavg.io.files.signals_blocked`); any exception leaves ``dest`` as it was.

    Example::

        with signals_blocked():
            publish_folder(Path(".soup.abcd1234.ckptavg-tmp"), Path("soup"), "replace")
    """
    _settle_modes(tmp)
    fsync_path(tmp, directory=True)
    if mode == "replace" and os.path.lexists(dest) and not _empty_folder(dest):
        _replace(tmp, dest)
    else:
        os.rename(tmp, dest)  # replaces an empty folder; fails if one with files appeared
    PUBLISHED.append(dest)
    fsync_path(dest.parent, directory=True)

"""Files: positioned reads of inputs, and atomic outputs (a file or a folder).

Inputs are read with ``pread`` at known offsets into caller buffers, never memory-mapped:
mapping N inputs and touching them puts N x the model size of file-backed pages into the
process's RSS, and a file truncated during a merge would kill a mapping reader with SIGBUS.

Outputs are written under a hidden temporary name beside the destination, fsynced and
renamed into place only when complete; on any failure the temporary is removed and an
existing destination is left untouched. Publishing a folder output, and what happens to an
earlier output folder it replaces: :mod:`ckptavg.io.folders`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointReadError, OptionError, OutputError

__all__ = ["CHECKPOINT_SUFFIXES", "InputFile", "input_file", "read_small_json", "AtomicFile", "tensor_memoryview",
           "fsync_path", "umask", "make_parent", "remove_created", "signals_blocked", "TMP_SUFFIX", "PUBLISHED"]

#: suffix of every temporary output (file or folder) ckptavg creates
TMP_SUFFIX = ".ckptavg-tmp"
#: every output this process has renamed into place, in order: an interrupt that arrives after
#: one was published must not be reported as "nothing was written" (the CLI reads this)
PUBLISHED: list[Path] = []
#: file extensions of checkpoint files (inputs found in folders; single-file outputs)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pth.tar", ".tar")


_OPEN_LOCK = threading.Lock()


class InputFile:
    """A file opened lazily for positioned reads (``pread``), shared by its tensors. It remembers
    the file's identity as it was planned (:attr:`stamp`), so that a merge can tell, before it
    publishes, whether the file was rewritten or replaced meanwhile (:meth:`changed`)."""

    __slots__ = ("path", "size", "_fd", "stamp")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd: int | None = None
        self.stamp = file_stamp(path)

    def changed(self) -> bool:
        """Whether the file at :attr:`path` is no longer the one that was planned: another file
        (device, inode), another size, or written since (modification or change time)."""
        return file_stamp(self.path) != self.stamp

    def fd(self) -> int:
        if self._fd is not None:
            return self._fd
        with _OPEN_LOCK:  # the engine's workers may reach a file at the same time
            if self._fd is not None:
                return self._fd
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointReadError(f"{self.path}: cannot open: {e.strerror}") from None
            if hasattr(os, "posix_fadvise"):
                try:  # tensors are read front to back: a larger read-ahead window
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass
            return self._fd

    def advise_willneed(self, offset: int, n: int) -> None:
        """Ask the kernel to start reading ``n`` bytes at ``offset`` in the background."""
        if n > 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd(), offset, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def preadv_into(self, bufs: list[memoryview], offset: int) -> None:
        """Fill the buffers, in order, with the consecutive bytes at ``offset`` (one ``preadv``
        call for many buffers); a short file is a read error."""
        self._read(bufs, offset)

    def _read(self, bufs: list[memoryview], offset: int) -> None:
        fd = self.fd()
        bufs = [b for b in bufs if len(b)]  # an empty buffer would read as a short file
        want = sum(len(b) for b in bufs)
        got = 0
        k = 0
        while k < len(bufs):
            batch = bufs[k : k + 512]
            try:
                n = os.preadv(fd, batch, offset + got)
            except OSError as e:
                raise CheckpointReadError(f"{self.path}: read failed: {e.strerror}") from None
            if n <= 0:
                raise CheckpointReadError(
                    f"{self.path}: file ended early (truncated?): needed bytes up to "
                    f"{offset + want}, file has {offset + got}"
                )
            got += n
            # skip the buffers filled completely; continue inside a partly filled one
            while n and k < len(bufs):
                if n >= len(bufs[k]):
                    n -= len(bufs[k])
                    k += 1
                else:
                    bufs[k] = bufs[k][n:]
                    n = 0
            while k < len(bufs) and not len(bufs[k]):
                k += 1

    def pread_into(self, mv: memoryview, offset: int) -> None:
        """Fill ``mv`` with the bytes at ``offset``; a short file is a read error."""
        self._read([mv], offset)

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def open_stream(self, buffering: int = -1) -> Any:
        """The file as a seekable binary file object (for parsers that read a stream: ``zipfile``,
        ``torch.load``); close it after use."""
        return open(self.path, "rb", buffering=buffering)  # noqa: SIM115 (the caller closes it)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def input_file(path: Path, size: int) -> InputFile:
    """The :class:`InputFile` of a local path, or the range-reading one of a URL
    (:class:`~ckptavg.io.remote_in.RemoteInputFile`)."""
    from .urls import is_remote

    if is_remote(path):
        from .remote_in import RemoteInputFile

        return RemoteInputFile(path, size)
    return InputFile(path, size)


def read_small_json(path: Path, limit: int) -> Any:
    """A small JSON file (a sidecar: a config, an index), its size checked against ``limit`` before
    it is read. Raises ``OSError``, ``ValueError`` (``"larger than N MiB"``, invalid JSON or UTF-8)
    or ``RecursionError``; the caller words the error.

    Example::

        cfg = read_small_json(Path("adapter/adapter_config.json"), 1 << 20)
    """
    if path.stat().st_size > limit:
        raise ValueError(f"larger than {limit >> 20} MiB")
    return json.loads(path.read_text(encoding="utf-8"))


def file_stamp(path: Path) -> tuple[Any, ...] | None:
    """What identifies a file's content without reading it: device, inode, size, and the
    modification and change times in nanoseconds (an in-place rewrite changes the times even when
    the size stays; a replacement changes the inode); for a URL, the size, ETag (or generation)
    and modification time the store reports. None when it cannot be stat'ed."""
    from .urls import is_remote

    if is_remote(path):
        from .remote_in import remote_stamp

        return remote_stamp(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's memory (keep ``t`` alive while used)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_memoryview needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def umask() -> int:
    """The process's umask (read without changing it for long)."""
    m = os.umask(0)
    os.umask(m)
    return m


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file or a folder by path (best effort for folders: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def make_parent(dest: Path) -> list[Path]:
    """Create ``dest``'s missing parent folders; returns those created (outermost first),
    so that a failed write can remove them again."""
    parent = dest.parent
    missing: list[Path] = []
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise OutputError(f"{dest}: cannot create the output folder: {anc} is a file")
            break
        missing.append(anc)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{dest}: cannot create the output folder {parent}: {e.strerror}") from None
    return list(reversed(missing))


def remove_created(folders: list[Path]) -> None:
    """Remove folders :func:`make_parent` created, innermost first, if they are still empty."""
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            break


_DEFERRED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM while the block runs; one that arrives meanwhile is
    delivered (Ctrl-C raises) when it ends. For steps that must not be cut in two: a rename
    pair, removing a temporary output. In the main thread the Python handlers are swapped
    for ones that only record the signal (a signal mask would not do: torch's threads would
    take the signal); elsewhere the thread's signal mask is used.

    >>> with signals_blocked():
    ...     pass  # os.rename(a, b); os.rename(c, a)
    """
    if threading.current_thread() is not threading.main_thread():
        if not hasattr(signal, "pthread_sigmask"):
            yield
            return
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(_DEFERRED))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        return
    caught: list[int] = []
    previous = {}
    for sig in _DEFERRED:
        previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


#: write buffer of an output file (small tensors are gathered into writes of this size)
_WRITE_BUFFER = 1 << 20
#: an output file starts writing back to disk every this many bytes (Linux sync_file_range)
FLUSH_EVERY = 32 << 20
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE
_SFR_WAIT_ALL = 7  # WAIT_BEFORE | WRITE | WAIT_AFTER


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None. Python's os module does not offer it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class AtomicFile:
    """A temporary file beside ``dest`` that becomes ``dest`` on :meth:`commit`."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        if self.dest.is_dir():
            raise OutputError(f"{self.dest}: is a folder; give a file name ending in .pt or .safetensors")
        self._created = make_parent(self.dest)
        parent = self.dest.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=TMP_SUFFIX, dir=parent)
        except OSError as e:
            remove_created(self._created)
            raise OutputError(f"{self.dest}: cannot write in {parent}: {e.strerror}") from None
        self.tmp = Path(tmp)
        # Buffered: many small tensors become few system calls; large writes go straight through.
        self.file = os.fdopen(fd, "w+b", buffering=_WRITE_BUFFER)
        self._fd = fd
        self._flushed = 0  # bytes handed to writeback (sync_file_range) so far
        self._waited = 0  # bytes known to be on disk
        self._pending = 0  # bytes written since the last write-behind
        self._done = False

    def write(self, data: Any) -> None:
        """Append bytes; every ``FLUSH_EVERY`` bytes, start writing them back to disk and wait for
        the previous batch, so dirty pages never pile up and the final fsync has little to do."""
        try:
            mv = memoryview(data).cast("B")
            self._pending += len(mv)
            while mv:
                n = self.file.write(mv)
                mv = mv[n:]
        except OSError as e:
            raise OutputError(f"{self.dest}: write failed: {e.strerror}") from None
        if self._pending >= FLUSH_EVERY and _sync_file_range is not None:
            self._pending = 0
            self._write_behind()

    def flush(self) -> None:
        """Hand buffered bytes to the kernel (before reading the file back)."""
        try:
            self.file.flush()
        except OSError as e:
            raise OutputError(f"{self.dest}: write failed: {e.strerror}") from None

    def _write_behind(self) -> None:
        global _sync_file_range
        self.flush()
        pos = os.lseek(self._fd, 0, os.SEEK_CUR)
        fn = _sync_file_range
        if fn is None or pos <= self._flushed:
            return
        # start writeback of the new range; wait for the range started last time
        if fn(self._fd, self._flushed, pos - self._flushed, _SFR_WRITE) != 0 or (
                self._flushed > self._waited and
                fn(self._fd, self._waited, self._flushed - self._waited, _SFR_WAIT_ALL) != 0):
            _sync_file_range = None  # not supported here (some file systems): fsync does it all at the end
            return
        if self._flushed > self._waited and hasattr(os, "posix_fadvise"):
            # Those pages are on disk now: drop them from the page cache. The output is not read
            # again, so caching it would only evict other data; and the next writes reuse the
            # freed pages instead of taking fresh memory (measured here: writing 512 MiB took
            # 0.2-0.25 s this way, against 0.26-0.36 s keeping them and 0.4-1.9 s for a plain write).
            try:
                os.posix_fadvise(self._fd, self._waited, self._flushed - self._waited, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        self._waited = self._flushed
        self._flushed = pos

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~umask())
            os.replace(self.tmp, self.dest)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.dest}: cannot finish writing: {e.strerror}") from None
        self._done = True
        PUBLISHED.append(self.dest)
        fsync_path(self.dest.parent, directory=True)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with signals_blocked():  # a second Ctrl-C must not leave the temporary file behind
            try:
                self.file.close()
            except OSError:
                pass
            try:
                self.tmp.unlink()
            except OSError:
                pass
            remove_created(self._created)


def check_not_input(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output path that is also one of the inputs (the same path, or the same file
    through another name), or that holds an input (a folder output replacing a folder with an
    input inside, which the replacement would delete), before anything is read or written.

    Example::

        check_not_input(Path("swa.pt"), [Path("runs/a.pt"), Path("runs/b.pt")])  # passes
    """
    out_res = output.resolve()
    for p in inputs:
        same = False
        try:
            same = output.exists() and os.path.samefile(output, p)
        except OSError:
            same = False
        if same or p.resolve() == out_res:
            raise OptionError(f"{output}: the output is also an input; choose another output path")
        if out_res in p.resolve().parents:
            raise OptionError(f"{output}: the output would replace a folder that holds the input {p}; choose another "
                              "output path")


def write_atomically(path: Path, write: Callable[[str], None], what: str = "the output") -> None:
    """Publish a file that a library writes by name (``write(tmp_name)``: ``torch.save``,
    safetensors' ``save_file``): written to a temporary sibling, fsynced, renamed into place; on
    any failure the temporary file is removed and ``path`` is left as it was.

    Example::

        write_atomically(Path("ema.pt"), lambda name: torch.save(obj, name), "the snapshot")
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    except OSError as e:
        _unlink_quietly(tmp)
        raise OutputError(f"{path}: cannot write {what} ({e.strerror or e})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

"""Reading checkpoints behind URLs by byte range, several ranges in flight at once.

A :class:`RemoteInputFile` is an :class:`~ckptavg.io.files.InputFile` whose positioned reads are
range requests: a read is split into ranges of at most ``range_bytes`` (8 MiB by default), fetched
by a pool of ``max_requests`` threads shared by every file of the process (16 by default), each
range copied straight into the caller's buffer. Memory is therefore bounded by the ranges in flight
(``max_requests x range_bytes``), whatever the number and size of the checkpoints; nothing ever
downloads a whole file.

Transient failures (timeouts, dropped connections, 5xx, throttling) are retried with exponential
backoff ``retries`` times (5 by default); a missing object, a refused permission or a persistent
failure is a one-line :class:`~ckptavg.errors.CheckpointReadError` naming the URL. Each file's
identity (size, ETag or generation, modification time) is recorded when it is planned and asked
for again before anything is published (:meth:`InputFile.changed`), so an object replaced during
a merge fails it instead of mixing two versions.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from ..errors import CheckpointReadError
from .files import InputFile
from .remote_path import retried
from .urls import CONFIG

__all__ = ["RemoteInputFile", "remote_stamp", "reset_pool", "fetch_range"]

_POOL_LOCK = threading.Lock()
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=CONFIG.max_requests, thread_name_prefix="ckptavg-range"))
        return _POOL[0]


def reset_pool() -> None:
    """Forget the range-request pool (after :func:`~ckptavg.io.urls.configure`); the next read makes one."""
    with _POOL_LOCK:
        old = _POOL[:]
        _POOL.clear()
    for p in old:
        p.shutdown(wait=False)


def remote_stamp(path: Any) -> tuple[Any, ...] | None:
    """A URL's identity as the store reports it now (size, ETag/generation/version, modification
    time); None when it cannot be asked."""
    try:
        info = path.info(refresh=True)
    except CheckpointReadError:
        return None
    if info is None:
        return None
    st = path.stat()
    return (st.st_size, st.etag, st.st_mtime_ns)


def fetch_range(path: Any, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object at ``path`` (a RemotePath), retried with backoff."""
    fs, key = path.fs, path.key
    try:
        data = retried(lambda: fs.cat_file(key, start=start, end=end), f"{path}: reading bytes {start}-{end}")
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: reading bytes {start}-{end}: the object is gone") from None
    if len(data) != end - start:
        raise CheckpointReadError(
            f"{path}: object ended early (replaced or truncated?): asked for bytes {start}-{end}, got {len(data)}")
    return data if isinstance(data, bytes) else bytes(data)


class RemoteInputFile(InputFile):
    """An :class:`~ckptavg.io.files.InputFile` behind a URL: the same reads, as range requests."""

    __slots__ = ()

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd = None
        self.stamp = remote_stamp(path)

    def changed(self) -> bool:
        return remote_stamp(self.path) != self.stamp

    def fd(self) -> int:
        raise CheckpointReadError(f"{self.path}: a URL has no file descriptor")

    def advise_willneed(self, offset: int, n: int) -> None:
        """Nothing to advise: ranges are fetched when asked for."""

    def _read(self, bufs: list[memoryview], offset: int) -> None:
        bufs = [b for b in bufs if len(b)]
        want = sum(len(b) for b in bufs)
        if want == 0:
            return
        if offset + want > self.size:
            raise CheckpointReadError(
                f"{self.path}: file ended early (truncated?): needed bytes up to {offset + want}, "
                f"file has {self.size}")
        step = CONFIG.range_bytes
        if want <= step:
            self._scatter(bufs, 0, fetch_range(self.path, offset, offset + want))
            return
        pool = _pool()
        futures: list[Future[None]] = []
        try:
            for lo in range(0, want, step):
                hi = min(lo + step, want)
                futures.append(pool.submit(self._fetch_into, bufs, lo, offset + lo, offset + hi))
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    f.exception()  # wait: no range may still write into a buffer after we return

    def _fetch_into(self, bufs: list[memoryview], lo: int, start: int, end: int) -> None:
        self._scatter(bufs, lo, fetch_range(self.path, start, end))

    @staticmethod
    def _scatter(bufs: list[memoryview], lo: int, data: bytes) -> None:
        """Copy ``data`` (bytes ``lo..`` of the concatenated buffers) into the buffers it covers."""
        src = memoryview(data)
        pos = 0
        for b in bufs:
            n = len(b)
            if pos + n <= lo:
                pos += n
                continue
            a = max(lo - pos, 0)
            take = min(n - a, len(src))
            b[a : a + take] = src[:take]
            src = src[take:]
            pos += n
            if not len(src):
                break

    def open_stream(self, buffering: int = -1) -> Any:
        """A seekable binary file of the object, read by range through a 1 MiB buffer."""
        return io.BufferedReader(cast(Any, _RangeRaw(self)), buffer_size=1 << 20)

    def close(self) -> None:
        """Nothing held open."""


class _RangeRaw(io.RawIOBase):
    """A raw, seekable view of a remote file, each ``readinto`` one range read."""

    def __init__(self, f: RemoteInputFile) -> None:
        self.f = f
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.f.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self.f.size - self.pos)
        if n <= 0:
            return 0
        self.f.pread_into(mv[:n], self.pos)
        self.pos += n
        return n

"""Reading checkpoints behind URLs by byte range, several ranges in flight at once.

A :class:`RemoteInputFile` is an :class:`~ckptavg.io.files.InputFile` whose positioned reads are
range requests: a read is split into ranges of at most ``range_bytes`` (4 MiB by default), fetched
by a pool of ``max_requests`` threads shared by every file of the process (32 by default), each
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
import weakref
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
    time); None when the object is gone. A store that cannot be reached raises
    :class:`~ckptavg.errors.CheckpointReadError` (an unknown identity is not a changed one)."""
    info = path.info(refresh=True)
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


class _Budget:
    """Bytes fetched ahead of their reads, over every file of the process: at most
    ``max_requests x range_bytes``, whatever the number and size of the checkpoints."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used = 0

    def take(self, n: int) -> bool:
        with self.lock:
            if self.used + n > CONFIG.max_requests * CONFIG.range_bytes:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.used -= n


_BUDGET = _Budget()
_LIVE: weakref.WeakSet[RemoteInputFile] = weakref.WeakSet()
#: the smallest range worth a request of its own (an engine block: smaller reads are joined)
MIN_RANGE = 512 << 10


def _piece() -> int:
    """The size of one range request: the configured ``range_bytes``, less when many files share
    the read-ahead budget (each file gets two ranges' worth), never under :data:`MIN_RANGE`."""
    share = CONFIG.max_requests * CONFIG.range_bytes // (2 * max(1, len(_LIVE)))
    return max(MIN_RANGE, min(CONFIG.range_bytes, share))


class RemoteInputFile(InputFile):
    """An :class:`~ckptavg.io.files.InputFile` behind a URL: the same reads, as range requests.

    The engine announces the byte spans of the units it will read next
    (:meth:`advise_willneed`, ``posix_fadvise`` for a local file): their ranges are requested at
    once, in the background, within the process's read-ahead budget, so that every input has
    requests in flight while the current unit is averaged. A read takes what was fetched ahead and
    requests the rest itself (in parallel ranges); a range is dropped once a read has gone past it.
    """

    __slots__ = ("_ahead", "_used", "_paid", "_lock", "_window", "__weakref__")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd = None
        self.stamp = remote_stamp(path)
        self._ahead: dict[tuple[int, int], Future[bytes]] = {}
        self._used: dict[tuple[int, int], int] = {}  # bytes of each range the reads have taken
        self._paid: set[tuple[int, int]] = set()  # ranges counted in the read-ahead budget
        self._lock = threading.Lock()
        self._window = MIN_RANGE  # the extension of the next read nothing was fetched ahead for
        _LIVE.add(self)

    def changed(self) -> bool:
        return remote_stamp(self.path) != self.stamp

    def fd(self) -> int:
        raise CheckpointReadError(f"{self.path}: a URL has no file descriptor")

    def advise_willneed(self, offset: int, n: int) -> None:
        """Start fetching bytes ``[offset, offset + n)`` in the background (within the budget)."""
        end = min(offset + n, self.size)
        step = _piece()
        with self._lock:
            covered = max((hi for lo, hi in self._ahead if lo <= offset < hi), default=offset)
            for lo in range(max(offset, covered), end, step):
                hi = min(lo + step, end)
                if not _BUDGET.take(hi - lo):
                    break
                self._ahead[(lo, hi)] = _pool().submit(fetch_range, self.path, lo, hi)
                self._paid.add((lo, hi))

    def _read(self, bufs: list[memoryview], offset: int) -> None:
        bufs = [b for b in bufs if len(b)]
        want = sum(len(b) for b in bufs)
        if want == 0:
            return
        end = offset + want
        if end > self.size:
            raise CheckpointReadError(
                f"{self.path}: file ended early (truncated?): needed bytes up to {end}, file has {self.size}")
        with self._lock:
            ahead = sorted((k, f) for k, f in self._ahead.items() if k[0] < end and k[1] > offset)
        gaps, pos = [], offset
        for (lo, hi), _f in ahead:
            if lo > pos:
                gaps.append((pos, lo))
            pos = max(pos, hi)
        if pos < end:
            gaps.append((pos, end))
        step = _piece()
        pieces = [(a, min(a + step, b)) for a, b in gaps for a in range(a, b, step)]
        futures: list[Future[bytes]] = []
        try:
            if len(pieces) == 1 and not ahead:
                # a read nothing was fetched ahead for (a header, a pickle read as a stream): one range
                # request, extended since the next reads of this file follow on, by a window that
                # starts at MIN_RANGE and doubles with each such read up to a whole range (a header
                # costs one small request; a long sequential read soon gets whole ranges). The whole
                # range fetched is kept, outside the budget (one such range per file), so that a
                # re-read of its first bytes is not fetched again
                a, b = pieces[0]
                hi = min(max(b, a + self._window), self.size)
                self._window = min(2 * self._window, step)
                data = fetch_range(self.path, a, hi)
                self._copy(bufs, offset, a, b, data[: b - a])
                if hi > b:
                    done: Future[bytes] = Future()
                    done.set_result(data)
                    with self._lock:
                        self._ahead[(a, hi)] = done
                        self._used[(a, hi)] = b - a
            else:
                futures = [_pool().submit(fetch_range, self.path, a, b) for a, b in pieces]
                for (a, b), f in zip(pieces, futures):
                    self._copy(bufs, offset, a, b, f.result())
                for (lo, hi), f in ahead:
                    self._copy(bufs, offset, lo, hi, f.result())
        finally:
            for f in futures:
                f.cancel()
            self._release(ahead, offset, end)

    def _release(self, ahead: list[tuple[tuple[int, int], Any]], offset: int, end: int) -> None:
        """Count what this read took of the ranges fetched ahead; forget a range once all of it was
        taken, or once reads have gone well past it (bytes no read wants: gaps between tensors)."""
        with self._lock:
            for k, _f in ahead:
                if k in self._ahead:
                    self._used[k] = self._used.get(k, 0) + min(k[1], end) - max(k[0], offset)
            stale = offset - 4 * CONFIG.range_bytes  # other workers may still read a unit or two behind
            self._forget([k for k in self._ahead if self._used.get(k, 0) >= k[1] - k[0] or k[1] <= stale])

    def _forget(self, keys: list[tuple[int, int]]) -> None:
        for k in keys:
            self._ahead.pop(k)  # (not cancelled: another read may be waiting for it)
            self._used.pop(k, None)
            if k in self._paid:
                self._paid.discard(k)
                _BUDGET.give(k[1] - k[0])

    @staticmethod
    def _copy(bufs: list[memoryview], offset: int, lo: int, hi: int, data: bytes) -> None:
        """Copy the part of file bytes ``[lo, hi)`` (``data``) that falls in the read at ``offset``
        into the buffers (which hold the consecutive bytes from ``offset`` on)."""
        src = memoryview(data)
        start = max(lo, offset)
        src = src[start - lo:]
        pos = offset
        for b in bufs:
            n = len(b)
            if pos + n <= start:
                pos += n
                continue
            if pos >= hi:
                break
            a = start - pos if start > pos else 0
            take = min(n - a, len(src))
            b[a : a + take] = src[:take]
            src = src[take:]
            start += take
            pos += n
            if not len(src):
                break

    def open_stream(self, buffering: int = -1) -> Any:
        """A seekable binary file of the object, read by range through a 1 MiB buffer."""
        return io.BufferedReader(cast(Any, _RangeRaw(self)), buffer_size=1 << 20)

    def close(self) -> None:
        """Forget what was fetched ahead."""
        with self._lock:
            self._forget(list(self._ahead))
        _LIVE.discard(self)


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

"""A file or folder behind a URL, with the part of :class:`pathlib.Path` ckptavg uses.

Hand-written rather than taken from ``universal_pathlib``: ckptavg needs a small, read-mostly subset
(joining, names, listing, ``stat``, small reads) with its own rules — a fresh ``stat`` for the
identity of an input (ETag or generation, never a cached listing), folders that exist only as key
prefixes, no symlinks — and one more dependency for that subset is not worth it. Anything else a
``Path`` can do raises ``AttributeError``: code that would touch the local disk with a URL fails
loudly instead of looking at a local path of the same name.
"""

from __future__ import annotations

import hashlib
import random
import stat as stat_mod
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from ..errors import CheckpointReadError
from .urls import CONFIG, filesystem

T = TypeVar("T")
#: failures that retrying cannot cure
_PERMANENT = (PermissionError, IsADirectoryError, NotADirectoryError, TypeError, AttributeError, NotImplementedError)

__all__ = ["RemotePath", "RemoteStat", "retried", "reason"]


@dataclass(frozen=True)
class RemoteStat:
    """What a ``stat`` of an object tells: its size, kind, modification time and identity
    (``etag``: the ETag, generation or version the store reports; empty when it has none)."""

    st_size: int
    st_mode: int
    st_mtime_ns: int
    st_dev: int
    st_ino: int
    etag: str


class RemotePath:
    """A URL in a store fsspec knows. ``str()`` gives the URL; ``key`` the store's own path."""

    __slots__ = ("protocol", "key", "_info")

    def __init__(self, url: str, *, _key: str | None = None, _info: dict[str, Any] | None = None) -> None:
        protocol, _, rest = url.partition("://")
        self.protocol = protocol.lower()
        fs = filesystem(self.protocol)
        self.key: str = _key if _key is not None else fs._strip_protocol(url).rstrip("/")
        self._info = _info

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    def _child(self, key: str, info: dict[str, Any] | None = None) -> RemotePath:
        return RemotePath(f"{self.protocol}://", _key=key.rstrip("/"), _info=info)

    # -- pure path operations ------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.key.lstrip('/')}" if self.protocol != "memory" else f"memory://{self.key}"

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(("RemotePath", str(self)))

    def __lt__(self, other: object) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> RemotePath:
        name = str(name).strip("/")
        return self._child(f"{self.key}/{name}" if name else self.key)

    def as_posix(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        n = self.name
        i = n.rfind(".")
        return n[i:] if 0 < i < len(n) - 1 else ""

    @property
    def suffixes(self) -> list[str]:
        n = self.name.lstrip(".")
        return ["." + s for s in n.split(".")[1:]] if "." in n else []

    @property
    def stem(self) -> str:
        n, s = self.name, self.suffix
        return n[: -len(s)] if s else n

    @property
    def parent(self) -> RemotePath:
        head = self.key.rstrip("/").rsplit("/", 1)[0] if "/" in self.key.strip("/") else self.key
        return self._child(head)

    @property
    def parents(self) -> list[RemotePath]:
        out, p = [], self
        while (q := p.parent) != p:
            out.append(q)
            p = q
        return out

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{self.protocol}://", *[s for s in self.key.split("/") if s])

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.parent / (self.stem + suffix)

    def resolve(self, strict: bool = False) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def is_absolute(self) -> bool:
        return True

    def relative_to(self, other: Any) -> str:
        o = str(other).rstrip("/") + "/"
        s = str(self)
        if not s.startswith(o):
            raise ValueError(f"{s} is not under {other}")
        return s[len(o):]

    # -- the store -----------------------------------------------------------------------
    def info(self, refresh: bool = False) -> dict[str, Any] | None:
        """The store's description of the object (None if there is none); ``refresh`` asks the store
        again instead of using what a listing found."""
        if self._info is not None and not refresh:
            return self._info
        fs = self.fs
        try:
            if refresh:
                fs.invalidate_cache(self.key)
            info = retried(lambda: fs.info(self.key), f"{self}: cannot access")
        except FileNotFoundError:
            return None
        self._info = info
        return info

    def stat(self, *, follow_symlinks: bool = True) -> RemoteStat:
        info = self.info()
        if info is None:
            raise FileNotFoundError(2, "No such file or folder", str(self))
        return _stat(str(self), info)

    def lstat(self) -> RemoteStat:
        return self.stat()

    def exists(self) -> bool:
        return self.info() is not None

    def is_dir(self) -> bool:
        info = self.info()
        return info is not None and info.get("type") == "directory"

    def is_file(self) -> bool:
        info = self.info()
        return info is not None and info.get("type") == "file"

    def is_symlink(self) -> bool:
        return False

    def samefile(self, other: Any) -> bool:
        return str(self) == str(other)

    def iterdir(self) -> Iterator[RemotePath]:
        try:
            entries = retried(lambda: self.fs.ls(self.key, detail=True), f"{self}: cannot list")
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such folder", str(self)) from None
        for entry in entries:
            key = str(entry["name"]).rstrip("/")
            if key == self.key.rstrip("/"):
                continue  # some stores list the folder's own marker object
            yield self._child(key, entry)

    def glob_url(self, pattern: str) -> list[RemotePath]:
        """The objects and folders matching a URL pattern (``s3://b/run/*.pt``)."""
        found = retried(lambda: self.fs.glob(pattern, detail=True), f"{pattern}: cannot list")
        return [self._child(str(k), v if isinstance(v, dict) else None) for k, v in found.items()]

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        if mode not in ("r", "rb"):
            raise OSError(f"{self}: only reading is supported through a URL path")
        try:
            fh = retried(lambda: self.fs.open(self.key, "rb"), f"{self}: cannot open")
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file", str(self)) from None
        if mode == "r":
            import io

            return io.TextIOWrapper(fh, encoding=kwargs.get("encoding") or "utf-8")
        return fh

    def read_bytes(self) -> bytes:
        try:
            return bytes(retried(lambda: self.fs.cat_file(self.key), f"{self}: cannot read"))
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file", str(self)) from None

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")


def _stat(url: str, info: dict[str, Any]) -> RemoteStat:
    is_dir = info.get("type") == "directory"
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    ns = 0
    if mtime is not None:
        try:
            ns = int(mtime.timestamp() * 1e9) if hasattr(mtime, "timestamp") else int(float(mtime) * 1e9)
        except (TypeError, ValueError, OverflowError):
            ns = 0
    tag = ""
    for k in ("ETag", "etag", "generation", "VersionId", "version_id", "md5Hash", "checksum"):
        v = info.get(k)
        if v:
            tag += f"{k}={v};"
    size = int(info.get("size") or 0)
    mode = (stat_mod.S_IFDIR | 0o555) if is_dir else (stat_mod.S_IFREG | 0o444)
    # device -1 keeps URLs apart from local files; the "inode" identifies the URL itself
    return RemoteStat(st_size=size, st_mode=mode, st_mtime_ns=ns, st_dev=-1,
                      st_ino=int.from_bytes(hashlib.sha1(url.encode()).digest()[:7], "big"),
                      etag=tag)


def reason(e: BaseException) -> str:
    """An exception as a short line (the backends' messages can be long, multi-line XML)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + text[:200] if text else ''}"


def retried(call: Callable[[], T], what: str) -> T:
    """``call()``, retried with exponential backoff (and jitter) on transient failures (timeouts,
    dropped connections, 5xx, throttling) up to the configured number of times. A missing object
    (``FileNotFoundError``) is raised as it is; a refused permission or a persistent failure is a
    :class:`~ckptavg.errors.CheckpointReadError` starting with ``what``."""
    attempts = CONFIG.retries + 1
    for attempt in range(attempts):
        try:
            return call()
        except FileNotFoundError:
            raise
        except _PERMANENT as e:
            raise CheckpointReadError(f"{what}: {reason(e)}") from None
        except Exception as e:  # the backends raise many types for network failures
            if attempt + 1 >= attempts:
                raise CheckpointReadError(f"{what}: failed {attempts} times: {reason(e)}") from None
            time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")

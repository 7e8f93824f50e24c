"""URLs: checkpoints in object storage (``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://``, any
protocol fsspec knows), read and written through fsspec.

A URL given where ckptavg takes a path becomes a :class:`~ckptavg.io.remote_path.RemotePath`, which
answers the part of :class:`pathlib.Path` that discovery and the readers use (``/``, ``name``,
``is_dir``, ``iterdir``, ``stat``, ``read_text``...) with fsspec calls, so that globs, folders of
checkpoints, Hugging Face, DCP and Trainer folders are recognised exactly as on a local disk. Its
files are read by byte range (:mod:`ckptavg.io.remote_in`), several ranges in flight at once; an
output URL is written locally and uploaded atomically (:mod:`ckptavg.io.remote_out`).

``file://`` URLs are plain local paths. fsspec and the protocol's package (``s3fs``, ``gcsfs``,
``adlfs``...) are imported only when a URL is used (``pip install 'ckptavg[s3]'``).

Credentials and endpoints come from each backend's own configuration (for S3: the AWS environment
variables including ``AWS_ENDPOINT_URL``, profiles, instance roles); :func:`configure` (the CLI's
``--storage-options JSON``, or ``CKPTAVG_STORAGE_OPTIONS``) passes anything else to the backend.
Storage options are never printed, logged or written into an output's provenance.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..errors import OptionError
from ..settings import env_int

__all__ = ["is_url", "as_path", "is_remote", "configure", "StorageConfig", "CONFIG", "filesystem",
           "STORAGE_OPTIONS_ENV", "MAX_REQUESTS_ENV", "RANGE_BYTES_ENV", "RETRIES_ENV"]

STORAGE_OPTIONS_ENV = "CKPTAVG_STORAGE_OPTIONS"
MAX_REQUESTS_ENV = "CKPTAVG_MAX_REQUESTS"
RANGE_BYTES_ENV = "CKPTAVG_RANGE_BYTES"
RETRIES_ENV = "CKPTAVG_RETRIES"

_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


@dataclass
class StorageConfig:
    """How URLs are reached: ``options`` (given to ``fsspec.filesystem(protocol, **options)``),
    ``max_requests`` (byte ranges in flight at once, over all files), ``range_bytes`` (the
    largest single range request) and ``retries`` (attempts after the first, for transient errors)."""

    options: dict[str, Any] = field(default_factory=dict)
    max_requests: int = 32
    range_bytes: int = 4 << 20
    retries: int = 5


CONFIG = StorageConfig()
_FS_LOCK = threading.Lock()
_FILESYSTEMS: dict[str, Any] = {}


def configure(storage_options: str | dict[str, Any] | None = None, *, max_requests: int | None = None,
              range_bytes: int | None = None, retries: int | None = None) -> StorageConfig:
    """Set how URLs are reached (for every later read and write in this process); unset values come
    from the environment (``CKPTAVG_STORAGE_OPTIONS``, ``CKPTAVG_MAX_REQUESTS``,
    ``CKPTAVG_RANGE_BYTES``, ``CKPTAVG_RETRIES``) or the defaults.

    Example::

        configure('{"anon": true}', max_requests=64)  # then merge("s3://bucket/run/", ...)
    """
    raw = storage_options if storage_options is not None else os.environ.get(STORAGE_OPTIONS_ENV) or None
    if isinstance(raw, str):
        try:
            opts = json.loads(raw)
        except ValueError as e:
            raise OptionError(f"--storage-options must be a JSON object: {e}") from None
    else:
        opts = dict(raw or {})
    if not isinstance(opts, dict):
        raise OptionError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    CONFIG.options = opts
    CONFIG.max_requests = max_requests or env_int(MAX_REQUESTS_ENV) or StorageConfig.max_requests
    CONFIG.range_bytes = range_bytes or env_int(RANGE_BYTES_ENV, minimum=4096) or StorageConfig.range_bytes
    CONFIG.retries = retries if retries is not None else (env_int(RETRIES_ENV, minimum=0) if
                                                          os.environ.get(RETRIES_ENV) else 5) or 0
    with _FS_LOCK:
        _FILESYSTEMS.clear()
    from . import remote_in

    remote_in.reset_pool()
    return CONFIG


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is a URL (``scheme://...``) rather than a local path.

    Example::

        is_url("s3://bucket/ckpt.pt"), is_url("runs/ckpt.pt")  # (True, False)
    """
    return isinstance(text, str) and _URL_RE.match(text) is not None


def is_remote(p: object) -> bool:
    """Whether ``p`` is a :class:`~ckptavg.io.remote_path.RemotePath` (a file or folder behind a URL)."""
    from .remote_path import RemotePath

    return isinstance(p, RemotePath)


def as_path(text: str | os.PathLike[str]) -> Path:
    """A local :class:`~pathlib.Path`, or for a URL a :class:`~ckptavg.io.remote_path.RemotePath`,
    which implements the part of ``Path`` that ckptavg's discovery and readers use and is typed as a
    ``Path`` for them (``file://`` URLs are local paths).

    Example::

        as_path("s3://bucket/run/step-100.pt").name  # 'step-100.pt'
    """
    if isinstance(text, Path) or is_remote(text):
        return cast(Path, text)
    s = os.fspath(text)
    if not is_url(s):
        return Path(s)
    protocol = s.split("://", 1)[0].lower()
    if protocol == "file":
        return Path(s[len("file://"):] or "/")
    from .remote_path import RemotePath

    return cast(Path, RemotePath(s))


def _options_for(protocol: str) -> dict[str, Any]:
    """The configured options, and for S3 a connection pool as large as the requests in flight:
    botocore's default pool holds 10 connections, so the range requests in flight beyond 10 would
    otherwise queue for a connection (a store's throughput is per connection). An explicit
    ``config_kwargs.max_pool_connections`` is kept."""
    opts = dict(CONFIG.options)
    if protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max(10, CONFIG.max_requests + 2))  # + listing, head, upload
        opts["config_kwargs"] = config
    return opts


def filesystem(protocol: str) -> Any:
    """The fsspec file system of a protocol, made once per process with the configured options."""
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(protocol)
        if fs is not None:
            return fs
        try:
            import fsspec
        except ImportError:
            raise OptionError(f"{protocol}:// URLs need fsspec: pip install 'ckptavg[s3]' (or fsspec and the "
                              "protocol's package)") from None
        try:
            fs = fsspec.filesystem(protocol, **_options_for(protocol))
        except (ImportError, ValueError) as e:
            hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol)
            extra = f" (pip install {hint})" if hint else ""
            raise OptionError(f"{protocol}:// URLs: cannot use this protocol{extra}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        except TypeError as e:
            raise OptionError(f"{protocol}:// URLs: --storage-options not accepted by the backend: {e}") from None
        _FILESYSTEMS[protocol] = fs
        return fs

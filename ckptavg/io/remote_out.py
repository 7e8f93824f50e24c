"""Outputs at a URL: written locally by the output's own kind, then uploaded so that nothing appears
at the destination unless the whole output is complete.

The output is first written, exactly as a local output, under a private temporary folder (``TMPDIR``:
it needs the output's size in local space, never the inputs'). Then:

* **a single file** is uploaded straight to its key with the store's own atomic upload: S3 creates the
  object only when its multipart upload is completed, at the end (an upload that fails is aborted);
  GCS and Azure likewise publish an object only when its upload is finalised. A file already at the
  key is replaced, as a local single-file output replaces a file.
* **a folder** (Hugging Face shards, DCP) is uploaded under a temporary prefix beside the destination
  (``.NAME.XXXXXXXX.ckptavg-tmp/``), then published into the destination in this order: the index or
  marker of an earlier output being replaced is deleted first (from then on no reader takes the
  folder for a checkpoint), the data files are copied in (server-side copies), then the other files,
  then the index or marker that makes it a checkpoint (``model.safetensors.index.json`` or
  ``model.safetensors``; DCP's ``.metadata``), last; files of the earlier output that the new one
  lacks are deleted, and the temporary prefix is removed. An existing folder is replaced only if it
  is an earlier ckptavg output holding only files ckptavg wrote, as locally
  (:mod:`ckptavg.io.folders`).

A failure or an interrupt before the publication leaves nothing at the destination (the temporary
prefix is removed). One during the publication of a folder removes what was copied into a new
destination; for a replaced folder the destination is left without its index or marker (so it is
not taken for a checkpoint) and the error says so. What cannot be removed (the store refusing the
deletes) is named in the error.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .files import PUBLISHED, TMP_SUFFIX, signals_blocked
from .folders import earlier_output, owned
from .kinds import OutputKind, OutputSetup, RankPart
from .writer import Entry, Writer

__all__ = ["RemoteKind", "RemoteWriter", "MARKERS", "publish_prefix", "temporary_prefix"]

#: files that make a folder a checkpoint: published last, and deleted first when an output is replaced
MARKERS = ("model.safetensors.index.json", "model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           "diffusion_pytorch_model.safetensors", ".metadata", "latest_checkpointed_iteration.txt")


class RemoteKind(OutputKind):
    """The output kind ``inner`` (chosen by the URL's name as for a local path), at a URL."""

    def __init__(self, inner: OutputKind) -> None:
        self.inner = inner
        self.name = inner.name
        self.options = inner.options
        self.stores_metadata = inner.stores_metadata
        self.single_file = inner.single_file
        self.parts = inner.parts

    def matches(self, path: str) -> bool:
        return self.inner.matches(path)

    def check_destination(self, dest: Path) -> str:
        info = dest.info(refresh=True)  # type: ignore[attr-defined]
        kind = None if info is None else info.get("type")
        if self.single_file:
            if kind == "directory":
                raise OutputError(f"{dest}: is a folder (objects under this prefix); give another output name")
            return "file"
        if kind is None:
            return "new"
        if kind != "directory":
            raise OutputError(f"{dest}: exists and is not a folder; folder output needs a new or empty folder")
        names = _names(dest)
        if not names:
            return "empty"
        own = earlier_output(dest)
        if own is None:
            shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            raise OutputError(f"{dest}: the folder exists and holds other files ({shown}); ckptavg only replaces an "
                              "empty folder or an earlier ckptavg output: choose a new folder")
        foreign = next((n for n in names if not owned(own, n)), None)
        if foreign is not None:
            raise OutputError(f"{dest}: an earlier ckptavg output, but it also holds {foreign!r}, which ckptavg did "
                              "not write; move it out of the folder (or choose another output folder)")
        return "replace"

    def check_entries(self, dest: Path, entries: Sequence[Entry]) -> None:
        self.inner.check_entries(dest, entries)

    def notes(self, dest: Path, objects: Sequence[Any], keep_structure: bool) -> list[str]:
        return self.inner.notes(dest, objects, keep_structure)

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup) -> Writer:
        staging = Path(tempfile.mkdtemp(prefix="ckptavg-upload-"))
        try:
            local = staging / (dest.name or "output")
            return RemoteWriter(self.inner.open(local, entries, metadata, setup), local, dest, self, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def open_part(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup,
                  part: RankPart) -> Any:
        """One rank's part (see :mod:`ckptavg.io.remote_parts`): written into a local staging folder
        of this rank, uploaded under the shared temporary prefix ``part.tmp``."""
        if not self.inner.parts:
            return self.inner.open_part(dest, entries, metadata, setup, part)  # its own refusal
        from .remote_parts import open_remote_part

        return open_remote_part(self, dest, entries, metadata, setup, part)


def temporary_prefix(dest: Path) -> Path:
    """A new temporary prefix beside a folder output at a URL (``.NAME.XXXXXXXX.ckptavg-tmp``)."""
    return dest.parent / f".{dest.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _names(folder: Any) -> list[str]:
    """Every object under a folder URL, as paths relative to it (sub-folders' objects included)."""
    fs, key = folder.fs, folder.key.rstrip("/")
    try:
        found = fs.find(key, withdirs=False)
    except FileNotFoundError:
        return []
    except Exception as e:  # the backends raise many types for network failures
        raise OutputError(f"{folder}: cannot list the output folder: {type(e).__name__}: {_first_line(e)}") from None
    return sorted(str(k)[len(key) + 1:] for k in found if str(k).startswith(key + "/"))


class Staged:
    """A writer that lets ``inner`` (the output kind's own writer, into a local staging folder) write
    the bytes; subclasses publish what it wrote at a URL."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entries = inner.entries

    @property
    def bytes_written(self) -> int:
        return int(self.inner.bytes_written)

    @bytes_written.setter
    def bytes_written(self, n: int) -> None:
        self.inner.bytes_written = n

    def write(self, data: Any) -> None:
        self.inner.write(data)

    def annotate(self, metadata: Mapping[str, str]) -> None:
        if hasattr(self.inner, "annotate"):
            self.inner.annotate(metadata)

    def report(self) -> dict[str, Any]:
        return dict(self.inner.report())


class RemoteWriter(Staged):
    """The writer of an output at a URL: the inner kind's writer into a local staging folder, whose
    :meth:`commit` then uploads the finished output (see the module docstring)."""

    def __init__(self, inner: Writer, local: Path, dest: Path, kind: RemoteKind, staging: Path) -> None:
        super().__init__(inner)
        self.local, self.dest, self.kind, self.staging = local, dest, kind, staging
        self._tmp_key: str | None = None
        self._copied: list[str] = []

    def commit(self) -> None:
        try:
            self.inner.commit()
            if PUBLISHED and PUBLISHED[-1] == self.local:
                PUBLISHED.pop()  # only the upload publishes
            if self.kind.single_file:
                with signals_blocked():  # an interrupt waits: the store completes or aborts the upload
                    self._upload_file()
            else:
                self._upload_folder()  # an interrupt while uploading under the temporary prefix stops it
            PUBLISHED.append(self.dest)
        except BaseException:
            with signals_blocked():
                self.abort()
            raise
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        self.inner.abort()
        shutil.rmtree(self.staging, ignore_errors=True)
        left = self._cleanup()
        if left:
            import warnings

            from ..errors import CkptavgWarning

            warnings.warn(CkptavgWarning(f"{self.dest}: could not remove {left} after the failure"), stacklevel=2)

    # -- uploads ---------------------------------------------------------------------------
    def _fs(self) -> Any:
        return self.dest.fs  # type: ignore[attr-defined]

    def _upload_file(self) -> None:
        key = self.dest.key  # type: ignore[attr-defined]
        try:
            self._fs().put_file(str(self.local), key)
        except Exception as e:
            raise OutputError(f"{self.dest}: upload failed: {type(e).__name__}: {_first_line(e)}") from None

    def _upload_folder(self) -> None:
        fs, dest = self._fs(), self.dest.key.rstrip("/")  # type: ignore[attr-defined]
        self._tmp_key = temporary_prefix(self.dest).key  # type: ignore[attr-defined]
        files = sorted(str(p.relative_to(self.local)) for p in self.local.rglob("*") if p.is_file())
        try:
            for rel in files:
                fs.put_file(str(self.local / rel), f"{self._tmp_key}/{rel}")
        except Exception as e:
            raise OutputError(f"{self.dest}: upload failed: {type(e).__name__}: {_first_line(e)}") from None
        with signals_blocked():  # publishing is not interrupted half-way
            self._publish(fs, dest, files)
        self._remove_tmp()

    def _publish(self, fs: Any, dest: str, files: list[str]) -> None:
        assert self._tmp_key is not None
        publish_prefix(self.kind, self.dest, self._tmp_key, files, self._copied)
        self._copied.clear()

    def _remove_tmp(self) -> str | None:
        if self._tmp_key is None:
            return None
        try:
            self._fs().rm(self._tmp_key, recursive=True)
        except FileNotFoundError:
            pass
        except Exception:
            return f"{self.dest.parent}/{self._tmp_key.rsplit('/', 1)[-1]}"
        self._tmp_key = None
        return None

    def _cleanup(self) -> str | None:
        left = []
        for key in self._copied:
            try:
                self._fs().rm_file(key)
            except Exception:
                left.append(key)
        self._copied = []
        tmp = self._remove_tmp()
        if tmp:
            left.append(tmp)
        return ", ".join(left) or None


def publish_prefix(kind: OutputKind, dest: Any, tmp_key: str, files: list[str], copied: list[str]) -> None:
    """Copy a folder uploaded under ``tmp_key`` into ``dest``, in the documented order (see the
    module docstring); ``copied`` collects what was copied into a new destination, for a cleanup."""
    fs, key = dest.fs, dest.key.rstrip("/")
    mode = kind.check_destination(dest)  # again: the folder may have changed meanwhile
    old = _names(dest) if mode == "replace" else []
    try:
        for rel in (n for n in old if n in MARKERS):
            _remove(fs, f"{key}/{rel}")
        order = sorted(files, key=lambda n: (n in MARKERS, not n.endswith((".safetensors", ".distcp")), n))
        for rel in order:
            fs.copy(f"{tmp_key}/{rel}", f"{key}/{rel}")
            if mode != "replace":
                copied.append(f"{key}/{rel}")
        for rel in (n for n in old if n not in files and n not in MARKERS):
            _remove(fs, f"{key}/{rel}")
    except Exception as e:
        what = ("; the earlier output there has lost its index and is no longer a checkpoint"
                if mode == "replace" else "")
        raise OutputError(f"{dest}: publishing the uploaded folder failed: {type(e).__name__}: "
                          f"{_first_line(e)}{what}") from None


def _remove(fs: Any, key: str) -> None:
    try:
        fs.rm_file(key)
    except FileNotFoundError:
        pass


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]

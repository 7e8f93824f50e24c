"""A folder output at a URL written by several ranks together (torchrun).

Rank 0 names a temporary prefix beside the destination (``.NAME.XXXXXXXX.ckptavg-tmp``) and every
rank learns it. Each rank writes its part (its shards, or its DCP data file) with the inner kind's
own part writer into a local staging folder of its own, and uploads those files under the prefix
when it finishes its part. After every rank agreed, rank 0 writes what needs every part (the index,
DCP's ``.metadata``, the copied model files), uploads it, and publishes the prefix into the
destination in the documented order (:func:`~ckptavg.io.remote_out.publish_prefix`: data first,
the index or marker last). The ranks need no shared file system. On a failure each rank removes its
staging folder and what it uploaded; rank 0 removes the prefix.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .files import signals_blocked
from .kinds import OutputSetup, RankPart
from .remote_out import RemoteKind, Staged, _first_line, _names, publish_prefix
from .writer import Entry

__all__ = ["RemotePart", "open_remote_part"]


def open_remote_part(kind: RemoteKind, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str],
                     setup: OutputSetup, part: RankPart) -> RemotePart:
    """This rank's part of the output at ``dest``, uploaded under the prefix ``part.tmp``."""
    staging = Path(tempfile.mkdtemp(prefix="ckptavg-upload-"))
    try:
        local = RankPart(staging, part.rank, part.world, part.owner, part.mode)
        inner = kind.inner.open_part(staging.parent / dest.name, entries, metadata, setup, local)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RemotePart(inner, kind, dest, part.tmp, staging, part.rank)


class RemotePart(Staged):
    """The part writer of one rank (see the module docstring); the inner part writer does the
    writing, this uploads and publishes."""

    def __init__(self, inner: Any, kind: RemoteKind, dest: Path, prefix: Path, staging: Path, rank: int) -> None:
        super().__init__(inner)
        self.kind, self.dest, self.prefix = kind, dest, prefix
        self.staging, self.rank = staging, rank
        self.uploaded: list[str] = []
        self._kept = False

    def commit(self) -> None:
        raise OutputError(f"{self.dest}: a rank's part is published by rank 0")

    def _upload_new(self) -> None:
        """Upload the files of the staging folder not uploaded yet."""
        fs, key = self.prefix.fs, self.prefix.key  # type: ignore[attr-defined]
        done = set(self.uploaded)
        try:
            for p in sorted(self.staging.rglob("*")):
                rel = str(p.relative_to(self.staging))
                if p.is_file() and rel not in done:
                    fs.put_file(str(p), f"{key}/{rel}")
                    self.uploaded.append(rel)
        except Exception as e:
            raise OutputError(f"{self.dest}: upload failed: {type(e).__name__}: {_first_line(e)}") from None

    def finish(self) -> Any:
        """Finish this rank's files and upload them; returns what rank 0 needs (the inner payload)."""
        payload = self.inner.finish()
        self._upload_new()
        return payload

    def complete(self, payloads: Sequence[Any]) -> None:
        """Rank 0: write what needs every part (index, metadata, copied files), and upload it."""
        self.inner.complete(payloads)
        self._upload_new()

    def publish(self) -> None:
        """Rank 0: publish the prefix into the destination, then remove the prefix."""
        with signals_blocked():
            copied: list[str] = []
            try:
                publish_prefix(self.kind, self.dest, self.prefix.key, _names(self.prefix), copied)  # type: ignore[attr-defined]
            except BaseException:
                for k in copied:
                    _quietly(lambda k=k: self.dest.fs.rm_file(k))  # type: ignore[attr-defined]
                raise
            self._kept = True
            _quietly(lambda: self.prefix.fs.rm(self.prefix.key, recursive=True))  # type: ignore[attr-defined]
        shutil.rmtree(self.staging, ignore_errors=True)

    def keep(self) -> None:
        """Rank 0 has published: nothing of this rank's is removed from now on."""
        self._kept = True
        shutil.rmtree(self.staging, ignore_errors=True)

    def publish_node(self) -> None:
        """Nothing: every rank uploaded its part under the shared prefix."""

    def abort(self) -> None:
        """Remove the staging folder and what this rank uploaded (rank 0: the whole prefix)."""
        if self._kept:
            return
        self._kept = True
        _quietly(self.inner.abort)
        shutil.rmtree(self.staging, ignore_errors=True)
        fs, key = self.prefix.fs, self.prefix.key  # type: ignore[attr-defined]
        if self.rank == 0:
            _quietly(lambda: fs.rm(key, recursive=True))
        else:
            for rel in self.uploaded:
                _quietly(lambda rel=rel: fs.rm_file(f"{key}/{rel}"))


def _quietly(call: Any) -> None:
    try:
        call()
    except Exception:
        pass

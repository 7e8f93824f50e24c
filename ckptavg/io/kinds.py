"""What an output kind is: the one interface every ``*_out`` module implements for ``-o``.

An output kind owns, in its own module, everything that depends on it: how a path selects it
(:meth:`OutputKind.matches`), the output options it accepts (:attr:`OutputKind.options`), its
destination check (:meth:`OutputKind.check_destination`, before anything is read), what it
cannot store (:meth:`OutputKind.check_entries`), the notes it adds to a plan, and how to open
the whole output (:meth:`OutputKind.open`) or one rank's part of it (:meth:`OutputKind.open_part`,
for kinds that several ranks can write together under torchrun). The registry is
:data:`ckptavg.io.OUTPUT_KINDS`; nothing outside ``ckptavg.io`` branches on a kind's name.

Adding an output kind is one module ``NAME_out.py`` with a subclass of :class:`OutputKind`
and one line in :data:`ckptavg.io.OUTPUT_KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import OptionError
from .writer import Entry, Writer

__all__ = ["OutputKind", "OutputSetup", "RankPart"]


@dataclass
class OutputSetup:
    """What a kind may use when it opens an output, besides the entries and the metadata.

    ``sources``: the input paths with their format names, in plan order (a folder output copies
    the model files of the last model folder among them); ``dtype``: the ``--dtype`` asked for
    (or None); ``shard_size``: the folder kinds' largest shard, already parsed; the rest below."""

    sources: Sequence[tuple[Path, str]] = ()
    dtype: torch.dtype | None = None
    shard_size: int | None = None
    #: the selected inputs' opened checkpoints, in plan order (a Megatron output copies byte entries from one)
    checkpoints: Sequence[Any] = ()
    #: the step the output stands for (the last input it uses), if known
    step: int | None = None
    #: the merge's options (kinds read the output options they accept, :attr:`OutputKind.options`)
    options: Any = None


@dataclass
class RankPart:
    """Where one rank writes its part of an output that several ranks write together: the
    temporary folder (rank 0's, shared, or this node's own), this rank, the number of ranks, the
    rank owning each entry, and what this rank's check of the destination found (``mode``)."""

    tmp: Path
    rank: int
    world: int
    owner: list[int]
    mode: str

    def mine(self) -> list[int]:
        """The indices of the entries this rank writes, in entry order."""
        return [i for i, r in enumerate(self.owner) if r == self.rank]


class OutputKind:
    """One kind of output (a file format or a folder layout). Subclasses set the attributes and
    implement :meth:`matches` and :meth:`open`; the rest has defaults that suit single files."""

    #: the name a plan, a report and ``--format`` use
    name: str = ""
    #: the output options (``MergeOptions`` field names) that only some kinds accept and this one does
    options: frozenset[str] = frozenset()
    #: whether the output stores string metadata (provenance) itself; else a JSON sidecar holds it
    stores_metadata: bool = True
    #: whether several ranks can write it together (it then implements :meth:`open_part`)
    parts: bool = False
    #: whether the output is one file (else a folder)
    single_file: bool = True

    def matches(self, path: str) -> bool:
        """Whether ``-o path`` asks for this kind."""
        raise NotImplementedError

    def check_destination(self, dest: Path) -> str:
        """Before anything is read: how the output will be published (``"new"``, ``"empty"``,
        ``"replace"``; ``"file"`` for a single file, which replaces whatever file is there), or
        :class:`~ckptavg.errors.OutputError` when the destination must not be touched."""
        return "file"

    def check_entries(self, dest: Path, entries: Sequence[Entry]) -> None:
        """Before anything is written: refuse what this kind cannot store."""

    def notes(self, dest: Path, objects: Sequence[Any], keep_structure: bool) -> list[str]:
        """Notes for the plan about this output (``objects``: the selected inputs' top-level objects)."""
        return []

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup) -> Writer:
        """The writer of the whole output, published by its ``commit``."""
        raise NotImplementedError

    def open_part(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup,
                  part: RankPart) -> Any:
        """The writer of one rank's part (a :class:`~ckptavg.io.writer.FolderPart`); only for kinds
        with :attr:`parts`."""
        raise OptionError(f"{dest}: a merge across ranks (torchrun) writes a folder: give -o DIR/ (sharded "
                          "safetensors) or -o NAME.dcp (a DCP folder)")


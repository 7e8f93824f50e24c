"""Write a Megatron-LM / NeMo ``torch_dist`` checkpoint root, streaming.

``ckptavg merge ckpts/ --last 5 -o avg/`` over Megatron inputs (or any inputs with
``--format megatron``) writes a checkpoint root that Megatron loads and resumes from
(``--load avg --finetune``, or ``--no-load-optim --no-load-rng``; it holds no optimizer state):

* ``avg/iter_XXXXXXX/`` (the step of the last input the average uses, or ``--output-step N``):
  a DCP folder as ``-o NAME.dcp`` writes it (:mod:`ckptavg.io.dcp_out`: every tensor whole, one
  chunk each, which Megatron's loader reshards to any tensor/pipeline-parallel layout), plus the
  byte entries (Transformer Engine ``_extra_state``) copied byte for byte from one input (the last
  selected one, or ``--extra-state-from STEP``) into ``__0_1.distcp``, never unpickled;
* ``metadata.json`` (the ``torch_dist`` backend), ``common.pt``: that input's ``common.pt``
  (loaded weights-only; one that needs more is not copied, with a note) without its
  ``optimizer`` entry, with ``iteration`` set and ckptavg's provenance under ``ckptavg``;
  ``ckptavg.json``: the provenance;
* ``avg/latest_checkpointed_iteration.txt``, written last.

The root is built in a temporary sibling folder and renamed into place (replacing only an earlier
ckptavg output, :mod:`ckptavg.io.folders`). Under torchrun each rank writes its
``iter_XXXXXXX/__{rank}_0.distcp``; rank 0 writes the rest.

Example::

    ckptavg merge ckpts/ --steps 20000: --schedule minus-sqrt -o wsm/   # wsm/iter_0030000/ ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import OptionError, OutputError
from . import megatron
from .dcp_out import DcpWriter, Record, check_dcp_destination, write_dcp_metadata
from .files import fsync_path
from .kinds import OutputKind, OutputSetup, RankPart
from .writer import Entry

__all__ = ["KIND", "MegatronWriter", "BYTES_NAME"]

#: the data file holding the copied byte entries
BYTES_NAME = "__0_1.distcp"
_COPY_BLOCK = 8 << 20


def _iteration(dest: Path, setup: OutputSetup) -> int:
    opts = setup.options
    it = getattr(opts, "output_step", None)
    if it is None:
        it = setup.step
    if it is None:
        raise OptionError(f"{dest}: a Megatron checkpoint needs an iteration and the inputs record no step: give "
                          "--output-step N")
    if it < 0:
        raise OptionError(f"--output-step must be >= 0, got {it}")
    return int(it)


def _byte_source(setup: OutputSetup) -> Any:
    """The input whose byte entries and ``common.pt`` the output copies (None without inputs)."""
    chosen = list(setup.checkpoints)
    want = getattr(setup.options, "extra_state_from", None)
    if want is None:
        return chosen[-1] if chosen else None
    for c in chosen:
        if c.meta.step == want:
            return c
    steps = ", ".join(str(c.meta.step) for c in chosen)
    raise OptionError(f"--extra-state-from {want}: no selected checkpoint is at step {want} (selected: {steps})")


class MegatronWriter(DcpWriter):
    """A Megatron checkpoint root (see the module docstring): a :class:`DcpWriter` whose DCP files go
    into ``iter_XXXXXXX/`` of the temporary root, completed with the byte entries and sidecars."""

    def __init__(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup,
                 part: RankPart | None = None) -> None:
        self.iteration = _iteration(Path(dest), setup)
        self.source = _byte_source(setup)
        self.common_note: str | None = None
        super().__init__(dest, entries, metadata, part=part, subfolder=megatron.iter_name(self.iteration))

    def _complete_folder(self, records: Mapping[str, Record]) -> None:
        byte_records = self._copy_bytes()
        write_dcp_metadata(self.folder, self.all_entries, records, self.provenance, byte_records)
        (self.folder / megatron.CONFIG_NAME).write_text(json.dumps(megatron.CONFIG) + "\n", encoding="utf-8")
        torch.save(self._common(), self.folder / megatron.COMMON_NAME)
        for n in (megatron.CONFIG_NAME, megatron.COMMON_NAME):
            fsync_path(self.folder / n)
        fsync_path(self.folder, directory=True)
        marker = self.tmp / megatron.MARKER
        marker.write_text(str(self.iteration), encoding="utf-8")  # last: it makes the root a checkpoint
        fsync_path(marker)

    def _copy_bytes(self) -> dict[str, Record]:
        """Copy the source's byte entries, as stored, into ``__0_1.distcp``; their records."""
        entries = dict(getattr(self.source, "byte_entries", None) or {})
        if not entries:
            return {}
        out: dict[str, Record] = {}
        with open(self.folder / BYTES_NAME, "xb") as fh:
            for name, (f, off, length) in entries.items():
                start = fh.tell()
                done = 0
                while done < length:
                    n = min(_COPY_BLOCK, length - done)
                    fh.write(f.pread(off + done, n))
                    done += n
                out[name] = (BYTES_NAME, start, length)
            fh.flush()
            os.fsync(fh.fileno())
        for f in {id(v[0]): v[0] for v in entries.values()}.values():
            if f.changed():
                raise OutputError(f"{self.source.path}: {f.path.name} changed while its byte entries were copied")
        return out

    def _common(self) -> dict[str, Any]:
        common = megatron.load_common(self.source.path) if self.source is not None else None
        if common is None and self.source is not None and self.source.format == "megatron":
            self.common_note = (f"{self.source.path / megatron.COMMON_NAME} needs more than weights-only loading "
                                "(left unread): the output's common.pt holds only the iteration and the provenance")
        out: dict[str, Any] = {k: v for k, v in (common or {}).items() if k != "optimizer"}
        out.setdefault("checkpoint_version", 3.0)
        out["iteration"] = self.iteration
        out["ckptavg"] = dict(self.provenance)
        return out

    def report(self) -> dict[str, Any]:
        extra = super().report()
        extra.setdefault("output_notes", []).append(
            f"Megatron checkpoint root: {megatron.iter_name(self.iteration)}/ and {megatron.MARKER}")
        if self.common_note:
            extra["output_notes"].append(self.common_note)
        return extra


class MegatronKind(OutputKind):
    """A Megatron ``torch_dist`` checkpoint root: chosen for a folder output (``-o DIR/``) when every
    input is a Megatron checkpoint, or by ``--format megatron``; never by the path alone."""

    name = "megatron"
    single_file = False
    parts = True
    options = frozenset({"extra_state_from", "output_step"})

    def matches(self, path: str) -> bool:
        return False

    def check_destination(self, dest: Path) -> str:
        return check_dcp_destination(dest)

    def notes(self, dest: Path, objects: Sequence[Any], keep_structure: bool) -> list[str]:
        return [f"{dest}: a Megatron checkpoint root (iter_XXXXXXX/ and {megatron.MARKER}); --format hf writes a "
                "Hugging Face folder instead"]

    def open(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> MegatronWriter:
        return MegatronWriter(dest, entries, metadata, setup)

    def open_part(self, dest: Path, entries: Sequence[Entry], metadata: Mapping[str, str], setup: OutputSetup,
                  part: RankPart) -> MegatronWriter:
        return MegatronWriter(dest, entries, metadata, setup, part=part)


KIND = MegatronKind()

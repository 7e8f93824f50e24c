"""The merge plan: what will be read, with which weight, and what will be written.

The plan is built and validated (:func:`ckptavg.planner.build_plan`) before any tensor data is
read: the files in order with their epoch/step and weight, and per output tensor its shape,
output dtype, accumulator dtype and whether it is averaged (floating tensors) or copied from the
last selected checkpoint (integer and bool tensors). ``--dry-run`` prints :meth:`MergePlan.format`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .io import Checkpoint, Entry, TensorRef
from .options import MergeOptions
from .weights import Weights

__all__ = ["MergePlan", "PlannedInput", "PlannedTensor"]


@dataclass
class PlannedInput:
    """One selected checkpoint and its weight."""

    path: Path
    format: str
    weight: float
    epoch: int | float | None  # Hugging Face Trainer records fractional epochs (2.5)
    step: int | None
    metrics: dict[str, float]
    weights_key: str | None
    size: int
    checkpoint: Checkpoint = field(repr=False)
    sigma_rel: float | None = None  # power-EMA snapshot profile, when the checkpoint records one

    @property
    def gamma(self) -> float | None:
        return self.checkpoint.meta.gamma


@dataclass
class PlannedTensor:
    """One output tensor: averaged over the inputs, or copied from the last one."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str  # "average" | "copy"
    refs: list[TensorRef] = field(repr=False)
    acc_dtype: torch.dtype | None = None
    alias_of: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Everything a merge will do, decided before any tensor data is read."""

    inputs: list[PlannedInput]
    tensors: list[PlannedTensor]
    weights: Weights
    order_rule: str
    selection: str
    candidates: int
    options: MergeOptions
    notes: list[str] = field(default_factory=list)
    output: Path | None = None
    output_format: str | None = None
    #: several outputs from one pass: one weight vector over ``inputs`` per output (``weights`` is the first)
    variants: list[Weights] | None = None
    variant_labels: list[dict[str, str]] | None = None

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.inputs]

    @property
    def method(self) -> str:
        return self.weights.description

    @property
    def read_bytes(self) -> int:
        """Tensor bytes the merge reads (inputs with weight 0 are not read)."""
        total = 0
        for t in self.tensors:
            if t.alias_of is not None:
                continue
            if t.kind == "copy":
                total += t.refs[-1].nbytes
            else:
                total += sum(r.nbytes for r, c in zip(t.refs, self.weights.coeffs) if c != 0)
        return total

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((max(r.nbytes for r in t.refs) for t in self.tensors), default=0)

    def entries(self) -> list[Entry]:
        """The output tensors as a writer's plan (names, output dtypes, shapes, tied aliases)."""
        return [Entry(t.name, t.out_dtype, t.shape, t.alias_of) for t in self.tensors]

    def fingerprint(self) -> tuple[list[str], str]:
        """What must be the same for every rank of one merge: the inputs (path, size and weight,
        in order) and a digest of those plus every output tensor (name, shape, dtypes, kind, tie)
        and every weight vector.

        Example::

            files, digest = plan.fingerprint()
        """
        files = [f"{os.fspath(i.path)} ({i.size} bytes, weight {i.weight!r})" for i in self.inputs]
        h = hashlib.sha256("\n".join(files).encode())
        for t in self.tensors:
            h.update(f"\n{t.name}|{t.shape}|{t.out_dtype}|{t.acc_dtype}|{t.kind}|{t.alias_of}".encode())
        for w in self.variants or [self.weights]:
            h.update(repr((w.coeffs, w.divisor)).encode())
        return files, h.hexdigest()

    def provenance(self) -> dict[str, str]:
        """String metadata recorded in the output (safetensors ``__metadata__``)."""
        files = [
            {"file": os.fspath(i.path), "weight": w, "epoch": i.epoch, "step": i.step}
            for i, w in zip(self.inputs, self.weights.values)
        ]
        meta = {
            "format": "pt",
            "ckptavg_version": __version__,
            "ckptavg_method": self.weights.description,
            "ckptavg_inputs": json.dumps(files, separators=(",", ":")),
        }
        # the model the output stands for is at the step of the last input it uses (a post-hoc EMA
        # reconstructed --at T gives the snapshots after T no weight: its step is T's, not theirs)
        used = [i for i, w in zip(self.inputs, self.weights.values) if w != 0] or self.inputs
        last = used[-1]
        if last.step is not None:
            meta["step"] = str(last.step)
        if last.epoch is not None:
            meta["epoch"] = str(last.epoch)
        return meta

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the plan."""
        return {
            "method": self.weights.description,
            "amplification": self.weights.amplification,
            "fit_error": self.weights.fit_error,
            "order": self.order_rule,
            "selection": self.selection,
            "candidates": self.candidates,
            "inputs": [
                {"path": os.fspath(i.path), "format": i.format, "weights_key": i.weights_key, "epoch": i.epoch,
                 "step": i.step, "weight": i.weight, "metrics": i.metrics, "bytes": i.size,
                 "sigma_rel": i.sigma_rel}
                for i in self.inputs
            ],
            "tensors": len(self.tensors),
            "averaged": sum(t.kind == "average" for t in self.tensors),
            "copied_from_last": sum(t.kind == "copy" for t in self.tensors),
            "tied": sum(t.alias_of is not None for t in self.tensors),
            "output": os.fspath(self.output) if self.output else None,
            "output_bytes": self.output_bytes,
            "read_bytes": self.read_bytes,
            "notes": self.notes,
            **({"amplifications": [w.amplification for w in self.variants]} if self.variants else {}),
            # several outputs from one pass: each one's own method and weights (the fields above are the first's)
            **({"variants": [{"method": w.description, "weights": list(w.values), "amplification": w.amplification,
                              "fit_error": w.fit_error} for w in self.variants]} if self.variants else {}),
        }

    def format(self) -> str:
        """The human-readable plan printed by ``--dry-run`` (see :mod:`ckptavg.plan_text`)."""
        from .plan_text import format_plan

        return format_plan(self)

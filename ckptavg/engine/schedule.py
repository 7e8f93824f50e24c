"""The schedule of a run: the output cut into units of packed segments, the file reads that
fill them (joined into runs, cut into cache-sized blocks), read-ahead advice, the chunk size and
the number of workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..io import TensorRef
from ..plans import MergePlan
from ..settings import WORKERS_ENV, env_int

__all__ = ["DEFAULT_CHUNK_ELEMS", "BLOCK_ELEMS", "MAX_WORKERS", "MAX_GAP", "Unit", "Seg",
           "auto_chunk", "cut_units", "file_runs", "blocks", "advise", "worker_count"]

#: elements per chunk at most (float32: 8 MB per buffer); override with CKPTAVG_CHUNK_ELEMS
DEFAULT_CHUNK_ELEMS = 1 << 21
#: elements of one input read and added at a time on the CPU: the block (512 KiB of float32)
#: and its part of the accumulator stay in a core's L2 cache between the read and the add
#: (measured here on the reference case: 1.15 s with 512 KiB blocks, 1.6-1.85 s with 256 KiB,
#: and reads of 8 MiB ran at two thirds the speed of 512 KiB ones)
BLOCK_ELEMS = 1 << 17
#: worker threads at most (reading scales with cores until memory bandwidth runs out)
MAX_WORKERS = 4
#: bytes of unrelated file data read through (into a scratch buffer) to join two reads into one
MAX_GAP = 4096


def auto_chunk(plan: MergePlan, workers: int = 1) -> int:
    """Half the largest averaged tensor, at least 256K elements (so per-chunk overhead stays
    negligible) and at most 2M elements (1M with a float64 accumulator: 8 MB per accumulator
    either way) for up to two workers, less beyond (each worker has a chunk in flight, so
    memory stays about the same: 1.2M elements with four)."""
    avg = [t for t in plan.tensors if t.kind == "average"]
    largest = max((t.numel for t in avg), default=1)
    wide = any(t.acc_dtype is not None and t.acc_dtype.itemsize > 4 for t in avg)
    cap = min(DEFAULT_CHUNK_ELEMS, DEFAULT_CHUNK_ELEMS * 3 // (workers + 1)) // (2 if wide else 1)
    return min(cap, max(1 << 18, -(-largest // 2)))


# ------------------------------------------------------------------------------------------
# The schedule: units of packed segments, and the reads that fill them
# ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Unit:
    """A piece of the output stream: averaged segments (packed in the accumulator, all of one
    dtype signature) and copied segments (packed in a copy buffer), in plan order."""

    key: tuple | None = None  # (input dtypes, accumulator dtype, output dtype) of the averaged part
    avg: list[tuple[int, int, int, int]] = field(default_factory=list)  # (tensor, elem0, count, acc offset)
    copy: list[tuple[int, int, int, int]] = field(default_factory=list)  # (tensor, byte0, nbytes, buffer offset)
    n: int = 0  # averaged elements
    copy_bytes: int = 0
    pieces: list[tuple[bool, int, int]] = field(default_factory=list)  # (from copy buffer, lo, hi) in order
    done: list[int] = field(default_factory=list)  # tensors whose last bytes are in this unit
    averaged: int = 0
    copied: int = 0

    def add_piece(self, is_copy: bool, lo: int, hi: int) -> None:
        if self.pieces and self.pieces[-1][0] == is_copy and self.pieces[-1][2] == lo:
            self.pieces[-1] = (is_copy, self.pieces[-1][1], hi)
        else:
            self.pieces.append((is_copy, lo, hi))


def cut_units(plan: MergePlan, chunk: int, copy_cap: int, acc_of: list[torch.dtype | None],
              numels: list[int]) -> Iterator[Unit]:
    u = Unit()
    for j, pt in enumerate(plan.tensors):
        numel = numels[j]
        if pt.alias_of is not None or numel == 0:
            continue
        if pt.kind == "copy":
            total = pt.refs[-1].nbytes
            if u.copy_bytes + total > copy_cap and (u.n or u.copy_bytes):
                yield u
                u = Unit()
            b0 = 0
            while b0 < total:
                n = min(copy_cap - u.copy_bytes, total - b0)
                u.copy.append((j, b0, n, u.copy_bytes))
                u.add_piece(True, u.copy_bytes, u.copy_bytes + n)
                u.copy_bytes += n
                b0 += n
                if b0 >= total:
                    u.done.append(j)
                    u.copied += 1
                if u.copy_bytes >= copy_cap:
                    yield u
                    u = Unit()
            continue
        acc = acc_of[j]
        assert acc is not None
        key = (tuple(r.dtype for r in pt.refs), acc, pt.out_dtype)
        if (u.key is not None and u.key != key) or (u.n and u.n + numel > chunk):
            yield u
            u = Unit()
        e0 = 0
        osz = pt.out_dtype.itemsize
        while e0 < numel:
            n = min(chunk - u.n, numel - e0)
            u.key = key
            u.avg.append((j, e0, n, u.n))
            u.add_piece(False, u.n * osz, (u.n + n) * osz)
            u.n += n
            e0 += n
            if e0 >= numel:
                u.done.append(j)
                u.averaged += 1
            if u.n >= chunk:
                yield u
                u = Unit()
    if u.n or u.copy_bytes:
        yield u


def file_runs(parts: list[tuple[TensorRef, int, int, int]]) -> list[tuple[Any, int, list[tuple[int, int]]]]:
    """Group (ref, byte start in the tensor, nbytes, buffer offset) reads into file runs: one
    ``preadv`` each, with short gaps of unrelated bytes read into a scratch buffer. Returns
    (InputFile or TensorRef, file offset or byte start, [(buffer offset or -gap, nbytes)])."""
    runs: list[tuple[Any, int, list[tuple[int, int]]]] = []
    end = -1
    cur_file = None
    for ref, start, n, dst in parts:
        if not ref.direct:
            runs.append((ref, start, [(dst, n)]))
            cur_file = None
            continue
        off = ref.offset + start
        if cur_file is ref.file and 0 <= off - end <= MAX_GAP and len(runs[-1][2]) < 500:
            iov = runs[-1][2]
            if off > end:
                iov.append((-1, off - end))
            iov.append((dst, n))
        else:
            runs.append((ref.file, off, [(dst, n)]))
            cur_file = ref.file
        end = off + n
    return runs


Seg = tuple[int, int, int, int]  # (tensor, first element, elements, accumulator offset)


def blocks(segs: list[Seg], size: int) -> Iterator[tuple[int, int, list[Seg]]]:
    """Cut a unit's averaged segments into blocks of at most ``size`` elements: (first
    accumulator element, elements, segments inside the block)."""
    cur: list[Seg] = []
    start = fill = 0
    for j, e0, n, off in segs:
        while n:
            m = min(n, size - fill)
            cur.append((j, e0, m, off))
            fill += m
            e0 += m
            off += m
            n -= m
            if fill == size:
                yield start, fill, cur
                start += fill
                cur, fill = [], 0
    if cur:
        yield start, fill, cur


def advise(plan: MergePlan, unit: Unit, active: list[int]) -> None:
    """Ask the kernel to start reading the unit's byte ranges of every input (read-ahead)."""
    spans: dict[Any, list[int]] = {}
    for j, e0, n, _ in unit.avg:
        for i in active:
            r = plan.tensors[j].refs[i]
            if r.direct:
                lo, hi = r.offset + e0 * r.itemsize, r.offset + (e0 + n) * r.itemsize
                s = spans.setdefault(r.file, [lo, hi])
                s[0], s[1] = min(s[0], lo), max(s[1], hi)
    for j, b0, n, _ in unit.copy:
        r = plan.tensors[j].refs[-1]
        if r.direct:
            s = spans.setdefault(r.file, [r.offset + b0, r.offset + b0 + n])
            s[0], s[1] = min(s[0], r.offset + b0), max(s[1], r.offset + b0 + n)
    for f, (lo, hi) in spans.items():
        f.advise_willneed(lo, hi - lo)


def worker_count() -> int:
    """Threads that read and accumulate at the same time: one per core, at most 4 (reading
    from the page cache is a memory copy that one core does at a few GB/s); under torchrun the
    cores are shared among the node's ranks (``LOCAL_WORLD_SIZE``). ``CKPTAVG_WORKERS``
    overrides.

    Example::

        worker_count()  # 2 on a 2-core machine
    """
    n = env_int(WORKERS_ENV)
    if n is not None:
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, min(MAX_WORKERS, cores // ranks))



"""Merging across the ranks of ``torch.distributed`` (torchrun), into one sharded safetensors folder
or one DCP folder (``-o NAME.dcp``: rank R writes ``__R_0.distcp``, rank 0 the ``.metadata`` from
every rank's chunk records, exchanged in the agreement after writing).

With ``--bn-spec`` (precise mode only) every rank averages the whole model in memory, the
recalibration runs batch ``k`` of the spec's loader on rank ``k % world`` and combines the
per-layer moments with ``all_reduce`` (:func:`ckptavg.bn.core._combine_ranks`), and each rank
writes its share of the recalibrated tensors.

``torchrun --nproc-per-node K -m ckptavg merge IN... -o OUT/`` (or ``ckptavg.merge`` called on every
rank of an initialised process group) splits the output tensors across the K ranks:

* **Partition** (:func:`partition`): every rank builds the same plan (headers only) and computes the
  same split from it: the tensors in plan order, cut into K contiguous runs of about equal cost
  (bytes read plus bytes written). A tied tensor (an alias of an earlier entry) goes to the rank
  that owns its source, so each rank can write its copy from its own shard.
* **Streaming**: each rank runs the one engine (:func:`ckptavg.engine.run`) on a plan restricted
  to its tensors, with the chunk size of the whole plan (so every element is computed exactly as
  in a single-process merge), and writes its own shard files ``model-0000k-of-0000n.safetensors``
  (global numbering, known to every rank from the plan) into one temporary folder beside the
  destination, created by rank 0. Rank 0 also writes ``model.safetensors.index.json`` and copies
  the model folder's config and tokenizer files.
* **Agreement**: after planning, after writing and after publishing, the ranks exchange
  ``(ok, message)`` with ``all_gather_object``. The folder is renamed into place by rank 0 only if
  every rank succeeded; otherwise every rank removes what it wrote, rank 0 removes the temporary
  folder, every rank raises (the CLI exits non-zero) and only one rank prints the error: rank 0, or
  the failing rank when that is rank 0. A rank that dies makes the collectives of the others fail
  (gloo notices the closed connection) or time out (``CKPTAVG_DIST_TIMEOUT`` seconds, default 1800).

Without a shared file system, ranks on other nodes do not see rank 0's temporary folder: the first
rank of such a node creates a folder of the same name locally, its ranks write their shards there,
and after rank 0 has published, that folder is renamed to the destination on that node (replacing
that node's part of an earlier merge, which every node's check of the destination recognises by the
shards' ckptavg metadata); if that move fails, every rank fails and the part stays, complete,
where the error says. The user then has the index, the config files and rank 0's shards on rank
0's node, and each other node's shards on that node: copying them into one folder gives the
complete model.

ckptavg joins the process group itself under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set;
gloo on CPU, nccl with ``--device cuda``, one GPU per rank by ``LOCAL_RANK``) unless one is already
initialised, and destroys only a group it created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import CkptavgError, DistributedError, OptionError, OutputError
from .io.dcp_out import DcpPartWriter, check_dcp_destination, data_name, write_dcp_metadata
from .io.files import TMP_SUFFIX, make_parent, publish_folder, remove_created, signals_blocked
from .io.hf_folder_out import ShardedSafetensorsWriter, check_destination, folder_extras, shard_names
from .io.writer import Entry, StreamWriter
from .options import MergeOptions
from .planner import MergePlan, PlannedTensor

__all__ = ["active", "partition", "shard_layout", "ShardLayout", "merge", "TIMEOUT_ENV"]

#: seconds a rank waits in a collective for the others (default 1800, as torch's own default)
TIMEOUT_ENV = "CKPTAVG_DIST_TIMEOUT"
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def active(distributed: bool | None = None) -> bool:
    """Whether a merge runs across ranks: ``distributed`` if given, else True under torchrun
    (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) or inside an initialised process group.

    Example::

        if ckptavg.distributed.active():
            print("this merge will be split across", os.environ["WORLD_SIZE"], "ranks")
    """
    if distributed is not None:
        return bool(distributed)
    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in _TORCHRUN_ENV)


_FAILING = False


def _set_failing(value: bool) -> None:
    global _FAILING
    _FAILING = value


_JOINED = False


def joined() -> bool:
    """True once this process joined (and left) a process group for a merge under torchrun: the
    command line then exits without the interpreter's teardown, as after a failure (gloo's
    destructors and torchrun's SIGTERM have nothing left to do there but can still abort the exit).

    Example::

        if ckptavg.distributed.joined():
            os._exit(0)
    """
    return _JOINED


def failing() -> bool:
    """True once the ranks agreed that this merge failed: the process is on its way out (the CLI's
    SIGTERM handler, which torchrun triggers when another rank exits, then lets it print its error).

    Example::

        if ckptavg.distributed.failing():
            return
    """
    return _FAILING


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        raise OptionError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise OptionError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def _cost(t: PlannedTensor, coeffs: Sequence[float]) -> int:
    if t.alias_of is not None:
        return 0  # written by the owner of its source
    if t.kind == "copy":
        return t.refs[-1].nbytes + t.nbytes
    return sum(r.nbytes for r, c in zip(t.refs, coeffs) if c != 0) + t.nbytes


def partition(costs: Sequence[int], world: int, alias_of: Sequence[int | None] | None = None) -> list[int]:
    """The rank owning each item: contiguous runs in order, of about ``sum(costs) / world`` each
    (an item goes to the rank whose share holds its midpoint); an alias goes to its source's rank.
    Deterministic: every rank computes the same list.

    Example::

        partition([4, 4, 4, 4], 2)            # [0, 0, 1, 1]
        partition([4, 4, 0], 2, [None, None, 0])  # [0, 1, 0]: the alias follows its source
    """
    if world < 1:
        raise ValueError("world must be at least 1")
    alias_of = alias_of or [None] * len(costs)
    total = sum(c for c, a in zip(costs, alias_of) if a is None)
    owner: list[int] = []
    before = 0
    for c, a in zip(costs, alias_of):
        if a is not None:
            owner.append(owner[a])
            continue
        owner.append(0 if total == 0 else min(world - 1, (2 * before + c) * world // (2 * total)))
        before += c
    return owner


@dataclass
class ShardLayout:
    """The output folder as every rank sees it: which rank and which shard holds each entry."""

    owner: list[int]  # rank per entry
    shard_of: list[int]  # global shard index per entry
    names: list[str]  # shard file names (global numbering)
    shard_rank: list[int]  # rank writing each shard

    def local(self, rank: int) -> list[int]:
        """Indices of the entries ``rank`` writes, in plan order."""
        return [i for i, r in enumerate(self.owner) if r == rank]


def shard_layout(entries: Sequence[Entry], owner: Sequence[int], world: int, shard_size: int) -> ShardLayout:
    """Shards per rank (each rank's entries cut as a single-process folder writer cuts them: a new
    shard when the next tensor would pass ``shard_size``), numbered globally in rank order.

    Example::

        lay = shard_layout(plan.entries(), partition(costs, 2), 2, 5 * 10**9)
        lay.names  # ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    shard_of = [0] * len(entries)
    shard_rank: list[int] = []
    for r in range(world):
        sizes: list[int] = []
        for i in (i for i, o in enumerate(owner) if o == r):
            n = entries[i].nbytes
            if not sizes or (sizes[-1] > 0 and sizes[-1] + n > shard_size):
                sizes.append(0)
                shard_rank.append(r)
            sizes[-1] += n
            shard_of[i] = len(shard_rank) - 1
    if not shard_rank:
        shard_rank.append(0)  # no tensors: rank 0 writes one empty model.safetensors
    return ShardLayout(list(owner), shard_of, shard_names(len(shard_rank)), shard_rank)


class _RankPart:
    """Publishing, for both rank writers: rank 0 renames the shared temporary folder into place
    after every rank agreed (:meth:`commit`); a rank that made its node's own temporary folder (no
    shared file system with rank 0) renames that one on its node after rank 0 published
    (:meth:`commit_node`)."""

    dest: Path
    tmp: Path
    mode: str
    _done: bool

    def commit(self) -> None:
        """Rename the shared temporary folder into place (rank 0, after every rank agreed)."""
        try:
            with signals_blocked():
                publish_folder(self.tmp, self.dest, self.mode)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot move the finished folder into place: {e.strerror}") from None
        self._done = True

    def keep(self) -> None:
        """Rank 0 has published: from here on no failure removes this rank's files."""
        self._done = True

    def commit_node(self, mode: str) -> None:
        """Rename this node's own temporary folder into place on this node (``mode``: what this
        node's check of the destination found), after :meth:`keep`; if it cannot be moved, the
        error says where it stays."""
        try:
            with signals_blocked():
                publish_folder(self.tmp, self.dest, mode)
        except OSError as e:
            raise OutputError(f"{self.dest}: this node's part stays in {self.tmp}: cannot move it into place "
                              f"({e.strerror})") from None


class _RankShardWriter(_RankPart, ShardedSafetensorsWriter):
    """One rank's part of a folder output: its shards (global names) in a shared temporary folder.
    Rank 0 also writes the index and copies the model files; publishing is done by :func:`merge`."""

    def __init__(self, dest: Path, tmp: Path, entries: Sequence[Entry], layout: ShardLayout, rank: int,
                 metadata: dict[str, str], mode: str, copy_source: Path | None,
                 config_dtype: torch.dtype | None) -> None:
        self.dest = dest
        self.mode = mode
        self.metadata = dict(metadata)
        self.metadata.setdefault("format", "pt")
        self.copy_source = copy_source if rank == 0 else None
        self.copy_files = folder_extras(copy_source) if (rank == 0 and copy_source is not None) else []
        self.config_dtype = config_dtype
        self.names = layout.names
        self.total_size = sum(e.nbytes for e in entries)
        self.total_parameters = sum(e.nbytes // e.dtype.itemsize for e in entries)
        self.weight_map = {e.name: layout.names[k] for e, k in zip(entries, layout.shard_of)}
        self.copied: list[str] = []
        self.tmp = tmp
        self.rank = rank
        local = _local_entries(entries, layout.local(rank))
        self._mine = [k for k, r in enumerate(layout.shard_rank) if r == rank]
        self._lay_out(local, [layout.shard_of[g] for g in layout.local(rank)], self._mine)
        StreamWriter.__init__(self, local)

    def finish(self) -> None:
        """Close this rank's last shard (rank 0: also the index and the copied files)."""
        self._check_complete()
        for k in self._mine:
            if not self._shard_path(k).exists():
                self._open_shard(k)  # a shard of empty tensors only
        self._close_shard()
        if self.rank == 0:
            self._write_index()
            self._copy_extras()

    def abort(self) -> None:
        """Remove this rank's own files (the folder itself is removed by its creator)."""
        if self._done:
            return
        self._done = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        for k in self._mine:
            try:
                self._shard_path(k).unlink()
            except OSError:
                pass


class _Group:
    """Membership of the default process group: joined here unless one exists already."""

    def __init__(self, device: str) -> None:
        self.created = False
        if not dist.is_available():
            raise DistributedError("torch.distributed is not available in this build of torch")
        if dist.is_initialized():
            return
        missing = [k for k in (*_TORCHRUN_ENV, "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(
                f"a merge across ranks needs torchrun (or an initialised process group); {', '.join(missing)} "
                "not set")
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=_timeout()))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the process group: {_first_line(e)}") from None
        self.created = True

    def leave(self, clean: bool = False) -> None:
        """Destroy a group joined here. After a success every rank first waits for the others
        (a barrier), so that no rank tears down gloo while a peer is still finishing its last
        exchange (that aborted the process with "terminate called without an active exception")."""
        if self.created and dist.is_initialized():
            if clean:
                try:
                    dist.barrier()
                except Exception:
                    pass
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # gloo/c10d source locations
    return text.split(". This is typically", 1)[0]


def _quiet(e: BaseException) -> BaseException:
    """Mark an error so that the CLI does not print it on this rank (another rank does)."""
    e.ckptavg_quiet = True  # type: ignore[attr-defined]
    return e


def _uninterrupted(fn: Callable[[], None]) -> None:
    """Run cleanup with SIGTERM deferred (torchrun sends it to every worker when one fails)."""
    pending: list[int] = []
    try:
        old = signal.signal(signal.SIGTERM, lambda s, f: pending.append(s))
    except ValueError:  # not the main thread
        fn()
        return
    try:
        fn()
    finally:
        signal.signal(signal.SIGTERM, old)
        if pending and callable(old):
            old(signal.SIGTERM, None)


class _Ranks:
    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def agree(self, err: BaseException | None, payload: Any = None, lost: str = "nothing was published",
              left: str = "nothing was published") -> list[Any]:
        """Exchange (error message, payload) with every rank; raise if any rank failed (``lost``,
        ``left``: what the output's state is when contact is lost, when a rank failed)."""
        msg = None
        code = 1
        if err is not None:
            msg = str(err) if isinstance(err, CkptavgError) else f"{type(err).__name__}: {_first_line(err)}"
            code = getattr(err, "exit_code", 1)
        got: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(got, (msg, code, payload))
        except Exception as e:  # a rank died or did not answer in time
            _set_failing(True)
            raise DistributedError(
                f"rank {self.rank} of {self.world} lost contact with the other ranks ({_first_line(e)}); {lost} "
                "(if only some ranks call ckptavg.merge, pass distributed=False)") from None
        failed = [(r, m, c) for r, (m, c, _) in enumerate(got) if m is not None]
        if failed:
            _set_failing(True)
            # Every rank now ignores torchrun's SIGTERM (see failing()); wait until all of them do before
            # any exits: a quiet rank exiting first makes torchrun terminate the rank that is to print.
            try:
                dist.barrier()
            except Exception:
                pass
            if err is None:
                r, m, c = failed[0]
                err = DistributedError(f"{m} (on rank {r} of {self.world}; {left})")
                err.exit_code = c  # type: ignore[attr-defined]
            err.ckptavg_agreed = True  # type: ignore[attr-defined]
            raise _quiet(err) if self.rank != 0 else err
        return [p for _, _, p in got]


def _engine_device(device: str) -> str:
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per rank
    return device


def merge(inputs: Any, output: str | os.PathLike[str], opts: MergeOptions) -> Any:
    """Merge across the ranks of ``torch.distributed`` into a sharded safetensors folder; returns
    the :class:`~ckptavg.outputs.MergeReport` (bytes summed over the ranks; ``extra["rank"]``).
    Called by :func:`ckptavg.merge` when :func:`active`; call that instead.

    Example::

        # torchrun --nproc-per-node 4 my_merge.py
        report = ckptavg.merge("runs/", "soup/")  # every rank calls it; rank 0 writes the index
    """
    _set_failing(False)
    group = _Group(opts.device)
    try:
        report = _merge(inputs, output, opts, _Ranks())
    except BaseException:
        group.leave()
        raise
    group.leave(clean=True)
    if group.created:
        global _JOINED
        _JOINED = True
    return report


def _local_entries(entries: Sequence[Entry], mine: Sequence[int]) -> list[Entry]:
    """``entries[g] for g in mine``, with alias indices renumbered within ``mine``."""
    pos = {g: j for j, g in enumerate(mine)}
    return [Entry(entries[g].name, entries[g].dtype, entries[g].shape,
                  None if entries[g].alias_of is None else pos[entries[g].alias_of]) for g in mine]


class _RankDcpWriter(_RankPart, DcpPartWriter):
    """One rank's part of a DCP output: its tensors in ``__{rank}_0.distcp`` of the shared temporary
    folder. Rank 0 writes ``.metadata`` from every rank's records (:meth:`write_metadata`) and
    publishes (:meth:`commit`)."""

    def __init__(self, dest: Path, tmp: Path, entries: Sequence[Entry], mine: Sequence[int], rank: int,
                 mode: str) -> None:
        self.tmp = tmp
        self.mode = mode
        self.rank = rank
        self._done = False
        super().__init__(dest, tmp, data_name(rank), _local_entries(entries, mine))

    def write_metadata(self, entries: Sequence[Entry], records: dict[str, Any], provenance: dict[str, str]) -> None:
        """Rank 0: ``.metadata`` (every rank's records) and ``ckptavg.json`` into the temporary folder."""
        try:
            write_dcp_metadata(self.tmp, entries, records, provenance)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot write the DCP metadata: {e.strerror}") from None

    def abort(self) -> None:
        """Remove this rank's data file (the folder itself is removed by its creator)."""
        if self._done:
            return
        self._done = True
        super().abort()


def _merge(inputs: Any, output: str | os.PathLike[str], opts: MergeOptions, ranks: _Ranks) -> Any:
    from .engine import _auto_chunk, resolve_device, run, worker_count
    from .io import feed, output_kind
    from .io.memory_out import MemoryWriter
    from .outputs import MergeReport, check_output_options
    from .planner import build_plan, parse_dtype

    t0 = time.perf_counter()
    rank, world = ranks.rank, ranks.world
    p: MergePlan | None = None
    tmp: Path | None = None
    created: list[Path] = []
    writer: _RankShardWriter | _RankDcpWriter | None = None
    owns_tmp = rank == 0
    spec: Any = None
    bn_report: Any = None

    def remove_tmp() -> None:
        if writer is not None:
            writer.abort()
        if owns_tmp and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)

    err: BaseException | None = None
    try:
        # 1. every rank plans (headers only) and checks the destination; rank 0 makes the folder
        try:
            out = Path(output)
            kind = output_kind(output)
            if kind not in ("hf-folder", "dcp"):
                raise OptionError(f"{out}: a merge across ranks (torchrun) writes a folder: give -o DIR/ (sharded "
                                  "safetensors) or -o NAME.dcp (a DCP folder)")
            if opts.keep_structure:
                raise OptionError("--keep-structure is not supported in a merge across ranks (torchrun)")
            if opts.bn_spec is not None and opts.bn_mode != "precise":
                raise OptionError("--bn-mode torch cannot be split across ranks (torchrun): its cumulative average "
                                  "depends on the order of the forward calls; use --bn-mode precise")
            shard_size = check_output_options(out, kind, opts)
            device = _engine_device(opts.device)
            resolve_device(device)
            p = build_plan(inputs, opts, out, kind)
            if kind == "hf-folder":
                mode = check_destination(out)
                for e in p.entries():  # the single-process writer's dtype check, before anything is written
                    if e.dtype not in _storable():
                        raise OutputError(f"{out}: tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot "
                                          "store")
            else:
                mode = check_dcp_destination(out)
            if opts.bn_spec is not None:
                from .bn import load_spec

                spec = load_spec(opts.bn_spec)
            if rank == 0 and not opts.dry_run:
                created = make_parent(out)
                try:
                    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
                except OSError as e:
                    raise OutputError(f"{out}: cannot write in {out.parent}: {e.strerror}") from None
        except Exception as e:
            err = e
        tmp = ranks.agree(err, os.fspath(tmp) if tmp else None)[0]
        tmp = Path(tmp) if tmp else None
        assert p is not None
        if opts.dry_run:
            return MergeReport(plan=p, output=out, dry_run=True, seconds=time.perf_counter() - t0,
                               extra={"rank": rank, "world_size": world})

        # 2. every rank streams its part into its own files (with BatchNorm: every rank averages the
        #    whole model, the recalibration is split across the ranks, each writes its part)
        entries = p.entries()
        read = 0
        records: dict[str, Any] | None = None
        layout: ShardLayout | None = None
        try:
            assert tmp is not None
            if rank != 0:
                try:
                    os.makedirs(tmp.parent, exist_ok=True)
                    os.mkdir(tmp)  # created here: no shared file system with rank 0 (see the module docs)
                    owns_tmp = True
                except FileExistsError:
                    pass
            owner = partition([_cost(t, p.weights.coeffs) for t in p.tensors], world,
                              [t.alias_of for t in p.tensors])
            mine = [g for g, o in enumerate(owner) if o == rank]
            if kind == "hf-folder":
                layout = shard_layout(entries, owner, world, shard_size)
                source = next((i.path for i in reversed(p.inputs) if i.format == "hf-folder"), None)
                writer = _RankShardWriter(out, tmp, entries, layout, rank, p.provenance(), mode, source,
                                          parse_dtype(opts.dtype))
            else:
                writer = _RankDcpWriter(out, tmp, entries, mine, rank, mode)
            # the whole plan's chunking
            chunk = int(os.environ.get("CKPTAVG_CHUNK_ELEMS", 0)) or _auto_chunk(p, worker_count())
            if spec is None:
                pos = {g: j for j, g in enumerate(mine)}
                sub = [replace(p.tensors[g],
                               alias_of=None if p.tensors[g].alias_of is None else pos[p.tensors[g].alias_of])
                       for g in mine]
                stats = run(replace(p, tensors=sub), writer, device=device, progress=opts.progress and rank == 0,
                            allow_nonfinite=opts.allow_nonfinite, chunk_elems=chunk)
            else:
                from .bn import recalibrate_state_dict

                mem = MemoryWriter(entries)
                stats = run(p, mem, device=device, progress=opts.progress and rank == 0,
                            allow_nonfinite=opts.allow_nonfinite, chunk_elems=chunk)
                mem.commit()
                ranks.agree(None)  # every rank has the model before the recalibration's collectives
                new, bn_report = recalibrate_state_dict(mem.result, spec, mode=opts.bn_mode, device=None,
                                                        progress=opts.progress and rank == 0, ranks=ranks)
                result = {**mem.result, **new}
                feed(writer, [result[entries[g].name] for g in mine if entries[g].alias_of is None])
            read = stats.bytes_read
            writer.finish()
            if isinstance(writer, _RankDcpWriter):
                records = writer.records()
        except Exception as e:
            if getattr(e, "ckptavg_agreed", False):
                raise  # every rank knows already (a collective inside the recalibration)
            err = e
            _uninterrupted(writer.abort if writer is not None else lambda: None)
        done = ranks.agree(err, (read, writer.bytes_written if writer is not None else 0, owns_tmp, records))

        # 3. rank 0 writes the DCP metadata and publishes; then ranks that wrote into a folder of their
        #    own node publish it there
        assert writer is not None
        if rank == 0:
            try:
                if isinstance(writer, _RankDcpWriter):
                    every: dict[str, Any] = {}
                    for d in done:
                        every.update(d[3])
                    prov = dict(p.provenance())
                    if bn_report is not None:
                        prov["ckptavg_bn"] = json.dumps({"mode": bn_report.mode, "layers": len(bn_report.layers),
                                                         "batches": bn_report.batches, "samples": bn_report.samples})
                    writer.write_metadata(entries, every, prov)
                writer.commit()
                tmp = None
            except Exception as e:
                err = e
        ranks.agree(err, lost="rank 0 may have published the output: check it")
        writer.keep()  # rank 0 has published: whatever happens now, no rank removes its files
        if any(d[2] for d in done[1:]):  # some nodes publish their own part: every rank learns how that went
            if rank != 0 and owns_tmp and tmp is not None:
                tmp = None  # kept too, where it is, if it cannot be moved into place
                try:
                    writer.commit_node(mode)
                except OutputError as e:
                    err = e
            ranks.agree(err, lost="rank 0 has published its part: check the other nodes' parts",
                        left="the other nodes' parts are published")
        if layout is not None:
            notes = [f"{len(layout.names)} shard{'s' if len(layout.names) != 1 else ''} written by {world} "
                     f"rank{'s' if world != 1 else ''}"]
            extra = {"shards": list(layout.names), "rank_of_shard": list(layout.shard_rank)}
        else:
            notes = [f"DCP folder, {world} data file{'s' if world != 1 else ''} written by {world} "
                     f"rank{'s' if world != 1 else ''}"]
            extra = {"data_files": [data_name(r) for r in range(world)]}
        if any(d[2] for d in done[1:]):
            notes.append("no shared file system: other nodes hold their own part under the same path")
        extra.update({"rank": rank, "world_size": world, "output_notes": notes})
        return MergeReport(plan=p, output=out, bytes_written=sum(d[1] for d in done),
                           bytes_read=sum(d[0] for d in done), seconds=time.perf_counter() - t0, bn=bn_report,
                           extra=extra)
    except BaseException:
        _uninterrupted(remove_tmp)
        raise
    finally:
        if p is not None:
            for i in p.inputs:
                i.checkpoint.close()


def _storable() -> set[torch.dtype]:
    from .io.dtypes import TORCH_TO_SAFETENSORS

    return set(TORCH_TO_SAFETENSORS)

"""The ranks of ``torch.distributed`` (torchrun) as a group of the one merge driver
(:mod:`ckptavg.pipeline`): :class:`Ranks` partitions the work, opens each rank's part of the
output (through the output kind: a sharded safetensors folder, or a DCP folder ``-o NAME.dcp``
in which rank R writes ``__R_0.distcp`` and rank 0 the ``.metadata`` from every rank's chunk
records, exchanged in the agreement after writing), agrees on success and publishes. This module
holds only what differs from one process: joining the group, the partition, the agreement and
the publishing protocol.

With ``--bn-spec`` (precise mode only) every rank averages the whole model in memory, the
recalibration runs batch ``k`` of the spec's loader on rank ``k % world`` and combines the
per-layer moments with ``all_reduce`` (see :mod:`ckptavg.bn`), and each rank
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

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import CkptavgError, DistributedError, OptionError, OutputError
from .io.files import TMP_SUFFIX, make_parent, remove_created
from .io.kinds import OutputSetup, RankPart
from .io.remote_out import temporary_prefix
from .io.urls import as_path, is_remote
from .io.writer import Entry, Writer
from .options import MergeOptions
from .plans import MergePlan, PlannedTensor
from .settings import CHUNK_ENV, TIMEOUT_ENV, env_int, env_seconds

if TYPE_CHECKING:
    from .pipeline import Target

__all__ = ["active", "partition", "merge", "session", "Ranks"]

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
            timeout = timedelta(seconds=env_seconds(TIMEOUT_ENV, 1800))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
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


class Ranks:
    """The ranks of the default process group as the merge driver's group
    (:class:`ckptavg.pipeline.Group`): each rank averages and writes its share of the tensors into
    its part of the output, the ranks agree after every phase, and rank 0 publishes."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.tmp: Path | None = None  # the temporary folder of the output (rank 0's, or this node's own)
        self.owns_tmp = self.rank == 0  # whether this process made it (and removes it on failure)
        self.created: list[Path] = []  # parent folders rank 0 made for the output
        self.owner: list[int] = []  # the rank of each planned tensor
        self.nodes = False  # whether some nodes publish their own part (no shared file system)

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
                err.exit_code = c
            err.ckptavg_agreed = True  # type: ignore[attr-defined]
            raise _quiet(err) if self.rank != 0 else err
        return [p for _, _, p in got]

    def check(self, opts: MergeOptions, targets: Sequence[Target]) -> None:
        """Refuse what cannot be split across ranks, before anything is read."""
        if len(targets) > 1:
            raise OptionError("several outputs from one pass are not supported across ranks yet; run one merge "
                              "per output under torchrun")
        for t in targets:
            if not t.kind.parts:
                t.kind.open_part(t.dest, [], {}, OutputSetup(), RankPart(t.dest, self.rank, self.world, [], ""))
        if opts.keep_structure:
            raise OptionError("--keep-structure is not supported in a merge across ranks (torchrun)")
        if opts.bn_spec is not None and opts.bn_mode != "precise":
            raise OptionError("--bn-mode torch cannot be split across ranks (torchrun): its cumulative average "
                              "depends on the order of the forward calls; use --bn-mode precise")

    def device(self, device: str) -> str:
        """One GPU per rank (by ``LOCAL_RANK``) with ``--device cuda``."""
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
        return device

    def prepare(self, targets: Sequence[Target], err: BaseException | None, plan: MergePlan | None) -> None:
        """Rank 0 makes the temporary folder beside the destination; every rank learns its name,
        whether every rank planned, and whether every rank planned the same merge: a checkpoint
        that appeared between two ranks' discovery (training still writing), or nodes whose
        folders differ, would otherwise average some tensors over other checkpoints than others."""
        tmp = None
        if err is None and self.rank == 0 and targets and is_remote(targets[0].dest):
            tmp = temporary_prefix(targets[0].dest)  # a prefix in the store: each rank uploads its part there
        elif err is None and self.rank == 0 and targets:
            out = targets[0].dest
            try:
                self.created = make_parent(out)
                try:
                    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
                except OSError as e:
                    raise OutputError(f"{out}: cannot write in {out.parent}: {e.strerror}") from None
            except Exception as e:
                err = e
        self.tmp = tmp
        mine = plan.fingerprint() if plan is not None and err is None else None
        got = self.agree(err, (os.fspath(tmp) if tmp else None, mine))
        self.tmp = as_path(got[0][0]) if got[0][0] else None
        self.agree(_plans_differ([fp for _tmp, fp in got]))

    def share(self, plan: MergePlan) -> tuple[list[int], int | None]:
        """This rank's tensors (contiguous runs of about equal cost, :func:`partition`) and the
        chunk size of the whole plan, so that every element is computed as in one process."""
        self.owner = partition([_cost(t, plan.weights.coeffs) for t in plan.tensors], self.world,
                               [t.alias_of for t in plan.tensors])
        from .engine import auto_chunk, worker_count

        chunk = env_int(CHUNK_ENV, minimum=0) or auto_chunk(plan, worker_count())
        return [g for g, o in enumerate(self.owner) if o == self.rank], chunk

    def open(self, target: Target, entries: Sequence[Entry], metadata: Mapping[str, str],
             setup: OutputSetup) -> Writer:
        """This rank's part of the output, in the temporary folder (made here when this node does
        not see rank 0's: no shared file system, see the module docs)."""
        assert self.tmp is not None
        if self.rank != 0 and not is_remote(self.tmp):
            try:
                os.makedirs(self.tmp.parent, exist_ok=True)
                os.mkdir(self.tmp)
                self.owns_tmp = True
            except FileExistsError:
                pass
        part = RankPart(self.tmp, self.rank, self.world, self.owner, target.mode)
        return target.kind.open_part(target.dest, entries, metadata, setup, part)

    def publish(self, writers: Sequence[Writer], err: BaseException | None, read: int) -> tuple[int, int]:
        """Finish this rank's part; when every rank succeeded, rank 0 completes and publishes the
        output; then ranks that wrote into a folder of their own node publish it there."""
        writer: Any = writers[0] if writers else None
        payload = None
        if err is None:
            try:
                payload = writer.finish()
            except Exception as e:
                err = e
        if err is not None:
            _uninterrupted(writer.abort if writer is not None else lambda: None)
        done = self.agree(err, (read, writer.bytes_written if writer is not None else 0, self.owns_tmp, payload))
        if self.rank == 0:
            try:
                writer.complete([d[3] for d in done])
                writer.publish()
                self.tmp = None
            except Exception as e:
                err = e
        self.agree(err, lost="rank 0 may have published the output: check it")
        writer.keep()  # rank 0 has published: whatever happens now, no rank removes its files
        self.nodes = any(d[2] for d in done[1:])
        if self.nodes:  # some nodes publish their own part: every rank learns how that went
            if self.rank != 0 and self.owns_tmp and self.tmp is not None:
                self.tmp = None  # kept too, where it is, if it cannot be moved into place
                try:
                    writer.publish_node()
                except OutputError as e:
                    err = e
            self.agree(err, lost="rank 0 has published its part: check the other nodes' parts",
                       left="the other nodes' parts are published")
        return sum(d[0] for d in done), sum(d[1] for d in done)

    def abandon(self, writers: Sequence[Writer]) -> None:
        """Remove this rank's files, and the temporary folder if this process made it."""
        def remove() -> None:
            for w in writers:
                w.abort()
            if self.owns_tmp and self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            remove_created(self.created)

        _uninterrupted(remove)

    def report(self, writers: Sequence[Writer]) -> dict[str, Any]:
        """The output's shards or data files, this rank and the number of ranks."""
        extra: dict[str, Any] = dict(writers[0].report()) if writers else {}
        notes = list(extra.pop("output_notes", []))
        if self.nodes:
            notes.append("no shared file system: other nodes hold their own part under the same path")
        extra.update({"rank": self.rank, "world_size": self.world})
        if writers:
            extra["output_notes"] = notes
        return extra

    def stopping(self) -> bool:
        """Never for a merge (a watcher across ranks asks, see :mod:`ckptavg.watcher.ranks`)."""
        return False


def _plans_differ(prints: list[Any]) -> DistributedError | None:
    """The error every rank raises when the ranks' plans differ (naming the first difference)."""
    files0, digest0 = prints[0]
    for r, (files, digest) in enumerate(prints[1:], 1):
        if digest == digest0:
            continue
        if len(files) != len(files0):
            only = sorted({f.split(" (")[0] for f in files} ^ {f.split(" (")[0] for f in files0})
            diff = (f"rank 0 selected {len(files0)} checkpoints, rank {r} selected {len(files)}"
                    + (f"; only one of them sees {only[0]}" if only else ""))
        else:
            diff = next((f"rank 0 has {a}, rank {r} has {b}" for a, b in zip(files0, files) if a != b),
                        f"rank {r} sees other tensors than rank 0")
        return DistributedError(
            f"the ranks planned different merges ({diff}): every "
            "rank must see the same checkpoints (one written while the ranks planned, or nodes whose folders "
            "differ); nothing was read")
    return None


def merge(inputs: Any, output: str | os.PathLike[str], opts: MergeOptions) -> Any:
    """Merge across the ranks of ``torch.distributed`` into a sharded safetensors folder or a DCP
    folder; returns the :class:`~ckptavg.outputs.MergeReport` (bytes summed over the ranks;
    ``extra["rank"]``). Called by :func:`ckptavg.merge` when :func:`active`; call that instead.

    Example::

        # torchrun --nproc-per-node 4 my_merge.py
        report = ckptavg.merge("runs/", "soup/")  # every rank calls it; rank 0 writes the index
    """
    from .pipeline import merge_into

    with session(opts.device):
        return merge_into(inputs, output, opts, Ranks())


@contextmanager
def session(device: str) -> Iterator[None]:
    """The default process group for one command across ranks: joined here under torchrun
    (unless one is initialised already), left at the end, cleanly (after a barrier) when the
    body succeeded; the CLI then exits at once (see :func:`joined`).

    Example::

        with ckptavg.distributed.session("cpu"):
            report = merge_into(inputs, output, opts, Ranks())
    """
    _set_failing(False)
    group = _Group(device)
    try:
        yield
    except BaseException:
        group.leave()
        raise
    group.leave(clean=True)
    if group.created:
        global _JOINED
        _JOINED = True

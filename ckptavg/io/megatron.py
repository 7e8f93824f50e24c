"""Megatron-LM / NeMo ``torch_dist`` checkpoints: the facts shared by reading and writing them.

A checkpoint is an iteration folder ``iter_XXXXXXX/`` (seven digits) holding a DCP checkpoint
(``.metadata``, ``__R_N.distcp``) plus two sidecars: ``metadata.json`` naming the backends
(``{"sharded_backend": "torch_dist", ...}``) and ``common.pt``, a ``torch.save`` of what is not
sharded (``iteration``, ``args``, ``checkpoint_version``...). A checkpoint *root* holds the
iteration folders and ``latest_checkpointed_iteration.txt``, whose text is the newest complete
iteration or ``release`` (then the one checkpoint is ``ROOT/release/``), and is written last.

Byte entries of the DCP (Megatron's ``ShardedObject``: Transformer Engine ``_extra_state``, keyed
``NAME/shard_OFFSETS_SHAPE``) are pickles ckptavg never loads: an output copies their bytes as
they are from one input (the last selected one, or ``--extra-state-from STEP``).

``common.pt`` is loaded weights-only (with the classes :data:`~ckptavg.io.torch_in.SAFE_GLOBALS`
allows, such as ``argparse.Namespace``); one that needs more is not loaded: its iteration comes
from the folder name and an output's ``common.pt`` holds only the iteration and the provenance.

Example::

    checkpoints_of_root(Path("checkpoints/gpt"))  # [.../iter_0001000, .../iter_0002000]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointReadError
from .files import read_small_json

__all__ = ["MARKER", "CONFIG_NAME", "COMMON_NAME", "CONFIG", "ITER_RE", "iter_name", "is_megatron_folder",
           "is_megatron_root", "checkpoints_of_root", "load_common", "iteration_of", "small_torch_dict"]

MARKER = "latest_checkpointed_iteration.txt"
CONFIG_NAME = "metadata.json"
COMMON_NAME = "common.pt"
#: the ``metadata.json`` megatron-core writes for a ``torch_dist`` checkpoint (its ``CheckpointingConfig``)
CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
          "common_backend_version": 1}
ITER_RE = re.compile(r"^iter_(\d{7,})$")
_MAX_CONFIG = 1 << 16
_MAX_COMMON = 64 << 20
_MAX_MARKER = 1 << 10


def iter_name(iteration: int) -> str:
    """The folder of an iteration, as Megatron names it.

    Example::

        iter_name(2000)  # 'iter_0002000'
    """
    return f"iter_{iteration:07d}"


def is_megatron_folder(folder: Path) -> bool:
    """Whether a DCP folder is a Megatron ``torch_dist`` checkpoint (its ``metadata.json`` says so)."""
    marker = folder / CONFIG_NAME
    try:
        if not marker.is_file():
            return False
        cfg = read_small_json(marker, _MAX_CONFIG)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(cfg, dict) and cfg.get("sharded_backend") == "torch_dist"


def is_megatron_root(folder: Path) -> bool:
    """Whether ``folder`` is a Megatron checkpoint root (it holds ``latest_checkpointed_iteration.txt``)."""
    try:
        return (folder / MARKER).is_file()
    except OSError:
        return False


def checkpoints_of_root(root: Path) -> list[Path]:
    """The checkpoints of a Megatron root, as Megatron resolves it: ``ROOT/release/`` when the marker
    says ``release``; else every complete ``iter_*`` folder, in iteration order, after checking that
    the iteration the marker names is there. Raises :class:`~ckptavg.errors.CheckpointReadError`
    (one line naming the root) for an unreadable marker or one naming a missing checkpoint.

    Example::

        checkpoints_of_root(Path("ckpts"))  # [Path('ckpts/iter_0000100'), Path('ckpts/iter_0000200')]
    """
    from .dcp_in import is_dcp_folder

    marker = root / MARKER
    try:
        if marker.stat().st_size > _MAX_MARKER:
            raise CheckpointReadError(f"{root}: {MARKER} is {marker.stat().st_size} bytes, not an iteration number")
        text = marker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointReadError(f"{root}: cannot read {MARKER}: {getattr(e, 'strerror', None) or e}") from None
    if text == "release":
        release = root / "release"
        if not is_dcp_folder(release):
            raise CheckpointReadError(f"{root}: {MARKER} says 'release' but {release} is not a torch_dist checkpoint "
                                      "(no .metadata)")
        return [release]
    if not text.isdigit():
        raise CheckpointReadError(f"{root}: {MARKER} holds {text[:40]!r}, not an iteration number or 'release'")
    try:
        iters = sorted((int(m.group(1)), q) for q in root.iterdir() if (m := ITER_RE.match(q.name)) and q.is_dir())
    except OSError as e:
        raise CheckpointReadError(f"{root}: cannot list the checkpoint root: {e.strerror}") from None
    latest = int(text)
    if not any(n == latest and is_dcp_folder(q) for n, q in iters):
        raise CheckpointReadError(f"{root}: {MARKER} names iteration {latest}, but {iter_name(latest)}/ is missing "
                                  "or incomplete (no .metadata)")
    return [q for _n, q in iters if is_dcp_folder(q)]


def small_torch_dict(path: Path, limit: int) -> dict[str, Any] | None:
    """A small ``torch.save`` file holding a dict (a sidecar such as Megatron's ``common.pt`` or
    Lightning's ``meta.pt``), loaded weights-only; None when it is missing, empty, over ``limit``
    bytes, not a dict, or needs more than weights-only loading (it is then never unpickled)."""
    try:
        size = path.stat().st_size
        if size > limit or size == 0:
            return None
        from .files import input_file
        from .torch_in import _weights_only_load

        f = input_file(path, size)
        try:
            with f.open_stream() as fh:
                obj = _weights_only_load(fh, "cpu")
        finally:
            f.close()
    except Exception:  # unreadable, or not weights-only
        return None
    return obj if isinstance(obj, dict) else None


def load_common(folder: Path) -> dict[str, Any] | None:
    """``common.pt`` of a Megatron checkpoint (see :func:`small_torch_dict`)."""
    return small_torch_dict(folder / COMMON_NAME, _MAX_COMMON)


def iteration_of(common: dict[str, Any] | None) -> int | None:
    """The iteration ``common.pt`` records (a non-negative int), else None."""
    it = common.get("iteration") if common else None
    return it if isinstance(it, int) and not isinstance(it, bool) and it >= 0 else None

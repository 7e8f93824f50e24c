"""Loading a state dict into the model a spec builds, and recalibrating it from the spec's data.

The glue between :mod:`ckptavg.bn.spec` (what to build) and :mod:`ckptavg.bn.core` (the pass):
:func:`recalibrate_state_dict` builds the model, loads the state dict strictly (missing and
unexpected keys listed on one line, with a hint about ``[model].prefix``), runs the pass with
every failure of the spec's code reported as a one-line :class:`~ckptavg.errors.SpecError`, and
returns a new state dict in which only the BatchNorm statistics differ.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CkptavgError, MismatchError, OptionError, exc_text
from .core import BN_STAT_NAMES, BNReport, check_args, recalibrate_pass, total_batches
from .feed import Feed, make_feed
from .spec import BNSpec

__all__ = ["load_strictly", "recalibrate_state_dict"]

def _guarded_batches(loader: Iterable[Any], spec: BNSpec) -> Iterator[Any]:
    """Iterate ``loader``, turning its exceptions into one-line SpecErrors naming the data entry."""
    entry = spec.data_entry
    ref = spec.loader if spec.loader is not None else spec.dataset
    try:
        iterator = iter(loader)
    except Exception as exc:
        raise spec.error(entry, f"cannot iterate over what {ref!r} gave: {exc_text(exc)}") from exc
    index = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise spec.error(entry, f"{ref!r} failed producing batch {index}: {exc_text(exc)}") from exc
        yield batch
        index += 1


def _spec_feed(spec: BNSpec) -> Feed:
    call = spec.call_function
    inner = make_feed(call, spec.input)
    if call is not None:
        entry, what = "[data].call", f"{spec.call!r}"
    elif spec.input is not None:
        entry, what = "[data].input", f"the forward pass of the model (input = {spec.input!r})"
    else:
        entry, what = "[model].factory", f"the forward pass of the model from {spec.factory!r}"
    counter = itertools.count()

    def feed(model: nn.Module, batch: Any, device: torch.device | None) -> int | None:
        index = next(counter)
        try:
            return inner(model, batch, device)
        except CkptavgError as exc:
            raise spec.error("[data].input" if call is None else entry, str(exc)) from exc
        except Exception as exc:
            raise spec.error(entry, f"{what} failed on batch {index}: {exc_text(exc)}") from exc

    return feed


def _list_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _prefix_hint(state_dict: Mapping[str, Any], missing: list[str], spec: BNSpec) -> str:
    """Guess the key prefix that would make the checkpoint fit the model."""
    votes: dict[str, int] = {}
    keys = list(state_dict)
    for m in missing[:64]:
        for k in keys:
            if k != m and k.endswith(m) and k[: -len(m)].endswith("."):
                votes[k[: -len(m)]] = votes.get(k[: -len(m)], 0) + 1
    if votes:
        best = max(votes, key=lambda p: votes[p])
        return f'hint: set prefix = "{best}" in [model] of the spec'
    if spec.prefix:
        return f"hint: check [model].prefix ({spec.prefix!r}) and [model].factory"
    return (
        "hint: if the model's keys carry a prefix (Lightning 'model.', DDP 'module.', torch.compile "
        "'_orig_mod.'), set prefix in [model] of the spec"
    )


def load_strictly(model: nn.Module, state_dict: Mapping[str, Any], spec: BNSpec) -> dict[str, str]:
    """Load ``state_dict`` into ``model`` strictly, after stripping ``spec.prefix`` from the keys that carry it.

    Returns the mapping model key -> state dict key. Raises :class:`MismatchError` naming the spec
    file for missing/unexpected keys (listed, with a guess of the right ``prefix``) or wrong shapes.

    Example::

        >>> mapping = load_strictly(spec.build_model(), torch.load("swa.pt"), spec)  # doctest: +SKIP
    """
    prefix = spec.prefix
    if prefix:
        mapping = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix)}
        if not mapping:
            sample = ", ".join(list(state_dict)[:3])
            raise MismatchError(
                f"{spec.path}: [model].prefix: no key of the checkpoint starts with {prefix!r} "
                f"(keys look like {sample})"
            )
    else:
        mapping = {k: k for k in state_dict}
    sub = {mk: state_dict[k] for mk, k in mapping.items()}
    where = f"{spec.path}: the checkpoint does not fit [model].factory {spec.factory!r}"
    try:
        result = model.load_state_dict(sub, strict=False)
    except Exception as exc:  # shape mismatches raise even with strict=False
        raise MismatchError(f"{where}: {exc_text(exc)}") from exc
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_list_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_list_keys([mapping[k] for k in unexpected])}")
        raise MismatchError(f"{where}: {'; '.join(parts)}; {_prefix_hint(state_dict, missing, spec)}")
    return mapping


def recalibrate_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: BNSpec,
    *,
    mode: str = "precise",
    device: torch.device | str | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    ranks: Any = None,
) -> tuple[dict[str, torch.Tensor], BNReport]:
    """Recalibrate the BatchNorm statistics of a state dict with the model and data a spec names.

    Builds ``spec``'s model, strips ``spec.prefix`` from the keys that carry it (the keys that
    do not are passed through untouched), loads the result strictly, builds the loader and
    runs :func:`recalibrate_bn`.

    Args:
        state_dict: name -> tensor, e.g. the output of an average.
        spec: a :class:`~ckptavg.bn.BNSpec` from :func:`~ckptavg.bn.load_spec`.
        mode: ``"precise"`` or ``"torch"`` (see :func:`recalibrate_bn`).
        device: overrides the spec's ``[run].device`` (default CPU).
        progress: tqdm progress bar on stderr.
        max_batches: overrides the spec's ``[data].max_batches``.
        ranks: set by a merge across ranks (:mod:`ckptavg.distributed`): every rank passes the
            same state dict, runs batch ``k`` of the loader when ``k % world == rank`` and the
            precise moments are combined across ranks, so every rank returns the statistics a
            single process would compute over the whole loader (``precise`` mode only).

    Returns:
        ``(new_state_dict, report)``. The new dict has exactly the input's keys in the input's
        order. Only ``running_mean``, ``running_var`` and ``num_batches_tracked`` of updated
        layers differ, in the input's dtype and on the input's device; every other value is the
        very same tensor object as in the input. In precise mode the float64 statistics are
        rounded once, to the input's dtype.

    Raises:
        SpecError: the spec's code failed (factory, loader, forward/call), naming the entry.
        MismatchError: missing/unexpected keys or wrong shapes when loading, listed on one line
            with a hint about ``prefix``.
        OptionError: a bad ``mode``, ``device`` or ``max_batches``.

    Example::

        >>> spec = load_spec("bn.toml")                                            # doctest: +SKIP
        >>> new_sd, report = recalibrate_state_dict(torch.load("swa.pt"), spec)    # doctest: +SKIP
        >>> print(report.summary())                                                # doctest: +SKIP
    """
    check_args(mode, max_batches)
    dev = spec.resolve_device(device)
    if max_batches is None:
        max_batches = spec.max_batches
    model = spec.build_model()
    mapping = load_strictly(model, state_dict, spec)
    model.to(dev)
    loader = spec.build_loader()
    try:
        report, precise = recalibrate_pass(
            model,
            _guarded_batches(loader, spec),
            feed=_spec_feed(spec),
            mode=mode,
            device=dev,
            max_batches=max_batches,
            progress=progress,
            total=total_batches(loader, max_batches),
            ranks=ranks,
        )
    except OptionError as exc:
        raise spec.error(spec.data_entry, str(exc)) from exc
    out = dict(state_dict)
    if report.skipped:
        return out, report
    updated = {model.get_submodule(name) for name in report.layers}
    with torch.no_grad():
        for name, buf in model.named_buffers(remove_duplicate=False):
            owner, _, stat = name.rpartition(".")
            key = mapping.get(name)
            if stat not in BN_STAT_NAMES or key is None:
                continue
            module = model.get_submodule(owner)
            if module not in updated:
                continue
            value: torch.Tensor = buf
            if module in precise and stat != "num_batches_tracked":
                value = precise[module][0 if stat == "running_mean" else 1]
            original = state_dict[key]
            out[key] = value.detach().to(device=original.device, dtype=original.dtype).reshape(original.shape)
    return out, report

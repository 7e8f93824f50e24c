"""How a batch reaches the model: moved to the device, given as positional or keyword arguments
as the spec says, counted (the batch size, best effort)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import OptionError

__all__ = ["Feed", "to_device", "leading_dim", "describe_batch", "model_arguments", "make_feed"]

#: feeds one batch to the model on a device; returns the number of samples (None when unknown)
Feed = Callable[[nn.Module, Any, "torch.device | None"], "int | None"]


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move tensors to ``device`` recursively through tuples, lists and mappings."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        items = {k: to_device(v, device) for k, v in obj.items()}
        try:
            return type(obj)(items)  # type: ignore[call-arg]  # a Mapping subclass built from a dict
        except Exception:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def leading_dim(obj: Any) -> int | None:
    """First dimension of the first tensor found in ``obj`` (the batch size, best effort)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() >= 1 else None
    if isinstance(obj, Mapping):
        values: Iterable[Any] = obj.values()
    elif isinstance(obj, list | tuple):
        values = obj
    else:
        return None
    for value in values:
        n = leading_dim(value)
        if n is not None:
            return n
    return None


def describe_batch(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return "a tensor"
    if isinstance(batch, Mapping):
        keys = ", ".join(repr(k) for k in list(batch)[:10])
        return f"a dict with keys {keys}" if keys else "an empty dict"
    if isinstance(batch, list | tuple):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def model_arguments(batch: Any, input: int | str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments a batch gives the model (see :func:`recalibrate_bn`)."""
    if input is not None:
        if isinstance(batch, Mapping):
            if input not in batch:
                raise OptionError(f"input={input!r}: the batch is {describe_batch(batch)}; no key {input!r}")
            return (batch[input],), {}
        if isinstance(batch, list | tuple):
            if not isinstance(input, int) or not -len(batch) <= input < len(batch):
                raise OptionError(f"input={input!r}: the batch is {describe_batch(batch)}")
            return (batch[input],), {}
        raise OptionError(f"input={input!r}: the batch is {describe_batch(batch)}, which cannot be indexed")
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise OptionError(f"a dict batch is passed as keyword arguments but has non-string keys {bad[:5]!r}")
        return (), dict(batch)
    if isinstance(batch, list | tuple):
        if not batch:
            raise OptionError("an empty list/tuple batch has no model input")
        return (batch[0],), {}
    return (batch,), {}


def make_feed(call: Callable[[nn.Module, Any], Any] | None, input: int | str | None) -> Feed:
    if call is not None:

        def feed_call(model: nn.Module, batch: Any, device: torch.device | None) -> int | None:
            batch = to_device(batch, device)
            call(model, batch)
            return leading_dim(batch)

        return feed_call

    def feed(model: nn.Module, batch: Any, device: torch.device | None) -> int | None:
        args, kwargs = model_arguments(batch, input)
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        model(*args, **kwargs)
        return leading_dim((args, kwargs))

    return feed


# -- statistics ----------------------------------------------------------------------------



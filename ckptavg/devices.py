"""Devices: the one place that parses a device option and checks that this machine has it.

:func:`resolve_device` is ``--device`` of a merge (``cpu``, ``cuda``, ``cuda:N``);
:func:`check_device` and :func:`parse_device` serve BatchNorm specs and ``ckptavg bn`` (any
torch device but ``meta``), :func:`device_or_error` is their one-line option error.
"""

from __future__ import annotations

import torch

from .errors import OptionError, exc_text

__all__ = ["resolve_device", "check_device", "parse_device", "device_or_error"]

_NO_CUDA = "CUDA is not available on this machine (torch.cuda.is_available() is False)"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate a merge's device option (``cpu``, ``cuda``, ``cuda:N``).

    Example::

        resolve_device("cpu")  # torch.device("cpu")
    """
    try:
        dev = parse_device(device or "cpu")
    except ValueError:
        raise OptionError(f"--device must be cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    try:
        return check_device(dev)
    except ValueError as exc:
        raise OptionError(f"--device {device}: {exc}") from None


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that it exists here; ``ValueError`` with the reason otherwise.

    Example::

        >>> check_device("cpu")
        device(type='cpu')
    """
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(_NO_CUDA)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("MPS is not available on this machine")
    return dev


def parse_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` without checking this machine has it (the meta device is refused)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a device ({exc_text(exc)})") from None
    if dev.type == "meta":
        raise ValueError("the meta device holds no data")
    return dev


def device_or_error(device: str | torch.device) -> torch.device:
    """:func:`check_device`, failing with the one-line :class:`OptionError` the CLI's ``--device`` gives."""
    try:
        return check_device(device)
    except ValueError as exc:
        raise OptionError(f"device {str(device)!r}: {exc}") from None



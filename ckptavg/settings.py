"""The environment variables that tune ckptavg, declared and parsed in one place.

=========================  ===========================================================  =========
variable                   what it sets                                                 default
=========================  ===========================================================  =========
``CKPTAVG_WORKERS``        threads that read and average chunks at the same time        per core
``CKPTAVG_CHUNK_ELEMS``    elements per chunk (memory is a few chunks per worker)       automatic
``CKPTAVG_DIST_TIMEOUT``   seconds a torchrun rank waits for the others                 1800
=========================  ===========================================================  =========
"""

from __future__ import annotations

import os

from .errors import OptionError

__all__ = ["WORKERS_ENV", "CHUNK_ENV", "TIMEOUT_ENV", "env_int", "env_seconds"]

WORKERS_ENV = "CKPTAVG_WORKERS"
CHUNK_ENV = "CKPTAVG_CHUNK_ELEMS"
#: seconds a rank waits in a collective for the others (default 1800, as torch's own default)
TIMEOUT_ENV = "CKPTAVG_DIST_TIMEOUT"


def env_int(name: str, minimum: int = 1) -> int | None:
    """The integer (at least ``minimum``) an environment variable holds, or None when it is unset
    or empty; anything else is an :class:`~ckptavg.errors.OptionError` naming the variable.

    Example::

        workers = env_int("CKPTAVG_WORKERS") or 4
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise OptionError(f"{name} must be {what}; got {raw!r}") from None
    if n < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise OptionError(f"{name} must be {what}; got {raw!r}")
    return n


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from an environment variable (``default`` when unset).

    Example::

        timeout = env_seconds("CKPTAVG_DIST_TIMEOUT", 1800)
    """
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise OptionError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise OptionError(f"{name} must be positive, got {raw!r}")
    return value

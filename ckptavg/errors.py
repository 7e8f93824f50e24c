"""The error types ckptavg raises for failures a user can cause.

Every such failure is a :class:`CkptavgError` whose message is a single line naming
the file (and the tensor or key, where there is one). The CLI prints the message
without a traceback and exits with status 1; anything else escaping is a bug.
"""

from __future__ import annotations


class CkptavgError(Exception):
    """Base class of every user-caused failure in ckptavg (bad file, bad option, mismatch...)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep messages on one line whatever the cause contained.
        super().__init__(" ".join(str(message).split()))


class CheckpointReadError(CkptavgError):
    """A checkpoint file is missing, unreadable, truncated or not in a format ckptavg reads."""


class UnsafePickleError(CheckpointReadError):
    """A torch checkpoint needs code execution to load and ``trust_pickle`` was not given."""


class MismatchError(CkptavgError):
    """The selected checkpoints disagree on tensor names, shapes or dtype kinds."""


class SelectionError(CkptavgError):
    """Ordering or selection options matched nothing or need information a checkpoint lacks."""


class OptionError(CkptavgError):
    """An option or argument value is invalid (exit code 2, like a usage error)."""

    exit_code = 2


class NonFiniteError(CkptavgError):
    """An input tensor holds NaN or Inf (pass ``allow_nonfinite=True`` to proceed)."""


class OutputError(CkptavgError):
    """The output cannot be written where requested."""


class DistributedError(CkptavgError):
    """A merge across ranks (torchrun) failed on another rank, or the ranks lost contact."""


class SpecError(CkptavgError):
    """A BatchNorm spec file is invalid: unknown key, wrong type, unimportable factory..."""


class CkptavgWarning(UserWarning):
    """Something the user should know about but that does not stop the job."""


def exc_text(exc: BaseException, *, bare_import_error: bool = False) -> str:
    """One short line (at most 300 characters) for an exception raised by user code: ``Type: text``.

    ``bare_import_error``: an ImportError's text alone (it already says what was missing).
    """
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    if bare_import_error and isinstance(exc, ImportError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""The BatchNorm recalibration spec: a small TOML file naming a model factory and a data source.

Example (see the README for every key)::

    [model]
    factory = "models.py:build"            # "pkg.module:attr" or "path/to/file.py:attr"
    kwargs = { num_classes = 10 }
    prefix = "model."                      # optional: key prefix to strip (Lightning)

    [data]
    loader = "data.py:train_loader"        # a callable returning an iterable of batches ...
    kwargs = { batch_size = 256 }
    # dataset = "torchvision.datasets:ImageFolder"   # ... or a dataset batched here
    max_batches = 200
    input = 0                              # or a dict key; or call = "pkg.mod:forward"

    [run]
    device = "cpu"

    [eval]                                 # optional: for ckptavg sweep / soup
    loader = "data.py:val_loader"          # a held-out loader (or dataset = ..., as in [data])
    metric = "metrics.py:accuracy"         # a callable (model, loader) -> float
    higher_is_better = true                # the default

:func:`load_spec` parses and validates the file, imports the modules it names and resolves
every reference (so a typo fails before any averaging work starts) but calls no factory:
:meth:`BNSpec.build_model` and :meth:`BNSpec.build_loader` do that when asked. Every mistake
is a :class:`~ckptavg.errors.SpecError` whose one-line message names the spec file and the
entry, e.g. ``bn.toml: [data].loader: cannot import 'my_pkg.data': No module named 'my_pkg'``.

Relative file paths resolve against the spec file's folder: ``path/to/file.py:attr``
references, and string values in ``[model].kwargs`` / ``[data].kwargs`` whose key names a
path (``root``, ``path``, ``dir``, ``file``, ``folder`` or a key ending in ``_root``, ``_path``,
``_dir``, ``_file``, ``_folder``). Module names are looked up on ``sys.path`` first, then in
the spec file's folder. torchvision is imported only when the spec names it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import check_device, device_or_error
from ..errors import SpecError, exc_text

__all__ = ["BNSpec", "EvalSpec", "TransformSpec", "load_spec", "check_device", "DEFAULT_BATCH_SIZE", "MAX_SPEC_BYTES",
           "SECTIONS",
           "DATASET_ONLY", "TRANSFORM_KEYS", "PATH_KEYS", "NOT_A_REFERENCE", "describe_value", "user_error",
           "spec_error", "is_iterable", "on_sys_path", "torchvision_transforms"]

#: Batch size of the DataLoader built around a ``[data].dataset`` when the spec gives none.
DEFAULT_BATCH_SIZE = 64
#: a spec must be a regular file of at most this many bytes (checked before it is read: devices such as
#: /dev/zero, FIFOs and larger files are a one-line SpecError)
MAX_SPEC_BYTES = 1 << 20

SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("factory", "args", "kwargs", "prefix"),
    "data": ("loader", "dataset", "args", "kwargs", "transforms", "batch_size", "num_workers", "max_batches",
             "input", "call"),
    "run": ("device",),
    "eval": ("loader", "dataset", "args", "kwargs", "transforms", "batch_size", "num_workers", "metric",
             "higher_is_better"),
}
DATASET_ONLY = ("transforms", "batch_size", "num_workers")
TRANSFORM_KEYS = ("name", "args", "kwargs")
PATH_KEYS = ("root", "path", "dir", "file", "folder")
NOT_A_REFERENCE = "is not a reference: expected 'module:attribute' or 'file.py:attribute'"


def describe_value(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def user_error(exc: BaseException) -> str:
    return exc_text(exc, bare_import_error=True)


def spec_error(path: Path, entry: str | None, message: str) -> SpecError:
    return SpecError(f"{path}: {entry}: {message}" if entry else f"{path}: {message}")


def is_iterable(obj: Any) -> bool:
    return hasattr(obj, "__iter__") or hasattr(obj, "__getitem__")


@contextlib.contextmanager
def on_sys_path(folder: Path, *, front: bool) -> Iterator[None]:
    """Make ``folder`` importable for the duration of the block (front: before everything else)."""
    entry = str(folder)
    if entry in sys.path:
        yield
        return
    sys.path.insert(0 if front else len(sys.path), entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


@dataclass
class TransformSpec:
    """One entry of ``[data].transforms``: a torchvision transform by name with its arguments."""

    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSpec:
    """The optional ``[eval]`` section: a held-out loader and a metric ``(model, loader) -> float``.

    The loader takes the forms of ``[data]`` (``loader`` or ``dataset`` with ``args``, ``kwargs``,
    ``transforms``, ``batch_size``, ``num_workers``); ``metric`` is a reference to a callable.
    Used by ``ckptavg sweep`` / ``ckptavg soup`` (see :mod:`ckptavg.evaluate`).

    Example::

        >>> spec = load_spec("bn.toml")                      # doctest: +SKIP
        >>> spec.eval.metric, spec.eval.higher_is_better     # doctest: +SKIP
        ('metrics.py:accuracy', True)
    """

    metric: str
    higher_is_better: bool = True
    loader: str | None = None
    dataset: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[TransformSpec] = field(default_factory=list)
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 0
    _data_obj: Any = field(default=None, repr=False)
    _metric_obj: Any = field(default=None, repr=False)
    _transform_objs: list[Any] = field(default_factory=list, repr=False)

    @property
    def data_entry(self) -> str:
        """``[eval].loader`` or ``[eval].dataset``, whichever the spec uses."""
        return "[eval].loader" if self.loader is not None else "[eval].dataset"

    @property
    def metric_function(self) -> Callable[[torch.nn.Module, Any], Any]:
        """The resolved ``[eval].metric`` callable."""
        return self._metric_obj


@dataclass
class BNSpec:
    """A parsed and validated recalibration spec (see :func:`load_spec`).

    The reference strings (``factory``, ``loader``, ``dataset``, ``call``) are as written in the
    file; the objects they name were imported by :func:`load_spec` and are used by
    :meth:`build_model`, :meth:`build_loader` and :attr:`call_function`.

    Example::

        >>> spec = load_spec("bn.toml")                      # doctest: +SKIP
        >>> spec.factory, spec.resolve_device()              # doctest: +SKIP
        ('models.py:build', device(type='cpu'))
    """

    path: Path
    factory: str
    model_args: list[Any] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    prefix: str | None = None
    loader: str | None = None
    dataset: str | None = None
    data_args: list[Any] = field(default_factory=list)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[TransformSpec] = field(default_factory=list)
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 0
    max_batches: int | None = None
    input: int | str | None = None
    call: str | None = None
    device: str | None = None
    eval: EvalSpec | None = None
    _factory_obj: Any = field(default=None, repr=False)
    _data_obj: Any = field(default=None, repr=False)
    _call_obj: Any = field(default=None, repr=False)
    _transform_objs: list[Any] = field(default_factory=list, repr=False)

    @property
    def folder(self) -> Path:
        """The folder relative paths in the spec resolve against."""
        return Path(os.path.abspath(self.path)).parent

    @property
    def data_entry(self) -> str:
        """``[data].loader`` or ``[data].dataset``, whichever the spec uses."""
        return "[data].loader" if self.loader is not None else "[data].dataset"

    def error(self, entry: str | None, message: str) -> SpecError:
        """A :class:`SpecError` naming this spec file and ``entry`` (e.g. ``[data].loader``)."""
        return spec_error(self.path, entry, message)

    @property
    def call_function(self) -> Callable[[torch.nn.Module, Any], Any] | None:
        """The resolved ``[data].call`` function ``(model, batch) -> None``, or ``None``."""
        return self._call_obj

    def build_model(self) -> torch.nn.Module:
        """Call ``[model].factory`` with its args/kwargs; errors become one-line SpecErrors."""
        with on_sys_path(self.folder, front=False):
            try:
                model = self._factory_obj(*self.model_args, **self.model_kwargs)
            except Exception as exc:  # user code: report it as a spec problem, on one line
                raise self.error("[model].factory", f"{self.factory!r} raised {user_error(exc)}") from exc
        if not isinstance(model, torch.nn.Module):
            raise self.error("[model].factory",
                             f"{self.factory!r} returned {describe_value(model)}, not a torch.nn.Module")
        return model

    def build_loader(self) -> Iterable[Any]:
        """The iterable of batches: ``[data].loader``'s result, or a DataLoader over ``[data].dataset``."""
        return self._build_batches(self.data_entry, self.loader, self.dataset, self._data_obj, self.data_args,
                                   self.data_kwargs, self._transform_objs, self.batch_size, self.num_workers)

    def build_eval_loader(self) -> Iterable[Any]:
        """The held-out batches of ``[eval]`` (as :meth:`build_loader` for ``[data]``).

        Raises :class:`SpecError` when the spec has no ``[eval]`` section.
        """
        ev = self.eval
        if ev is None:
            raise self.error("[eval]", "missing section (give loader and metric to evaluate models)")
        return self._build_batches(ev.data_entry, ev.loader, ev.dataset, ev._data_obj, ev.args, ev.kwargs,
                                   ev._transform_objs, ev.batch_size, ev.num_workers)

    def _build_batches(self, entry: str, loader: str | None, dataset: str | None, obj: Any, args: list[Any],
                       kwargs_in: dict[str, Any], transform_objs: list[Any], batch_size: int,
                       num_workers: int) -> Iterable[Any]:
        ref = loader or dataset
        with on_sys_path(self.folder, front=False):
            if loader is not None and not callable(obj):
                result = obj  # an iterable defined at module level (a DataLoader, a list...)
            else:
                kwargs = dict(kwargs_in)
                if dataset is not None and transform_objs:
                    v2, v1 = torchvision_transforms()
                    kwargs["transform"] = (v2 or v1).Compose(list(transform_objs))
                try:
                    result = obj(*args, **kwargs)
                except Exception as exc:
                    raise self.error(entry, f"{ref!r} raised {user_error(exc)}") from exc
        if dataset is not None:
            if not is_iterable(result):
                raise self.error(entry, f"{ref!r} returned {describe_value(result)}, not a dataset")
            from torch.utils.data import DataLoader

            try:
                return DataLoader(result, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            except Exception as exc:
                raise self.error(entry, f"cannot batch {ref!r}: {user_error(exc)}") from exc
        if isinstance(result, torch.Tensor) or not is_iterable(result):
            raise self.error(entry, f"{ref!r} returned {describe_value(result)}, not an iterable of batches")
        return result

    def resolve_device(self, override: str | torch.device | None = None) -> torch.device:
        """The device to run on: ``override`` (e.g. ``--device``) if given, else ``[run].device``, else CPU.

        Raises :class:`SpecError` (spec's device) or :class:`OptionError` (override) when the
        device is malformed or not available on this machine.
        """
        if override is not None:
            return device_or_error(override)
        if self.device is None:
            return torch.device("cpu")
        try:
            return check_device(self.device)
        except ValueError as exc:
            raise self.error("[run].device", f"{self.device!r}: {exc}") from None


def torchvision_transforms() -> tuple[Any, Any]:
    """(torchvision.transforms.v2 or None, torchvision.transforms), imported on first use."""
    import torchvision.transforms as v1

    try:
        import torchvision.transforms.v2 as v2
    except ImportError:  # torchvision < 0.15
        v2 = None
    return v2, v1



def load_spec(path: str | os.PathLike[str]) -> BNSpec:
    """Read, validate and resolve a recalibration spec file.

    Imports the modules the spec names and checks every reference, type and key, but calls
    no factory or loader (:meth:`BNSpec.build_model` / :meth:`BNSpec.build_loader` do).

    Raises:
        SpecError: any mistake, as one line naming the file and the entry, e.g.
            ``bn.toml: [data].max_batches: expected a positive integer, got str 'ten'``.

    Example::

        >>> spec = load_spec("bn.toml")                      # doctest: +SKIP
        >>> model, loader = spec.build_model(), spec.build_loader()  # doctest: +SKIP
    """
    from .spec_parser import SpecParser

    return SpecParser(Path(path)).parse()

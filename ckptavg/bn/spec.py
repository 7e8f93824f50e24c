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
import difflib
import hashlib
import importlib.util
import os
import pkgutil
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import check_device, device_or_error, parse_device
from ..errors import SpecError, exc_text

__all__ = ["BNSpec", "EvalSpec", "TransformSpec", "load_spec", "check_device", "DEFAULT_BATCH_SIZE"]

#: Batch size of the DataLoader built around a ``[data].dataset`` when the spec gives none.
DEFAULT_BATCH_SIZE = 64

_SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("factory", "args", "kwargs", "prefix"),
    "data": ("loader", "dataset", "args", "kwargs", "transforms", "batch_size", "num_workers", "max_batches",
             "input", "call"),
    "run": ("device",),
    "eval": ("loader", "dataset", "args", "kwargs", "transforms", "batch_size", "num_workers", "metric",
             "higher_is_better"),
}
_DATASET_ONLY = ("transforms", "batch_size", "num_workers")
_TRANSFORM_KEYS = ("name", "args", "kwargs")
_PATH_KEYS = ("root", "path", "dir", "file", "folder")
_NOT_A_REFERENCE = "is not a reference: expected 'module:attribute' or 'file.py:attribute'"


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def _user_error(exc: BaseException) -> str:
    return exc_text(exc, bare_import_error=True)


def _error(path: Path, entry: str | None, message: str) -> SpecError:
    return SpecError(f"{path}: {entry}: {message}" if entry else f"{path}: {message}")


def _iterable(obj: Any) -> bool:
    return hasattr(obj, "__iter__") or hasattr(obj, "__getitem__")


@contextlib.contextmanager
def _on_sys_path(folder: Path, *, front: bool) -> Iterator[None]:
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
        return _error(self.path, entry, message)

    @property
    def call_function(self) -> Callable[[torch.nn.Module, Any], Any] | None:
        """The resolved ``[data].call`` function ``(model, batch) -> None``, or ``None``."""
        return self._call_obj

    def build_model(self) -> torch.nn.Module:
        """Call ``[model].factory`` with its args/kwargs; errors become one-line SpecErrors."""
        with _on_sys_path(self.folder, front=False):
            try:
                model = self._factory_obj(*self.model_args, **self.model_kwargs)
            except Exception as exc:  # user code: report it as a spec problem, on one line
                raise self.error("[model].factory", f"{self.factory!r} raised {_user_error(exc)}") from exc
        if not isinstance(model, torch.nn.Module):
            raise self.error("[model].factory", f"{self.factory!r} returned {_describe(model)}, not a torch.nn.Module")
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
        with _on_sys_path(self.folder, front=False):
            if loader is not None and not callable(obj):
                result = obj  # an iterable defined at module level (a DataLoader, a list...)
            else:
                kwargs = dict(kwargs_in)
                if dataset is not None and transform_objs:
                    v2, v1 = _torchvision_transforms()
                    kwargs["transform"] = (v2 or v1).Compose(list(transform_objs))
                try:
                    result = obj(*args, **kwargs)
                except Exception as exc:
                    raise self.error(entry, f"{ref!r} raised {_user_error(exc)}") from exc
        if dataset is not None:
            if not _iterable(result):
                raise self.error(entry, f"{ref!r} returned {_describe(result)}, not a dataset")
            from torch.utils.data import DataLoader

            try:
                return DataLoader(result, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            except Exception as exc:
                raise self.error(entry, f"cannot batch {ref!r}: {_user_error(exc)}") from exc
        if isinstance(result, torch.Tensor) or not _iterable(result):
            raise self.error(entry, f"{ref!r} returned {_describe(result)}, not an iterable of batches")
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


def _torchvision_transforms() -> tuple[Any, Any]:
    """(torchvision.transforms.v2 or None, torchvision.transforms), imported on first use."""
    import torchvision.transforms as v1

    try:
        import torchvision.transforms.v2 as v2
    except ImportError:  # torchvision < 0.15
        v2 = None
    return v2, v1


def _dtype_from_text(value: Any, *, plain: bool) -> Any:
    """``"torch.float32"`` (or ``"float32"`` when ``plain``) -> ``torch.float32``; other values unchanged."""
    if isinstance(value, str):
        name = value[6:] if value.startswith("torch.") else (value if plain else None)
        if name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    return value


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "list": (lambda v: isinstance(v, list), "an array"),
    "table": (lambda v: isinstance(v, dict), "a table"),
    "int>=1": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "int>=0": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
}
_EMPTY: dict[str, Callable[[], Any]] = {"list": list, "table": dict}


class _Parser:
    """Turns the TOML document into a :class:`BNSpec`, raising SpecError at the first mistake."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = Path(os.path.abspath(path)).parent

    def error(self, entry: str | None, message: str) -> SpecError:
        return _error(self.path, entry, message)

    def read(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise self.error(None, f"cannot read the spec: {exc.strerror or exc}") from None
        try:
            return tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self.error(None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise self.error(None, f"invalid TOML: {exc}") from None

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.error(f"{where}.{key}", f"unknown key ({hint}expected one of: {', '.join(allowed)})")

    def get(self, table: Mapping[str, Any], key: str, where: str, kind: str) -> Any:
        """``table[key]`` checked against ``kind`` (see ``_CHECKS``); None, [] or {} when absent."""
        if key not in table:
            return _EMPTY[kind]() if kind in _EMPTY else None
        ok, what = _CHECKS[kind]
        if not ok(table[key]):
            raise self.error(f"{where}.{key}", f"expected {what}, got {_describe(table[key])}")
        return table[key]

    def resolve_paths(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Path-like values (see the module docstring) made absolute against the spec's folder."""
        out = dict(kwargs)
        for key, value in kwargs.items():
            path_key = key in _PATH_KEYS or key.endswith(tuple("_" + k for k in _PATH_KEYS))
            if path_key and isinstance(value, str) and value and "://" not in value:
                out[key] = str(self.folder / Path(value).expanduser())  # an absolute value replaces the folder
        return out

    # -- references ----------------------------------------------------------------------

    def resolve_ref(self, text: str, entry: str) -> Any:
        """Import ``module:attr`` / ``file.py:attr`` (or ``module.attr``) and return the object.

        ``pkgutil.resolve_name`` imports the module and walks the attributes. Hand-written around
        it: splitting ``module.attr`` at its last dot ourselves (resolve_name would import the
        longest importable prefix and silently turn an ImportError raised inside ``a.b`` into
        "'a' has no attribute 'b'"), ``file.py`` references (resolve_name only knows module
        names), and the one-line messages naming which part failed.
        """
        target, sep, attr = text.rpartition(":")
        if not sep:
            target, sep, attr = text.rpartition(".")
        target, attr = target.strip(), attr.strip()
        if not sep or not target or not attr:
            raise self.error(entry, f"{text!r} {_NOT_A_REFERENCE}")
        is_file = target.endswith(".py") or "/" in target or "\\" in target
        module = self.import_file(target, entry) if is_file else target
        try:
            with _on_sys_path(self.folder, front=False):
                return pkgutil.resolve_name(f"{module}:{attr}")
        except Exception as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("invalid format"):  # resolve_name's own check
                raise self.error(entry, f"{text!r} {_NOT_A_REFERENCE}") from None
            if module not in sys.modules:  # the import itself failed (or anything the module raised)
                raise self.error(entry, f"cannot import {target!r}: {_user_error(exc)}") from exc
            parts = attr.split(".")
            if isinstance(exc, AttributeError) and exc.name in parts:
                done = parts[: parts.index(exc.name)]
                owner = target + (":" + ".".join(done) if done else "")
                raise self.error(entry, f"{owner!r} has no attribute {exc.name!r}") from None
            raise self.error(entry, f"cannot get {text!r}: {_user_error(exc)}") from exc

    def import_file(self, target: str, entry: str) -> str:
        """Import a ``.py`` file under a private module name unique to its path; returns that name."""
        file = Path(os.path.abspath(self.folder / Path(target).expanduser()))
        if not file.is_file():
            raise self.error(entry, f"no such file: {str(file)!r}")
        digest = hashlib.sha1(str(file).encode()).hexdigest()[:12]
        name = f"_ckptavg_spec_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}_{digest}"
        if name in sys.modules:
            return name
        module_spec = importlib.util.spec_from_file_location(name, file)
        if module_spec is None or module_spec.loader is None:
            raise self.error(entry, f"cannot import {str(file)!r}: not a Python source file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before exec: dataclasses and pickling look modules up here
        try:
            with _on_sys_path(file.parent, front=True):
                module_spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(name, None)
            if not isinstance(exc, Exception):
                raise
            raise self.error(entry, f"cannot import {target!r}: {_user_error(exc)}") from exc
        return name

    def resolve_callable(self, text: str, entry: str) -> Any:
        obj = self.resolve_ref(text, entry)
        if not callable(obj):
            raise self.error(entry, f"{text!r} is {_describe(obj)}, not callable")
        return obj

    # -- transforms ----------------------------------------------------------------------

    def parse_transforms(self, items: list[Any], section: str = "data") -> tuple[list[TransformSpec], list[Any]]:
        specs: list[TransformSpec] = []
        objs: list[Any] = []
        if not items:
            return specs, objs
        try:
            v2, v1 = _torchvision_transforms()
        except ImportError as exc:
            message = f"torchvision is needed for transforms: {_user_error(exc)}"
            raise self.error(f"[{section}].transforms", message) from exc
        for i, item in enumerate(items):
            where = f"[{section}].transforms[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict):
                table = "{ name = ..., args = [...], kwargs = {...} }"
                raise self.error(where, f"expected a table {table} or a name, got {_describe(item)}")
            self.check_keys(item, _TRANSFORM_KEYS, where)
            name = self.get(item, "name", where, "str")
            if name is None:
                raise self.error(where, "missing 'name' (a torchvision transform, e.g. 'Resize')")
            args, kwargs = self.get(item, "args", where, "list"), self.get(item, "kwargs", where, "table")
            if ":" in name:
                cls = self.resolve_ref(name, f"{where}.name")
            else:
                cls = None if name.startswith("_") else getattr(v2, name, None) or getattr(v1, name, None)
                if not callable(cls):
                    known = sorted({n for m in (v2, v1) if m is not None for n in dir(m) if n[:1].isupper()})
                    close = difflib.get_close_matches(name, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    module_name = "torchvision.transforms.v2" if v2 is not None else "torchvision.transforms"
                    raise self.error(f"{where}.name", f"unknown transform {name!r}: not in {module_name}{hint}")
            call_args = [_dtype_from_text(a, plain=name in ("ToDtype", "ConvertImageDtype")) for a in args]
            call_kwargs = {k: _dtype_from_text(v, plain=k == "dtype") for k, v in kwargs.items()}
            try:
                objs.append(cls(*call_args, **call_kwargs))
            except Exception as exc:
                raise self.error(where, f"{name}(...) failed: {_user_error(exc)}") from exc
            specs.append(TransformSpec(name=name, args=args, kwargs=kwargs))
        return specs, objs

    # -- [eval] ---------------------------------------------------------------------------

    def parse_eval(self, table: Mapping[str, Any]) -> EvalSpec:
        """The optional ``[eval]`` section: a held-out source (the forms of ``[data]``) and a metric."""
        loader, dataset = self.get(table, "loader", "[eval]", "str"), self.get(table, "dataset", "[eval]", "str")
        if (loader is None) == (dataset is None):
            what = "both" if loader is not None else "neither"
            raise self.error("[eval]", f"give exactly one of 'loader' or 'dataset' (found {what})")
        for key in _DATASET_ONLY:
            if loader is not None and key in table:
                raise self.error(
                    f"[eval].{key}",
                    "only valid with 'dataset' (a 'loader' builds its own batches: pass its options in [eval].kwargs)",
                )
        metric = self.get(table, "metric", "[eval]", "str")
        if metric is None:
            example = '"metrics.py:accuracy"'
            raise self.error("[eval].metric", f"missing (a callable (model, loader) -> float, e.g. {example})")
        higher = table.get("higher_is_better", True)
        if not isinstance(higher, bool):
            raise self.error("[eval].higher_is_better", f"expected true or false, got {_describe(higher)}")
        args = self.get(table, "args", "[eval]", "list")
        kwargs = self.resolve_paths(self.get(table, "kwargs", "[eval]", "table"))
        batch_size = self.get(table, "batch_size", "[eval]", "int>=1")
        num_workers = self.get(table, "num_workers", "[eval]", "int>=0")
        transform_items = self.get(table, "transforms", "[eval]", "list")
        if transform_items and "transform" in kwargs:
            raise self.error("[eval].transforms", "[eval].kwargs already has a 'transform': give one or the other")
        entry = "[eval].loader" if loader is not None else "[eval].dataset"
        if dataset is not None:
            data_obj = self.resolve_callable(dataset, entry)
        else:
            data_obj = self.resolve_ref(loader, entry)
            if not callable(data_obj):
                if not _iterable(data_obj):
                    raise self.error(entry, f"{loader!r} is {_describe(data_obj)}: neither callable nor iterable")
                if args or kwargs:
                    raise self.error("[eval].kwargs", f"{loader!r} is not callable, so it takes no args/kwargs")
        metric_obj = self.resolve_callable(metric, "[eval].metric")
        transforms, transform_objs = self.parse_transforms(transform_items, "eval")
        return EvalSpec(metric=metric, higher_is_better=higher, loader=loader, dataset=dataset, args=args,
                        kwargs=kwargs, transforms=transforms, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                        num_workers=num_workers or 0, _data_obj=data_obj, _metric_obj=metric_obj,
                        _transform_objs=transform_objs)

    # -- the whole document --------------------------------------------------------------

    def parse(self) -> BNSpec:
        doc = self.read()
        for key, value in doc.items():
            if key not in _SECTIONS:
                close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
                hint = f"did you mean [{close[0]}]? " if close else ""
                raise self.error(f"[{key}]", f"unknown section ({hint}expected [model], [data], [run], [eval])")
            if not isinstance(value, dict):
                raise self.error(f"[{key}]", f"expected a table (section), got {_describe(value)}")
        for section in ("model", "data"):
            if section not in doc:
                raise self.error(f"[{section}]", "missing section")
        for section, table in doc.items():
            self.check_keys(table, _SECTIONS[section], f"[{section}]")
        model, data, run = doc["model"], doc["data"], doc.get("run", {})

        # [model]
        factory = self.get(model, "factory", "[model]", "str")
        if factory is None:
            raise self.error("[model].factory", 'missing (e.g. factory = "torchvision.models:resnet18")')
        model_args = self.get(model, "args", "[model]", "list")
        model_kwargs = self.resolve_paths(self.get(model, "kwargs", "[model]", "table"))
        prefix = model.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise self.error("[model].prefix", f"expected a string, got {_describe(prefix)}")

        # [data]
        loader, dataset = self.get(data, "loader", "[data]", "str"), self.get(data, "dataset", "[data]", "str")
        if (loader is None) == (dataset is None):
            what = "both" if loader is not None else "neither"
            raise self.error("[data]", f"give exactly one of 'loader' or 'dataset' (found {what})")
        for key in _DATASET_ONLY:
            if loader is not None and key in data:
                raise self.error(
                    f"[data].{key}",
                    "only valid with 'dataset' (a 'loader' builds its own batches: pass its options in [data].kwargs)",
                )
        data_args = self.get(data, "args", "[data]", "list")
        data_kwargs = self.resolve_paths(self.get(data, "kwargs", "[data]", "table"))
        batch_size = self.get(data, "batch_size", "[data]", "int>=1")
        num_workers = self.get(data, "num_workers", "[data]", "int>=0")
        max_batches = self.get(data, "max_batches", "[data]", "int>=1")
        transform_items = self.get(data, "transforms", "[data]", "list")
        if transform_items and "transform" in data_kwargs:
            raise self.error("[data].transforms", "[data].kwargs already has a 'transform': give one or the other")
        selector = data.get("input")
        if "input" in data and (isinstance(selector, bool) or not isinstance(selector, int | str) or selector == ""):
            raise self.error(
                "[data].input", f"expected an index (integer) or a key (string), got {_describe(selector)}"
            )
        call = self.get(data, "call", "[data]", "str")
        if call is not None and "input" in data:
            raise self.error("[data].call", "give either 'input' or 'call', not both")

        # [run]: the syntax now; whether this machine has the device, when it is used
        device = self.get(run, "device", "[run]", "str")
        if device is not None:
            try:
                parse_device(device)
            except ValueError as exc:
                raise self.error("[run].device", f"{device!r}: {exc}") from None

        # Resolve references now, so that a typo fails before any heavy work.
        factory_obj = self.resolve_callable(factory, "[model].factory")
        data_entry = "[data].loader" if loader is not None else "[data].dataset"
        if dataset is not None:
            data_obj = self.resolve_callable(dataset, data_entry)
        else:
            data_obj = self.resolve_ref(loader, data_entry)
            if not callable(data_obj):
                if not _iterable(data_obj):
                    raise self.error(data_entry, f"{loader!r} is {_describe(data_obj)}: neither callable nor iterable")
                if data_args or data_kwargs:
                    raise self.error("[data].kwargs", f"{loader!r} is not callable, so it takes no args/kwargs")
        call_obj = self.resolve_callable(call, "[data].call") if call is not None else None
        transforms, transform_objs = self.parse_transforms(transform_items)
        eval_spec = self.parse_eval(doc["eval"]) if "eval" in doc else None

        return BNSpec(
            path=self.path,
            factory=factory,
            model_args=model_args,
            model_kwargs=model_kwargs,
            prefix=prefix or None,
            loader=loader,
            dataset=dataset,
            data_args=data_args,
            data_kwargs=data_kwargs,
            transforms=transforms,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            num_workers=num_workers or 0,
            max_batches=max_batches,
            input=selector,
            call=call,
            device=device,
            eval=eval_spec,
            _factory_obj=factory_obj,
            _data_obj=data_obj,
            _call_obj=call_obj,
            _transform_objs=transform_objs,
        )


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
    return _Parser(Path(path)).parse()

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
import importlib
import importlib.util
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError, SpecError

__all__ = ["BNSpec", "TransformSpec", "load_spec", "DEFAULT_BATCH_SIZE"]

#: Batch size of the DataLoader built around a ``[data].dataset`` when the spec gives none.
DEFAULT_BATCH_SIZE = 64

_SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("factory", "args", "kwargs", "prefix"),
    "data": (
        "loader",
        "dataset",
        "args",
        "kwargs",
        "transforms",
        "batch_size",
        "num_workers",
        "max_batches",
        "input",
        "call",
    ),
    "run": ("device",),
}
_DATASET_ONLY = ("transforms", "batch_size", "num_workers")
_TRANSFORM_KEYS = ("name", "args", "kwargs")
_PATH_KEYS = ("root", "path", "dir", "file", "folder")
_PATH_SUFFIXES = tuple("_" + k for k in _PATH_KEYS)
_MAX_ERROR_CHARS = 300


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _exc_text(exc: BaseException) -> str:
    """One short line for an exception raised by user code."""
    text = " ".join(str(exc).split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    if isinstance(exc, ImportError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_path_key(key: str) -> bool:
    return key in _PATH_KEYS or key.endswith(_PATH_SUFFIXES)


@contextlib.contextmanager
def _on_sys_path(folder: Path, *, front: bool) -> Iterator[None]:
    """Make ``folder`` importable for the duration of the block (front: before everything else)."""
    entry = str(folder)
    if entry in sys.path:
        yield
        return
    if front:
        sys.path.insert(0, entry)
    else:
        sys.path.append(entry)
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
class BNSpec:
    """A parsed and validated recalibration spec (see :func:`load_spec`).

    The ``*_ref`` strings are the references as written in the file; the objects they name
    were imported by :func:`load_spec` and are used by :meth:`build_model`,
    :meth:`build_loader` and :attr:`call_function`.
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
    _factory_obj: Any = field(default=None, repr=False)
    _data_obj: Any = field(default=None, repr=False)
    _call_obj: Any = field(default=None, repr=False)
    _transform_objs: list[Any] = field(default_factory=list, repr=False)

    # -- helpers -------------------------------------------------------------------------

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
        where = f"{self.path}: {entry}: " if entry else f"{self.path}: "
        return SpecError(where + message)

    @property
    def call_function(self) -> Callable[[torch.nn.Module, Any], Any] | None:
        """The resolved ``[data].call`` function ``(model, batch) -> None``, or ``None``."""
        return self._call_obj

    # -- building ------------------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        """Call ``[model].factory`` with its args/kwargs; errors become one-line SpecErrors."""
        with _on_sys_path(self.folder, front=False):
            try:
                model = self._factory_obj(*self.model_args, **self.model_kwargs)
            except Exception as exc:  # user code: report it as a spec problem, on one line
                raise self.error("[model].factory", f"{self.factory!r} raised {_exc_text(exc)}") from exc
        if not isinstance(model, torch.nn.Module):
            raise self.error("[model].factory", f"{self.factory!r} returned {_describe(model)}, not a torch.nn.Module")
        return model

    def build_loader(self) -> Iterable[Any]:
        """The iterable of batches: ``[data].loader``'s result, or a DataLoader over ``[data].dataset``."""
        entry = self.data_entry
        ref = self.loader if self.loader is not None else self.dataset
        obj = self._data_obj
        with _on_sys_path(self.folder, front=False):
            if self.loader is not None and not callable(obj):
                result = obj  # an iterable defined at module level (a DataLoader, a list...)
            else:
                kwargs = dict(self.data_kwargs)
                if self.dataset is not None and self._transform_objs:
                    kwargs["transform"] = self._compose_transforms()
                try:
                    result = obj(*self.data_args, **kwargs)
                except Exception as exc:
                    raise self.error(entry, f"{ref!r} raised {_exc_text(exc)}") from exc
        if self.dataset is not None:
            if not (hasattr(result, "__getitem__") or hasattr(result, "__iter__")):
                raise self.error(entry, f"{ref!r} returned {_describe(result)}, not a dataset")
            from torch.utils.data import DataLoader

            try:
                return DataLoader(result, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
            except Exception as exc:
                raise self.error(entry, f"cannot batch {ref!r}: {_exc_text(exc)}") from exc
        if isinstance(result, torch.Tensor) or not (hasattr(result, "__iter__") or hasattr(result, "__getitem__")):
            raise self.error(entry, f"{ref!r} returned {_describe(result)}, not an iterable of batches")
        return result

    def _compose_transforms(self) -> Any:
        v2 = _torchvision_transforms()[0]
        compose = v2.Compose if v2 is not None else _torchvision_transforms()[1].Compose
        return compose(list(self._transform_objs))

    def resolve_device(self, override: str | torch.device | None = None) -> torch.device:
        """The device to run on: ``override`` (e.g. ``--device``) if given, else ``[run].device``, else CPU.

        Raises :class:`SpecError` (spec's device) or :class:`OptionError` (override) when the
        device is malformed or not available on this machine.
        """
        if override is not None:
            try:
                return check_device(override)
            except ValueError as exc:
                raise OptionError(f"device {str(override)!r}: {exc}") from None
        if self.device is None:
            return torch.device("cpu")
        try:
            return check_device(self.device)
        except ValueError as exc:
            raise self.error("[run].device", f"{self.device!r}: {exc}") from None


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that it exists here; ``ValueError`` with the reason otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a device ({_exc_text(exc)})") from None
    if dev.type == "meta":
        raise ValueError("the meta device holds no data")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("MPS is not available on this machine")
    return dev


def _syntax_check_device(text: str) -> None:
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a device ({_exc_text(exc)})") from None
    if dev.type == "meta":
        raise ValueError("the meta device holds no data")


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


class _SpecParser:
    """Turns the TOML document into a :class:`BNSpec`, raising SpecError at the first mistake."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = Path(os.path.abspath(path)).parent

    def error(self, entry: str | None, message: str) -> SpecError:
        where = f"{self.path}: {entry}: " if entry else f"{self.path}: "
        return SpecError(where + message)

    # -- reading -------------------------------------------------------------------------

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

    # -- typed getters -------------------------------------------------------------------

    def get_str(self, table: Mapping[str, Any], key: str, where: str) -> str | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{where}.{key}", f"expected a non-empty string, got {_describe(value)}")
        return value

    def get_int(self, table: Mapping[str, Any], key: str, where: str, *, minimum: int) -> int | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.error(f"{where}.{key}", f"expected {what}, got {_describe(value)}")
        return value

    def get_list(self, table: Mapping[str, Any], key: str, where: str) -> list[Any]:
        value = table.get(key, [])
        if not isinstance(value, list):
            raise self.error(f"{where}.{key}", f"expected an array, got {_describe(value)}")
        return list(value)

    def get_table(self, table: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(f"{where}.{key}", f"expected a table, got {_describe(value)}")
        return dict(value)

    def resolve_paths(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in kwargs.items():
            if isinstance(value, str) and _is_path_key(key) and value and "://" not in value:
                p = Path(value).expanduser()
                if not p.is_absolute():
                    p = self.folder / p
                value = str(p)
            out[key] = value
        return out

    # -- references ----------------------------------------------------------------------

    def resolve_ref(self, text: str, entry: str) -> Any:
        """Import ``module:attr`` / ``file.py:attr`` (or ``module.attr``) and return the object."""
        target, sep, attr = text.rpartition(":")
        if not sep:
            target, sep, attr = text.rpartition(".")
        target, attr = target.strip(), attr.strip()
        if not sep or not target or not attr:
            raise self.error(entry, f"{text!r} is not a reference: expected 'module:attribute' or 'file.py:attribute'")
        if target.endswith(".py") or "/" in target or "\\" in target:
            module = self.import_file(target, entry)
            origin = target
        else:
            try:
                with _on_sys_path(self.folder, front=False):
                    module = importlib.import_module(target)
            except Exception as exc:  # ImportError, or anything the module raised while importing
                raise self.error(entry, f"cannot import {target!r}: {_exc_text(exc)}") from exc
            origin = target
        obj: Any = module
        done = []
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                owner = origin + (":" + ".".join(done) if done else "")
                raise self.error(entry, f"{owner!r} has no attribute {part!r}") from None
            except Exception as exc:  # a property/module __getattr__ raising
                raise self.error(entry, f"cannot get {text!r}: {_exc_text(exc)}") from exc
            done.append(part)
        return obj

    def import_file(self, target: str, entry: str) -> Any:
        file = Path(target).expanduser()
        if not file.is_absolute():
            file = self.folder / file
        file = Path(os.path.abspath(file))
        if not file.is_file():
            raise self.error(entry, f"no such file: {str(file)!r}")
        digest = hashlib.sha1(str(file).encode()).hexdigest()[:12]
        name = f"_ckptavg_spec_{file.stem.replace('-', '_')}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
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
            raise self.error(entry, f"cannot import {target!r}: {_exc_text(exc)}") from exc
        return module

    # -- transforms ----------------------------------------------------------------------

    def parse_transforms(self, items: list[Any]) -> tuple[list[TransformSpec], list[Any]]:
        specs: list[TransformSpec] = []
        objs: list[Any] = []
        if not items:
            return specs, objs
        try:
            v2, v1 = _torchvision_transforms()
        except ImportError as exc:
            raise self.error("[data].transforms", f"torchvision is needed for transforms: {_exc_text(exc)}") from exc
        for i, item in enumerate(items):
            where = f"[data].transforms[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict):
                raise self.error(
                    where,
                    f"expected a table {{ name = ..., args = [...], kwargs = {{...}} }} "
                    f"or a name, got {_describe(item)}",
                )
            self.check_keys(item, _TRANSFORM_KEYS, where)
            name = self.get_str(item, "name", where)
            if name is None:
                raise self.error(where, "missing 'name' (a torchvision transform, e.g. 'Resize')")
            args = self.get_list(item, "args", where)
            kwargs = self.get_table(item, "kwargs", where)
            if ":" in name:
                cls = self.resolve_ref(name, f"{where}.name")
            else:
                cls = getattr(v2, name, None) if v2 is not None else None
                if cls is None:
                    cls = getattr(v1, name, None)
                if cls is None or not callable(cls) or name.startswith("_"):
                    known = sorted({n for m in (v2, v1) if m is not None for n in dir(m) if n[:1].isupper()})
                    close = difflib.get_close_matches(name, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    module = "torchvision.transforms.v2" if v2 is not None else "torchvision.transforms"
                    raise self.error(f"{where}.name", f"unknown transform {name!r}: not in {module}{hint}")
            call_args = [_dtype_from_text(a, plain=name in ("ToDtype", "ConvertImageDtype")) for a in args]
            call_kwargs = {k: _dtype_from_text(v, plain=k == "dtype") for k, v in kwargs.items()}
            try:
                obj = cls(*call_args, **call_kwargs)
            except Exception as exc:
                raise self.error(where, f"{name}(...) failed: {_exc_text(exc)}") from exc
            specs.append(TransformSpec(name=name, args=args, kwargs=kwargs))
            objs.append(obj)
        return specs, objs

    # -- the whole document --------------------------------------------------------------

    def parse(self) -> BNSpec:
        doc = self.read()
        for key, value in doc.items():
            if key not in _SECTIONS:
                close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
                hint = f"did you mean [{close[0]}]? " if close else ""
                raise self.error(f"[{key}]", f"unknown section ({hint}expected [model], [data], [run])")
            if not isinstance(value, dict):
                raise self.error(f"[{key}]", f"expected a table (section), got {_describe(value)}")
        for section in ("model", "data"):
            if section not in doc:
                raise self.error(f"[{section}]", "missing section")
        for section, table in doc.items():
            self.check_keys(table, _SECTIONS[section], f"[{section}]")

        model, data, run = doc["model"], doc["data"], doc.get("run", {})

        # [model]
        factory = self.get_str(model, "factory", "[model]")
        if factory is None:
            raise self.error("[model].factory", 'missing (e.g. factory = "torchvision.models:resnet18")')
        model_args = self.get_list(model, "args", "[model]")
        model_kwargs = self.resolve_paths(self.get_table(model, "kwargs", "[model]"))
        prefix = None
        if "prefix" in model:
            prefix = model["prefix"]
            if not isinstance(prefix, str):
                raise self.error("[model].prefix", f"expected a string, got {_describe(prefix)}")
            prefix = prefix or None

        # [data]
        loader = self.get_str(data, "loader", "[data]")
        dataset = self.get_str(data, "dataset", "[data]")
        if (loader is None) == (dataset is None):
            what = "both" if loader is not None else "neither"
            raise self.error("[data]", f"give exactly one of 'loader' or 'dataset' (found {what})")
        if loader is not None:
            for key in _DATASET_ONLY:
                if key in data:
                    raise self.error(
                        f"[data].{key}",
                        "only valid with 'dataset' (a 'loader' builds its own batches: pass its "
                        "options in [data].kwargs)",
                    )
        data_args = self.get_list(data, "args", "[data]")
        data_kwargs = self.resolve_paths(self.get_table(data, "kwargs", "[data]"))
        batch_size = self.get_int(data, "batch_size", "[data]", minimum=1)
        num_workers = self.get_int(data, "num_workers", "[data]", minimum=0)
        max_batches = self.get_int(data, "max_batches", "[data]", minimum=1)
        transform_items = self.get_list(data, "transforms", "[data]")
        if transform_items and "transform" in data_kwargs:
            raise self.error("[data].transforms", "[data].kwargs already has a 'transform': give one or the other")
        selector = data.get("input")
        if "input" in data and (isinstance(selector, bool) or not isinstance(selector, int | str) or selector == ""):
            raise self.error(
                "[data].input", f"expected an index (integer) or a key (string), got {_describe(selector)}"
            )
        call = self.get_str(data, "call", "[data]")
        if call is not None and "input" in data:
            raise self.error("[data].call", "give either 'input' or 'call', not both")

        # [run]
        device = self.get_str(run, "device", "[run]")
        if device is not None:
            try:
                _syntax_check_device(device)
            except ValueError as exc:
                raise self.error("[run].device", f"{device!r}: {exc}") from None

        # Resolve references now, so that a typo fails before any heavy work.
        factory_obj = self.resolve_ref(factory, "[model].factory")
        if not callable(factory_obj):
            raise self.error("[model].factory", f"{factory!r} is {_describe(factory_obj)}, not callable")
        data_entry = "[data].loader" if loader is not None else "[data].dataset"
        data_ref = loader if loader is not None else dataset
        assert data_ref is not None
        data_obj = self.resolve_ref(data_ref, data_entry)
        if loader is not None and not callable(data_obj):
            if not (hasattr(data_obj, "__iter__") or hasattr(data_obj, "__getitem__")):
                raise self.error(data_entry, f"{loader!r} is {_describe(data_obj)}: neither callable nor iterable")
            if data_args or data_kwargs:
                raise self.error("[data].kwargs", f"{loader!r} is not callable, so it takes no args/kwargs")
        if dataset is not None and not callable(data_obj):
            raise self.error(data_entry, f"{dataset!r} is {_describe(data_obj)}, not callable")
        call_obj = None
        if call is not None:
            call_obj = self.resolve_ref(call, "[data].call")
            if not callable(call_obj):
                raise self.error("[data].call", f"{call!r} is {_describe(call_obj)}, not callable")
        transforms, transform_objs = self.parse_transforms(transform_items)

        return BNSpec(
            path=self.path,
            factory=factory,
            model_args=model_args,
            model_kwargs=model_kwargs,
            prefix=prefix,
            loader=loader,
            dataset=dataset,
            data_args=data_args,
            data_kwargs=data_kwargs,
            transforms=transforms,
            batch_size=batch_size if batch_size is not None else DEFAULT_BATCH_SIZE,
            num_workers=num_workers if num_workers is not None else 0,
            max_batches=max_batches,
            input=selector,
            call=call,
            device=device,
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
    return _SpecParser(Path(path)).parse()

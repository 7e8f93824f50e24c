"""The parser of BatchNorm spec files: the TOML document -> a :class:`~ckptavg.bn.spec.BNSpec`,
every reference imported and every type and key checked, failing with one line naming the file
and the entry."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import pkgutil
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..devices import parse_device
from ..errors import SpecError
from .spec import (
    DATASET_ONLY,
    DEFAULT_BATCH_SIZE,
    MAX_SPEC_BYTES,
    NOT_A_REFERENCE,
    PATH_KEYS,
    SECTIONS,
    TRANSFORM_KEYS,
    BNSpec,
    EvalSpec,
    TransformSpec,
    describe_value,
    is_iterable,
    on_sys_path,
    spec_error,
    torchvision_transforms,
    user_error,
)

__all__ = ["SpecParser"]


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


class SpecParser:
    """Turns the TOML document into a :class:`BNSpec`, raising SpecError at the first mistake."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = Path(os.path.abspath(path)).parent

    def error(self, entry: str | None, message: str) -> SpecError:
        return spec_error(self.path, entry, message)

    def read(self) -> dict[str, Any]:
        """The spec's TOML document: a regular file of at most :data:`MAX_SPEC_BYTES`, checked before reading
        (a device, a FIFO or a huge file is a one-line error, never an unbounded read)."""
        try:
            # O_NONBLOCK: opening a FIFO that no one writes to returns at once (and is refused below)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise self.error(None, "not a regular file (a spec is a TOML file; devices, FIFOs and "
                                           "folders are refused)")
                if st.st_size > MAX_SPEC_BYTES:
                    raise self.error(None, f"{st.st_size} bytes, larger than the {MAX_SPEC_BYTES >> 20} MiB a spec "
                                           "may have")
                data = fh.read(MAX_SPEC_BYTES + 1)
        except OSError as exc:
            raise self.error(None, f"cannot read the spec: {exc.strerror or exc}") from None
        if len(data) > MAX_SPEC_BYTES:  # grew while being read
            raise self.error(None, f"larger than the {MAX_SPEC_BYTES >> 20} MiB a spec may have")
        try:
            return tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self.error(None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise self.error(None, f"invalid TOML: {' '.join(str(exc).split())[:200]}") from None
        except RecursionError:
            raise self.error(None, "invalid TOML: arrays or inline tables nested too deeply") from None
        except ValueError as exc:  # an integer beyond Python's digit limit for int()
            raise self.error(None, f"invalid TOML: {' '.join(str(exc).split())[:200]}") from None

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
            raise self.error(f"{where}.{key}", f"expected {what}, got {describe_value(table[key])}")
        return table[key]

    def resolve_paths(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Path-like values (see the module docstring) made absolute against the spec's folder."""
        out = dict(kwargs)
        for key, value in kwargs.items():
            path_key = key in PATH_KEYS or key.endswith(tuple("_" + k for k in PATH_KEYS))
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
            raise self.error(entry, f"{text!r} {NOT_A_REFERENCE}")
        is_file = target.endswith(".py") or "/" in target or "\\" in target
        module = self.import_file(target, entry) if is_file else target
        try:
            with on_sys_path(self.folder, front=False):
                return pkgutil.resolve_name(f"{module}:{attr}")
        except Exception as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("invalid format"):  # resolve_name's own check
                raise self.error(entry, f"{text!r} {NOT_A_REFERENCE}") from None
            if module not in sys.modules:  # the import itself failed (or anything the module raised)
                raise self.error(entry, f"cannot import {target!r}: {user_error(exc)}") from exc
            parts = attr.split(".")
            if isinstance(exc, AttributeError) and exc.name in parts:
                done = parts[: parts.index(exc.name)]
                owner = target + (":" + ".".join(done) if done else "")
                raise self.error(entry, f"{owner!r} has no attribute {exc.name!r}") from None
            raise self.error(entry, f"cannot get {text!r}: {user_error(exc)}") from exc

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
            with on_sys_path(file.parent, front=True):
                module_spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(name, None)
            if not isinstance(exc, Exception):
                raise
            raise self.error(entry, f"cannot import {target!r}: {user_error(exc)}") from exc
        return name

    def resolve_callable(self, text: str, entry: str) -> Any:
        obj = self.resolve_ref(text, entry)
        if not callable(obj):
            raise self.error(entry, f"{text!r} is {describe_value(obj)}, not callable")
        return obj

    # -- transforms ----------------------------------------------------------------------

    def parse_transforms(self, items: list[Any], section: str = "data") -> tuple[list[TransformSpec], list[Any]]:
        specs: list[TransformSpec] = []
        objs: list[Any] = []
        if not items:
            return specs, objs
        try:
            v2, v1 = torchvision_transforms()
        except ImportError as exc:
            message = f"torchvision is needed for transforms: {user_error(exc)}"
            raise self.error(f"[{section}].transforms", message) from exc
        for i, item in enumerate(items):
            where = f"[{section}].transforms[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict):
                table = "{ name = ..., args = [...], kwargs = {...} }"
                raise self.error(where, f"expected a table {table} or a name, got {describe_value(item)}")
            self.check_keys(item, TRANSFORM_KEYS, where)
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
                raise self.error(where, f"{name}(...) failed: {user_error(exc)}") from exc
            specs.append(TransformSpec(name=name, args=args, kwargs=kwargs))
        return specs, objs

    # -- [eval] ---------------------------------------------------------------------------

    def parse_eval(self, table: Mapping[str, Any]) -> EvalSpec:
        """The optional ``[eval]`` section: a held-out source (the forms of ``[data]``) and a metric."""
        loader, dataset = self.get(table, "loader", "[eval]", "str"), self.get(table, "dataset", "[eval]", "str")
        if (loader is None) == (dataset is None):
            what = "both" if loader is not None else "neither"
            raise self.error("[eval]", f"give exactly one of 'loader' or 'dataset' (found {what})")
        for key in DATASET_ONLY:
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
            raise self.error("[eval].higher_is_better", f"expected true or false, got {describe_value(higher)}")
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
                if not is_iterable(data_obj):
                    raise self.error(entry, f"{loader!r} is {describe_value(data_obj)}: neither callable nor iterable")
                if args or kwargs:
                    raise self.error("[eval].kwargs", f"{loader!r} is not callable, so it takes no args/kwargs")
        metric_obj = self.resolve_callable(metric, "[eval].metric")
        transforms, transform_objs = self.parse_transforms(transform_items, "eval")
        return EvalSpec(metric=metric, higher_is_better=higher, loader=loader, dataset=dataset, args=args,
                        kwargs=kwargs, transforms=transforms, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                        num_workers=num_workers or 0, _data_obj=data_obj, _metric_obj=metric_obj,
                        _transform_objs=transform_objs)

    # -- the whole document --------------------------------------------------------------

    def sections(self) -> dict[str, Any]:
        """The document, its sections and their keys checked."""
        doc = self.read()
        for key, value in doc.items():
            if key not in SECTIONS:
                close = difflib.get_close_matches(key, list(SECTIONS), n=1)
                hint = f"did you mean [{close[0]}]? " if close else ""
                raise self.error(f"[{key}]", f"unknown section ({hint}expected [model], [data], [run], [eval])")
            if not isinstance(value, dict):
                raise self.error(f"[{key}]", f"expected a table (section), got {describe_value(value)}")
        for section in ("model", "data"):
            if section not in doc:
                raise self.error(f"[{section}]", "missing section")
        for section, table in doc.items():
            self.check_keys(table, SECTIONS[section], f"[{section}]")
        return doc

    def parse(self) -> BNSpec:
        """The whole spec: every section's syntax first, then every reference resolved, so that a
        typo fails before any heavy work."""
        doc = self.sections()
        model, data, run = doc["model"], doc["data"], doc.get("run", {})

        # [model]
        factory = self.get(model, "factory", "[model]", "str")
        if factory is None:
            raise self.error("[model].factory", 'missing (e.g. factory = "torchvision.models:resnet18")')
        model_args = self.get(model, "args", "[model]", "list")
        model_kwargs = self.resolve_paths(self.get(model, "kwargs", "[model]", "table"))
        prefix = model.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise self.error("[model].prefix", f"expected a string, got {describe_value(prefix)}")

        # [data]
        loader, dataset = self.get(data, "loader", "[data]", "str"), self.get(data, "dataset", "[data]", "str")
        if (loader is None) == (dataset is None):
            what = "both" if loader is not None else "neither"
            raise self.error("[data]", f"give exactly one of 'loader' or 'dataset' (found {what})")
        for key in DATASET_ONLY:
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
                "[data].input", f"expected an index (integer) or a key (string), got {describe_value(selector)}"
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
                if not is_iterable(data_obj):
                    raise self.error(data_entry,
                                     f"{loader!r} is {describe_value(data_obj)}: neither callable nor iterable")
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

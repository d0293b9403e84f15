"""The user's own code named in a recipe (``package.module:attr``: model factories, datasets).

It is imported from the recipe's folder first, then the working directory, then ``sys.path``, so a
``mymodels.py`` beside the recipe works from any working directory without PYTHONPATH (the way
Python itself finds the modules beside a script). :func:`add_root` is called by ``load_recipe``
for the recipe file's folder; the folders stay on ``sys.path`` for the rest of the process, so a
user module's own imports of its neighbours, at import time or later, work too.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from compress.errors import CompressError, first_line

_roots: list[Path] = []


def add_root(folder: str | Path) -> None:
    """Search ``folder`` (a recipe's folder) for user modules, before the working directory."""
    path = Path(folder).resolve()
    if path in _roots:
        _roots.remove(path)
    _roots.insert(0, path)


def roots() -> list[Path]:
    """Where user modules are looked for, in order (before the rest of sys.path)."""
    cwd = Path.cwd().resolve()
    return [*_roots, *([] if cwd in _roots else [cwd])]


def split(spec: str) -> tuple[str, str]:
    """('package.module', 'attr') of ``spec``; ValueError when it is not of that form."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr or not all(p.isidentifier() for p in [*module.split("."), *attr.split(".")]):
        raise ValueError(f"{spec!r} must look like 'package.module:function'")
    return module, attr


def import_object(spec: str, field: str) -> Any:
    """The object ``spec`` names, imported from :func:`roots` first; one-line CompressError otherwise."""
    try:
        module_name, attr = split(spec)
    except ValueError as exc:
        raise CompressError(f"{field}: {exc}") from None
    for folder in reversed(roots()):
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if exc.name is not None and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            where = ", ".join(str(r) for r in roots())
            raise CompressError(
                f"{field}: cannot import {module_name!r}: no {top}.py or {top}/ package in {where} or on sys.path"
            ) from None
        raise CompressError(f"{field}: importing {module_name!r} failed: {first_line(exc)}") from None
    except Exception as exc:  # the user's module raised while importing: their bug, one line
        raise CompressError(
            f"{field}: importing {module_name!r} raised {type(exc).__name__}: {first_line(exc)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CompressError(f"{field}: {module_name!r} ({getattr(module, '__file__', '?')}) has no {attr!r}")
    return obj

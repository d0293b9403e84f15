"""compress: distill -> prune -> export -> INT8 -> benchmark, driven by one recipe.

The Python API is imported on first use (``import compress`` stays light: the deploy runtime
imports this package without torch): ``compress.run``, ``compress.prune``, ``compress.distill``
(compress/api.py) and ``compress.export_onnx``, ``compress.quantize_onnx``, ``compress.measure``
(compress/onnx_api.py).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from compress._version import __version__

if TYPE_CHECKING:
    from pathlib import Path

#: public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "run": "compress.api",
    "prune": "compress.api",
    "RunResult": "compress.api",
    "export_onnx": "compress.onnx_api",
    "quantize_onnx": "compress.onnx_api",
    "measure": "compress.onnx_api",
    "load_data": "compress.onnx_api",
}


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    from compress.recipe import load_recipe as _load

    return _load(path, overrides)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Distill:
    """``compress.distill`` names two things: the function :func:`compress.api.distill` (calling it)
    and the subpackage compress/distill/ (its attributes: ``compress.distill.kd``, ``.LOSSES``).
    Importing a subpackage sets the package's attribute to it, which would shadow the function; so
    the attribute is this object, which is both."""

    @property
    def __wrapped__(self) -> Any:  # inspect.signature and help() follow it to the function
        return importlib.import_module("compress.api").distill

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__wrapped__.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("compress.distill"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(importlib.import_module("compress.distill"), name, value)

    def __repr__(self) -> str:
        return "<function compress.distill (and package compress.distill)>"


class _Package(types.ModuleType):
    distill = property(lambda self: _DISTILL, lambda self, module: None)  # the import system's set: ignored


_DISTILL = _Distill()
sys.modules[__name__].__class__ = _Package


__all__ = ["__version__", "distill", "load_recipe", *_LAZY]

"""compress: distill -> prune -> export -> INT8 -> benchmark, driven by one recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress._version import __version__

if TYPE_CHECKING:
    from pathlib import Path


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    from compress.recipe import load_recipe as _load

    return _load(path, overrides)


def run(recipe: Any, out: str | Path | None = None, **kwargs: Any) -> Path:
    from pathlib import Path

    from compress.pipeline import run as _run

    return _run(recipe, Path(out) if out is not None else None, **kwargs)


__all__ = ["__version__", "load_recipe", "run"]

"""The recipe schema, assembled from the registries: ``data`` is a discriminated union on ``name``
over the dataset registry and ``stages`` one on ``kind`` over the stage registry, so the union (and
the JSON Schema) grow with the registries, discovered plugins included. Loading, overrides and
one-line errors are in the registry-free :mod:`compress.config`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, ValidationError, create_model

from compress import userpath
from compress.config import (
    BenchmarkConfig,
    RecipeBase,
    apply_override,
    dump_recipe,
    format_validation_error,
    read_yaml,
)
from compress.data import DATASETS
from compress.errors import CompressError
from compress.stages import STAGES

__all__ = [
    "BenchmarkConfig",
    "Recipe",
    "RecipeBase",
    "apply_override",
    "dump_recipe",
    "json_schema",
    "load_recipe",
    "read_yaml",
    "recipe_model",
    "validate_recipe",
]


def _union(classes: list[type[BaseModel]], key: str) -> Any:
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator=key)]  # noqa: UP007


@functools.cache
def _recipe_model(stage_kinds: tuple[str, ...], dataset_names: tuple[str, ...]) -> type[RecipeBase]:
    stage_union = _union([STAGES.get(k) for k in stage_kinds], "kind")
    data_union = _union([DATASETS.get(n) for n in dataset_names], "name")
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        data=(data_union, ...),
        stages=(list[stage_union], Field(min_length=1)),
    )


def recipe_model() -> type[RecipeBase]:
    """The Recipe class for the stages and datasets registered right now."""
    return _recipe_model(tuple(STAGES.names()), tuple(DATASETS.names()))


Recipe = RecipeBase  # for type hints; instances come from recipe_model()


def json_schema() -> dict[str, Any]:
    return recipe_model().model_json_schema()


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> RecipeBase:
    try:
        return recipe_model().model_validate(raw)
    except ValidationError as exc:
        raise CompressError(format_validation_error(exc, raw, source, recipe_model())) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeBase:
    """Read, override and validate a recipe; every problem is one-line CompressError."""
    path = Path(path)
    raw = read_yaml(path)
    userpath.add_root(path.parent)  # a recipe's own modules (models, datasets) sit beside it
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(raw, str(path))

"""The recipe schema, assembled from the registries: ``data`` is a discriminated union on ``name``
over the dataset registry and ``stages`` one on ``kind`` over the stage registry, so the union (and
the JSON Schema) grow with the registries, discovered plugins included. A data ``name`` with a
``:`` (``mypkg.data:load``) is the user's own function (:mod:`compress.data.user`); any other must
be registered ("unknown name ..., did you mean"). Loading, overrides and one-line errors are in the
registry-free :mod:`compress.config`.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, TypeAdapter, ValidationError, create_model

from compress import userpath
from compress.bench import runtimes
from compress.config import (
    BenchmarkConfig,
    RecipeBase,
    apply_override,
    dump_recipe,
    format_validation_error,
    read_yaml,
)
from compress.data import DATASETS
from compress.data.base import DatasetConfig
from compress.data.user import USER_DATASET
from compress.errors import CompressError
from compress.search.config import SearchConfig, TargetConfig
from compress.stages import STAGES

__all__ = [
    "BenchmarkConfig",
    "Recipe",
    "RecipeBase",
    "apply_override",
    "dump_recipe",
    "json_schema",
    "load_recipe",
    "read_recipe",
    "read_yaml",
    "recipe_model",
    "validate_data",
    "validate_recipe",
]


def _union(classes: list[type[BaseModel]], key: str) -> Any:
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator=key)]  # noqa: UP007


def _data_tag(value: Any) -> str | None:
    """Which dataset config validates ``value``: its ``name``, or the user-dataset config for any
    ``package.module:function``."""
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return USER_DATASET if isinstance(name, str) and ":" in name else name


def _check_data_name(value: Any) -> Any:
    """The one-line errors a data block's ``name`` gets before the union picks a member."""
    if isinstance(value, DatasetConfig):
        return value
    known = [n for n in DATASETS.names() if n != USER_DATASET]
    choices = f"{', '.join(known)}, or your own function 'package.module:function'"
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as {{name: digits}}, got {type(value).__name__} {value!r}")
    name = value.get("name")
    if name is None:
        raise ValueError(f"give the dataset's name: {choices}")
    if not isinstance(name, str) or (":" not in name and name not in known):
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {choices})"
        raise ValueError(f"unknown name {str(name)!r}{hint}")
    return value


def _data_union(dataset_names: tuple[str, ...]) -> Any:
    members = tuple(Annotated[DATASETS.get(n), Tag(n)] for n in dataset_names)
    union = members[0] if len(members) == 1 else Union[members]  # noqa: UP007
    return Annotated[union, Discriminator(_data_tag), BeforeValidator(_check_data_name)]


@functools.cache
def _recipe_model(stage_kinds: tuple[str, ...], dataset_names: tuple[str, ...]) -> type[RecipeBase]:
    stage_union = _union([STAGES.get(k) for k in stage_kinds], "kind")
    data_union = _data_union(dataset_names)
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        data=(data_union, ...),
        stages=(list[stage_union], Field(min_length=1)),
        target=(TargetConfig | None, Field(None, description="a budget for the deployable student (compress search)")),
        search=(SearchConfig | None, Field(None, description="how compress search explores candidates")),
    )


def recipe_model() -> type[RecipeBase]:
    """The Recipe class for the stages and datasets registered right now."""
    return _recipe_model(tuple(STAGES.names()), tuple(DATASETS.names()))


Recipe = RecipeBase  # for type hints; instances come from recipe_model()


def json_schema() -> dict[str, Any]:
    return recipe_model().model_json_schema()


class _Located:
    """A ValidationError whose locations name a user dataset by what the recipe wrote: pydantic puts
    the union's tag (``package.module:function``) there, and the dotted path drops a tag only when
    it is the block's own ``name``."""

    def __init__(self, exc: ValidationError, raw: Any, data_at: tuple, prefix: tuple = ()) -> None:
        self.exc, self.raw, self.data_at, self.prefix = exc, raw, data_at, prefix

    def errors(self, **kwargs: Any) -> list[dict[str, Any]]:
        node = self.raw
        for part in self.data_at:
            node = node.get(part) if isinstance(node, dict) else None
        name = node.get("name") if isinstance(node, dict) else None
        out, n = [], len(self.data_at)
        for err in self.exc.errors(**kwargs):
            loc = (*self.prefix, *err["loc"])
            if isinstance(name, str) and loc[:n] == self.data_at and loc[n : n + 1] == (USER_DATASET,):
                loc = (*loc[:n], name, *loc[n + 1 :])
            out.append({**err, "loc": loc})
        return out


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> RecipeBase:
    try:
        recipe = recipe_model().model_validate(raw)
    except ValidationError as exc:
        located: Any = _Located(exc, raw, ("data",))
        raise CompressError(format_validation_error(located, raw, source, recipe_model())) from None
    runtimes.check(recipe.benchmark.runtimes, f"{source}: benchmark.runtimes")  # known and installed
    if getattr(recipe, "target", None) is not None:
        runtimes.check([recipe.target.runtime], f"{source}: target.runtime")
    return recipe


def validate_data(raw: dict[str, Any], source: str = "data") -> DatasetConfig:
    """A data block on its own (``compress bench --data``, ``compress quantize --data``), with the
    recipe's one-line errors (field paths start at ``data``)."""
    adapter = TypeAdapter(_data_union(tuple(DATASETS.names())))
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        wrapped = {"data": raw}
        located: Any = _Located(exc, wrapped, ("data",), prefix=("data",))
        raise CompressError(format_validation_error(located, wrapped, source)) from None


def read_recipe(path: str | Path, *, user_code: bool = True) -> dict[str, Any]:
    """A recipe file as a dict (not validated), its folder registered for the user modules it names
    unless ``user_code=False``: a run directory's recorded recipe is data, and a module planted beside
    it must never be what a later import finds."""
    path = Path(path)
    raw = read_yaml(path)
    if user_code:
        userpath.add_root(path.parent)  # a recipe's own modules (models, datasets) sit beside it
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, user_code: bool = True) -> RecipeBase:
    """Read, override and validate a recipe; every problem is one-line CompressError."""
    path = Path(path)
    raw = read_recipe(path, user_code=user_code)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(raw, str(path))

"""The recipe: YAML (safe_load only) -> overrides -> one pydantic model, ``extra="forbid"`` everywhere.

``data`` is a discriminated union on ``name`` over the dataset registry and ``stages`` one on
``kind`` over the stage registry, so the union (and the JSON Schema) grow with the registries.
Every validation problem becomes a :class:`CompressError` whose one line names the file and field.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from compress.data import DATASETS
from compress.distill import LOSSES
from compress.errors import CompressError
from compress.models import ModelSpec
from compress.stages import STAGES


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[Annotated[int, Field(gt=0, le=4096)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    warmup: int = Field(10, ge=0, le=10_000)
    iters: int = Field(100, gt=0, le=100_000)
    threads: Annotated[int, Field(gt=0, le=1024)] | list[Annotated[int, Field(gt=0, le=1024)]] | None = Field(
        None, description="CPU threads to time at, one count or a list; default: torch's default"
    )
    devices: list[Literal["cpu", "cuda"]] = Field(default_factory=lambda: ["cpu", "cuda"], min_length=1)
    torch_snapshots: bool = Field(True, description="also time every intermediate torch student")
    torch_compile: bool = Field(False, description="also time torch models under torch.compile (slow to compile)")


class RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    teacher: ModelSpec | None = None
    student: ModelSpec
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)

    @model_validator(mode="after")
    def _stage_order(self) -> RecipeBase:
        have = {"teacher"} if self.teacher is not None else set()
        for i, stage in enumerate(self.stages):  # type: ignore[attr-defined]
            missing = stage.requirements() - have
            if missing:
                what = ", ".join(sorted(missing))
                hint = "a 'teacher:' model" if missing == {"teacher"} else "an earlier stage that provides it"
                raise ValueError(f"stages.{i} ({stage.kind}) needs {what}: add {hint}")
            have |= stage.provides
        return self


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


# ----------------------------------------------------------------------------- loading


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CompressError(f"{path}: no such file")
    if not path.is_file():
        raise CompressError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path}: cannot read ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CompressError(f"{path}{where}: invalid YAML: {problem}") from None
    if raw is None:
        raise CompressError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: a recipe must be a mapping, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.0.c=value`` in place; the value parses as a YAML scalar/flow value."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise CompressError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise CompressError(f"--set {key}: cannot parse value {text!r}") from None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise CompressError(f"--set {key}: {'.'.join(parts[:depth]) or 'recipe'} is a list; use an index")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise CompressError(f"--set {key}: index {idx} out of range (list has {len(node)} items)")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise CompressError(f"--set {key}: {here} is inside a {type(node).__name__}, not a mapping or list")


def _field_path(loc: tuple, raw: Any) -> str:
    """Render a pydantic error location as the dotted path a user would pass to --set.

    Discriminated unions insert the tag (``stages.2.prune.ratio``); drop it when the data at that
    point has no such key but carries it as its ``kind``/``name``.
    """
    out, node = [], raw
    for part in loc:
        if (
            isinstance(node, dict)
            and isinstance(part, str)
            and part not in node
            and part
            in (
                node.get("kind"),
                node.get("name"),
            )
        ):
            continue
        if isinstance(part, str) and part.startswith(("function-", "union[")):
            continue
        out.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(out) or "recipe"


def format_validation_error(exc: ValidationError, raw: Any, source: str) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        path = _field_path(err["loc"], raw)
        if err["type"] == "union_tag_invalid":
            import difflib

            tags = [t.strip().strip("'") for t in err["ctx"]["expected_tags"].split(",")]
            close = difflib.get_close_matches(str(err["ctx"]["tag"]), tags, n=1)
            msg = f"unknown {err['ctx']['discriminator'].strip(chr(39))} {err['ctx']['tag']!r}"
            msg += f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(tags)})"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
            model = _model_at(tuple(err["loc"][:-1]))
            if model is not None:
                import difflib

                close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
                renamed = getattr(model, "renamed", {}).get(str(err["loc"][-1]))  # a field that was replaced
                if renamed:
                    msg += f" ({renamed})"
                elif close:
                    msg += f" (did you mean {close[0]!r}?)"
        elif (
            "input" in err
            and err["type"] not in ("missing", "value_error")
            and not isinstance(err["input"], (dict, list))
        ):
            msg += f" (got {err['input']!r})"
        parts.append(msg if path == "recipe" and err["type"] == "value_error" else f"{path}: {msg}")
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return f"{source}: " + "; ".join(parts[:3]) + more


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """Best-effort: the pydantic class a location points into (for 'did you mean' hints)."""
    model: Any = recipe_model()
    for part in loc:
        if isinstance(part, int):
            continue
        if part in STAGES:
            model = STAGES.get(part)
            continue
        if part in DATASETS:
            model = DATASETS.get(part)
            continue
        if part in LOSSES:
            model = LOSSES.get(part)
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            args = getattr(ann, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> RecipeBase:
    try:
        return recipe_model().model_validate(raw)
    except ValidationError as exc:
        raise CompressError(format_validation_error(exc, raw, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeBase:
    """Read, override and validate a recipe; every problem is one-line CompressError."""
    path = Path(path)
    raw = read_yaml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(raw, str(path))


def dump_recipe(recipe: RecipeBase) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

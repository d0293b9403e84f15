"""The recipe's registry-free base: YAML (safe_load only), ``--set`` overrides, one-line validation
errors, and the top-level fields every recipe has.

The full schema (``data`` as a union over the dataset registry, ``stages`` over the stage registry)
is assembled from the registries in :mod:`compress.recipe`; nothing here knows a stage or dataset.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import CompressError
from compress.models import ModelSpec

if TYPE_CHECKING:
    from compress.data.base import DatasetConfig


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
    runtimes: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]] = Field(
        default_factory=lambda: ["onnxruntime"],
        min_length=1,
        description="runtimes to time ONNX files on, on CPU (compress.bench.runtimes: onnxruntime, openvino); "
        "each must be known and installed (compress.bench.runtimes.check)",
    )

    @field_validator("runtimes")
    @classmethod
    def _once_each(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))


class RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    teacher: ModelSpec | None = None
    student: ModelSpec
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)

    if TYPE_CHECKING:  # declared by the schema (compress.recipe) from the registries
        data: DatasetConfig
        stages: list[Any]

    @model_validator(mode="after")
    def _stage_order(self) -> RecipeBase:
        have = {"teacher"} if self.teacher is not None else set()
        for i, stage in enumerate(self.stages):
            missing = stage.requirements() - have
            if missing:
                what = ", ".join(sorted(missing))
                hint = "a 'teacher:' model" if missing == {"teacher"} else "an earlier stage that provides it"
                raise ValueError(f"stages.{i} ({stage.kind}) needs {what}: add {hint}")
            have |= stage.provides
        return self


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
    point has no such key but carries it as its ``kind``/``name``. Where the location leaves what
    the user wrote (a shorthand spelled out before validation: ``kd: {temperature: 0}`` fails at
    ``kd.losses.0.hinton.temperature``), name the field where the user wrote it.
    """
    out, node = [], raw
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part not in node:
            if part in (node.get("kind"), node.get("name")):
                continue
            if out and not part.startswith(("function-", "union[")) and loc[-1] in node:
                return ".".join([*out, str(loc[-1])])
        if isinstance(part, str) and part.startswith(("function-", "union[")):
            continue
        out.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(out) or "recipe"


def format_validation_error(exc: ValidationError, raw: Any, source: str, model: type[BaseModel] | None = None) -> str:
    """One line for the first three problems, each at its dotted path; ``model`` (the class that was
    validated) lets an unknown field get a "did you mean" hint."""
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        path = _field_path(err["loc"], raw)
        if err["type"] == "union_tag_invalid":
            tags = [t.strip().strip("'") for t in err["ctx"]["expected_tags"].split(",")]
            close = difflib.get_close_matches(str(err["ctx"]["tag"]), tags, n=1)
            msg = f"unknown {err['ctx']['discriminator'].strip(chr(39))} {err['ctx']['tag']!r}"
            msg += f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(tags)})"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
            where = model_at(model, tuple(err["loc"][:-1])) if model is not None else None
            if where is not None:
                close = difflib.get_close_matches(str(err["loc"][-1]), list(where.model_fields), n=1)
                renamed = getattr(where, "renamed", {}).get(str(err["loc"][-1]))  # a field that was replaced
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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic classes an annotation can hold (through Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _tag(model: type[BaseModel], key: str) -> Any:
    field = model.model_fields.get(key)
    return field.default if field is not None else None


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic class a validation-error location points into, found by walking the field
    annotations from ``root`` (a discriminated union's member by its ``kind``/``name`` tag)."""
    candidates = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [c for c in candidates if part in (_tag(c, "kind"), _tag(c, "name"))]
        if len(candidates) > 1 and tagged:
            candidates = tagged[:1]
            continue
        field = next((c.model_fields[part] for c in candidates if part in c.model_fields), None)
        if field is None:
            return None
        candidates = _models_in(field.annotation)
        if not candidates:
            return None
    return candidates[0] if len(candidates) == 1 else None


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def moved(prefix: str, *models: type[BaseModel], extra: tuple[str, ...] = ()) -> dict[str, str]:
    """``renamed`` hints for fields that moved into a sub-block ``prefix`` (old recipes get where they went)."""
    names = [n for m in models for n in m.model_fields] + list(extra)
    return {n: f"moved to {prefix}.{n}" for n in names}

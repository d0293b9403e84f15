"""Write docs/reference.md, the recipe field reference, from the pydantic classes themselves.

    python docs/gen_reference.py          # (re)write docs/reference.md
    python docs/gen_reference.py --check  # exit 1 with one line when docs/reference.md is stale

Nothing here names a stage's fields: every table comes from walking ``model_fields`` of the
registered stages, datasets and loss terms, the recipe's top-level model and its ``benchmark:``
block, and, recursively, every pydantic model a field's type mentions (``teachers: list[TeacherRef]``,
``optim: OptimConfig | None``, ...). A new stage or a new sub-object appears without editing this file.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference.md"
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticSerializationError, PydanticUndefined, to_jsonable_python  # noqa: E402

# ----------------------------------------------------------------------------- anchors and links


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


class Catalog:
    """Every class that gets a table: its heading, anchor and the group it belongs to."""

    def __init__(self) -> None:
        self.heading: dict[type[BaseModel], str] = {}
        self.groups: dict[str, set[type[BaseModel]]] = {}  # group anchor (stages, ...) -> its classes
        self.group_title: dict[str, str] = {}
        self.nested: list[type[BaseModel]] = []  # sub-models, in order of first mention
        self._used: set[str] = {"stages", "datasets", "loss-terms", "nested-settings", "models"}
        self._used |= {"importance-criteria", "recipe-field-reference"}

    def add(self, cls: type[BaseModel], heading: str, group: str | None = None) -> None:
        if cls in self.heading:
            return
        base, n = heading, 2
        while slug(heading) in self._used:
            heading = f"{base} ({n})"
            n += 1
        self._used.add(slug(heading))
        self.heading[cls] = heading
        if group is not None:
            self.groups.setdefault(group, set()).add(cls)

    def link(self, cls: type[BaseModel]) -> str:
        if cls not in self.heading:  # first mention of a sub-model: it gets a table of its own
            self.add(cls, cls.__name__)
            self.nested.append(cls)
        return f"[{cls.__name__}](#{slug(self.heading[cls])})"


# ----------------------------------------------------------------------------- types


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def constraints(metadata: list[Any], in_code: bool = False) -> list[str]:
    """``Field(gt=0, le=10)`` / ``Annotated[int, Field(...)]`` metadata as ``> 0``, ``≤ 10``, ...
    (``in_code``: the text goes inside a code span, so a pattern gets no backticks of its own)."""
    out = []
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "multiple_of": "multiple of"}
    for item in metadata:
        for attr, sym in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sym} {number(value)}")
        for attr, what in (("min_length", "at least {} long"), ("max_length", "at most {} long")):
            value = getattr(item, attr, None)
            if value is not None:
                out.append(what.format(value))
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            out.append(f"matches {pattern}" if in_code else f"matches `{pattern}`")
    return out


def union_members(tp: Any) -> list[Any] | None:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return list(typing.get_args(tp))
    return None


def render_type(tp: Any, cat: Catalog) -> str:
    """An annotation as a reader would write it: ``float | None``, ``'a' | 'b'``, ``list[TeacherRef]``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        inner = render_type(args[0], cat)
        extra = []
        for meta in args[1:]:
            extra += constraints(getattr(meta, "metadata", [meta]), in_code=True)
        return f"{inner} ({', '.join(extra)})" if extra else inner
    members = union_members(tp)
    if members is not None:
        models = {m for m in members if is_model(m)}
        for group, classes in cat.groups.items():  # a union over a whole registry: link the registry
            if len(models) > 1 and models == classes and len(models) == len(members):
                return f"[{cat.group_title[group]}](#{group})"
        rest = [m for m in members if m is not type(None)]
        text = " | ".join(render_type(m, cat) for m in rest)
        return f"{text} | None" if len(rest) < len(members) else text
    if origin is typing.Literal:
        return " | ".join(repr(a.value) if isinstance(a, enum.Enum) else repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else render_type(a, cat) for a in args)}]" if args else name
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    if is_model(tp):
        return cat.link(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def models_in(tp: Any) -> Iterator[type[BaseModel]]:
    if is_model(tp):
        yield tp
    for arg in typing.get_args(tp):
        yield from models_in(arg)


# ----------------------------------------------------------------------------- values


def yamlish(value: Any) -> str:
    """A default as it would be written in a recipe (models, paths, enums and tuples included)."""
    try:
        value = to_jsonable_python(value)
    except PydanticSerializationError:
        return str(value)
    return flow(value)


def flow(value: Any) -> str:
    """JSON-able data as YAML flow style: ``[1, 64]``, ``{name: hinton, alpha: 0.9}``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, str):
        plain = value and re.fullmatch(r"[A-Za-z_./<>~$][\w./<>~$-]*", value) and value not in ("null", "true", "false")
        return value if plain else json.dumps(value, ensure_ascii=False)
    return str(value)


def render_default(field: FieldInfo, cat: Catalog) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:  # a factory that takes the validated data
            return "computed"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return f"see {cat.link(type(value))}"
    return f"`{yamlish(value)}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def code_cell(text: str) -> str:
    """A type inside a table cell: links stay links, the rest is code; ``|`` escaped either way."""
    parts = re.split(r"(\[[^\]]+\]\([^)]+\))", text)
    out = []
    for part in parts:
        if part.startswith("[") or not part.strip():
            out.append(part)
        else:
            lead, core, trail = re.match(r"(\s*)(.*?)(\s*)$", part).groups()
            out.append(f"{lead}`{core}`{trail}")
    return "".join(out).replace("|", "\\|")


def docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def description(cls: type[BaseModel], name: str, field: FieldInfo) -> str:
    """The field's description, or the one of the same field in a base class it overrides."""
    if field.description:
        return field.description
    for base in cls.__mro__[1:]:
        inherited = getattr(base, "model_fields", {}).get(name) if is_model(base) else None
        if inherited is not None and inherited.description:
            return inherited.description
    return ""


# ----------------------------------------------------------------------------- tables


def field_table(cls: type[BaseModel], cat: Catalog, first: str | None = None) -> list[str]:
    fields = dict(cls.model_fields)
    if not fields:
        return ["No fields."]
    if first in fields:  # the discriminator (kind:/name:) leads its table
        fields = {first: fields.pop(first), **fields}
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in fields.items():
        key = field.alias or name
        typ = code_cell(render_type(field.annotation, cat))
        limits = constraints(field.metadata)
        if limits:
            typ += " (" + cell(", ".join(limits)) + ")"
        lines.append(f"| `{key}` | {typ} | {render_default(field, cat)} | {cell(description(cls, name, field))} |")
    return lines


def section(
    cls: type[BaseModel], cat: Catalog, level: str = "###", extra: list[str] | None = None, first: str | None = None
) -> list[str]:
    lines = [f"{level} {cat.heading[cls]}", ""]
    doc = docstring(cls)
    if doc:
        lines += [doc, ""]
    if extra:
        lines += extra + [""]
    lines += field_table(cls, cat, first)
    return lines + [""]


def stage_notes(cls: type) -> list[str]:
    notes = []
    for attr, what in (("needs", "needs"), ("provides", "provides")):
        value = getattr(cls, attr, None)
        if isinstance(value, frozenset | set | tuple | list) and value:
            notes.append(f"{what} {', '.join(f'`{v}`' for v in sorted(value))}")
    return [f"Class `{cls.__module__}.{cls.__qualname__}`" + ("; " + "; ".join(notes) if notes else "") + "."]


def registry_list(items: list[tuple[str, Any]]) -> list[str]:
    lines = ["| name | what |", "|---|---|"]
    for name, obj in items:
        doc = docstring(obj) if isinstance(obj, type) else inspect.getdoc(obj) or ""
        lines.append(f"| `{name}` | {cell(doc.split(chr(10) + chr(10))[0])} |")
    return lines + [""]


def generate() -> str:
    from compress.data import DATASETS
    from compress.distill import LOSSES
    from compress.importance import IMPORTANCES
    from compress.models import MODELS
    from compress.recipe import recipe_model
    from compress.stages import STAGES

    recipe = recipe_model()
    cat = Catalog()
    cat.add(recipe, "Recipe")
    # (anchor, section title, one entry, the field that picks an entry, registry)
    groups = (
        ("stages", "Stages", "stage", "kind", STAGES),
        ("datasets", "Datasets", "dataset", "name", DATASETS),
        ("loss-terms", "Loss terms", "loss term", "name", LOSSES),
    )
    for anchor, _, what, _, registry in groups:
        cat.group_title[anchor] = what
        for name, cls in registry.items():
            cat.add(cls, f"{what} `{name}`", group=anchor)
    benchmark = recipe.model_fields.get("benchmark")
    bench_cls = next(models_in(benchmark.annotation), None) if benchmark is not None else None
    if bench_cls is not None:
        cat.add(bench_cls, "benchmark")

    body: list[str] = []
    body += section(recipe, cat, "##", ["The top level of a recipe file. Every class below forbids unknown fields."])
    if bench_cls is not None:
        body += section(bench_cls, cat, "##", ["The `benchmark:` block: how every artifact is timed."])
    for anchor, title, _, key, registry in groups:
        names = ", ".join(f"`{n}`" for n in registry.names())
        body += [f"## {title}", "", f"Registered {title.lower()}, chosen by `{key}:`: {names}.", ""]
        for _, cls in registry.items():
            body += section(cls, cat, "###", stage_notes(cls) if anchor == "stages" else None, first=key)
    # sub-models: rendered as they are first linked; rendering one may link more
    nested_body: list[str] = []
    done = 0
    while done < len(cat.nested):
        cls = cat.nested[done]
        done += 1
        nested_body += section(cls, cat, "###")

    lines = [
        "<!-- Generated by docs/gen_reference.py from the pydantic classes; do not edit. -->",
        "",
        "# Recipe field reference",
        "",
        "Every field a recipe accepts, generated from the schema the code validates against "
        "(`python docs/gen_reference.py` rewrites this file). `compress schema` prints the same as JSON Schema; "
        "`compress validate RECIPE` prints a recipe with every default filled in. For what the stages do, "
        "see the [manual](index.md).",
        "",
        "- [Recipe](#recipe) · [benchmark](#benchmark) · [Stages](#stages) · [Datasets](#datasets) · "
        "[Loss terms](#loss-terms) · [Nested settings](#nested-settings) · [Models](#models) · "
        "[Importance criteria](#importance-criteria)",
        "",
    ]
    lines += body
    lines += ["## Nested settings", "", "Sub-objects used by the fields above.", ""] + nested_body
    lines += ["## Models", "", "Registered model names (`teacher.model`, `student.model`). Also accepted: "]
    lines[-1] += "`torchvision:<name>` (any torchvision classifier) and `package.module:function` (your factory)."
    lines += [""] + registry_list(list(MODELS.items()))
    lines += ["## Importance criteria", "", "Channel-ranking criteria for the prune stage's `method:`.", ""]
    lines += registry_list(list(IMPORTANCES.items()))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")
    parser.add_argument("--out", type=Path, default=OUT, help="the file to write or check (default docs/reference.md)")
    args = parser.parse_args(argv)
    text = generate()
    out: Path = args.out
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            what = "missing" if current is None else "stale"
            print(f"{shown} is {what}: run `python docs/gen_reference.py`", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

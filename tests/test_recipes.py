"""Every shipped recipe validates; overrides and schema behave as documented."""

from pathlib import Path

import pytest

from compress.errors import CompressError
from compress.recipe import apply_override, json_schema, load_recipe, read_yaml
from compress.stages import STAGES

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "cifar_resnet.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path, monkeypatch, tmp_path):
    # Recipes name data paths relative to the project root.
    monkeypatch.chdir(path.parent.parent)
    raw = read_yaml(path)
    root = raw["data"].get("root")
    overrides = []
    if root is not None and not Path(root).exists():
        # The data lives outside the repo (../shared/data); validate everything else against a stand-in.
        overrides = [f"data.root={tmp_path}"]
    recipe = load_recipe(path, overrides)
    assert recipe.stages and recipe.name


def test_overrides_reach_list_items_and_parse_yaml_scalars(tiny):
    apply_override(tiny, "stages.1.temperature=2")
    apply_override(tiny, "benchmark.batch_sizes=[1, 2, 3]")
    apply_override(tiny, "data.augment=false")
    assert tiny["stages"][1]["temperature"] == 2
    assert tiny["benchmark"]["batch_sizes"] == [1, 2, 3]
    assert tiny["data"]["augment"] is False


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("stages.9.lr=1", "index 9 out of range"),
        ("stages.x.lr=1", "is a list; use an index"),
        ("name.sub=1", "inside a str"),
        ("noequals", "expected dotted.key=value"),
    ],
)
def test_bad_overrides(tiny, assignment, message):
    with pytest.raises(CompressError, match=message):
        apply_override(tiny, assignment)


def test_schema_is_a_discriminated_union_over_every_stage():
    schema = json_schema()
    text = str(schema)
    for kind in STAGES.names():
        assert f"'{kind}'" in text
    assert "discriminator" in text
    assert schema["properties"]["stages"]["type"] == "array"


def test_every_block_of_the_schema_rejects_unknown_fields():
    """A typo anywhere (a stage, its optim:/kd:/finetune: block, a loss term) is an error, never ignored."""
    from compress.config import _models_in
    from compress.recipe import recipe_model

    seen, todo = set(), [recipe_model()]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        assert cls.model_config.get("extra") == "forbid", f"{cls.__name__} accepts unknown fields"
        for field in cls.model_fields.values():
            todo += _models_in(field.annotation)
    names = {c.__name__ for c in seen}
    assert {"OptimConfig", "KD", "FineTune", "Hinton", "Prune", "BenchmarkConfig"} <= names

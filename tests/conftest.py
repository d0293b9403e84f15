"""Shared fixtures: tiny real recipes (synthetic or digits data) that run in seconds."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "synthetic", "image_size": 16, "train_size": 256, "test_size": 96, "batch_size": 32},
    "teacher": {"model": "resnet8x4"},
    "student": {"model": "resnet20"},
    "stages": [
        {"kind": "train", "target": "teacher", "epochs": 1, "optim": {"lr": 0.05}},
        {"kind": "distill", "epochs": 1, "optim": {"lr": 0.05}},
        {"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 1, "kd": True}},
        {"kind": "export"},
        {"kind": "quantize", "calibration_batches": 2},
    ],
    "benchmark": {"batch_sizes": [1, 8], "warmup": 1, "iters": 3, "devices": ["cpu"]},
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    import os

    os.environ.setdefault("COMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny() -> dict[str, Any]:
    """A fresh copy of the tiny recipe as a dict; tests edit it freely."""
    return copy.deepcopy(TINY)


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(raw: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


def digits_recipe(
    name: str, teacher: int, distill: int, finetune: int | None = None, calibration_batches: int = 2
) -> dict[str, Any]:
    """A real digits pipeline (teacher -> KD student -> [prune + KD fine-tune] -> ONNX -> INT8), fp32, fast."""
    stages: list[dict[str, Any]] = [
        {"kind": "train", "target": "teacher", "epochs": teacher, "optim": {"lr": 0.05, "precision": "fp32"}},
        {"kind": "distill", "epochs": distill, "optim": {"lr": 0.05, "precision": "fp32"}},
    ]
    if finetune is not None:
        tune = {"epochs": finetune, "optim": {"lr": 0.01, "precision": "fp32"}, "kd": True}
        stages.append({"kind": "prune", "ratio": 0.5, "finetune": tune})
    stages += [{"kind": "export"}, {"kind": "quantize", "calibration_batches": calibration_batches}]
    return {
        "name": name,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {"model": "digits_teacher"},
        "student": {"model": "digits_student"},
        "stages": stages,
        "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
    }


DIGITS_RUN = digits_recipe("deploy", 3, 4, calibration_batches=4)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small real digits run with every ONNX artifact (teacher, FP32, INT8): (run dir, report, recipe)."""
    from compress.pipeline import run
    from compress.recipe import validate_recipe

    out = tmp_path_factory.mktemp("deploy") / "run"
    recipe = validate_recipe(DIGITS_RUN)
    run(recipe, out, quiet=True)
    return out, json.loads((out / "report.json").read_text()), recipe

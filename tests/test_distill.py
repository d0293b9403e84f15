"""Distillation through the real pipeline on the digits data: combined losses, several teachers,
cached teacher logits; the one-line errors the stage raises before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compress.cli import main
from compress.pipeline import run
from compress.recipe import validate_recipe
from tests.conftest import digits_recipe
from tests.test_cli import check_fails_cleanly


def _distill_only(name: str, teacher_ckpt, **kd) -> dict:
    """Student distilled from a trained digits teacher (from the shared digits run), then ONNX."""
    recipe = digits_recipe(name, 1, 3)
    recipe["teacher"]["checkpoint"] = str(teacher_ckpt)
    recipe["stages"] = [
        {"kind": "distill", "epochs": 3, "optim": {"lr": 0.05, "precision": "fp32"}, "kd": kd},
        {"kind": "export"},
    ]
    return recipe


@pytest.fixture(scope="module")
def teacher_ckpt(digits_run):
    return digits_run[0] / "checkpoints" / "01-train" / "teacher.pt"


def _stage(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    return report["stages"][0]["metrics"]


def test_combined_losses_from_two_teachers(teacher_ckpt, tmp_path):
    """CE + DKD + attention + FitNets from the recipe's teacher and a second one from a checkpoint."""
    pairs = [{"student": "5", "teacher": "5"}, {"student": "9", "teacher": "9"}]  # ReLU outputs, 16 vs 64 ch.
    recipe = _distill_only(
        "combined",
        teacher_ckpt,
        losses=[
            {"name": "ce"},
            {"name": "dkd", "beta": 2.0, "warmup_epochs": 1},  # weights sized for a 3-epoch run
            {"name": "attention", "pairs": pairs, "weight": 50},
            {"name": "fitnets", "pairs": pairs[:1], "weight": 0.5},
        ],
        teachers=[
            {"model": "teacher", "weight": 1},
            {"model": "digits_teacher", "checkpoint": str(teacher_ckpt), "weight": 3},
        ],
        combine="per_teacher",
    )
    out = run(validate_recipe(recipe), tmp_path / "run", quiet=True)
    metrics = _stage(out)
    assert [t["name"] for t in metrics["loss_terms"]] == ["ce", "dkd", "attention", "fitnets"]
    assert metrics["teacher_weights"] == [0.25, 0.75]
    assert metrics["test_acc"] > 0.85, metrics["history"]  # it really learned from real digits
    assert (out / "model.onnx").is_file()
    # The student file holds the student only: FitNets regressors were dropped with the stage.
    state = torch.load(out / "checkpoints" / "01-distill" / "student.pt", weights_only=True)["state_dict"]
    assert not any("regressor" in k for k in state)


def test_cached_teacher_logits_train_the_same_student(teacher_ckpt, tmp_path):
    """Digits are not augmented: epoch 1 fills the cache, later epochs only read it, and the
    student comes out the same as with the teacher run live at every step."""
    students, caches = [], []
    for cache in (False, True):
        recipe = _distill_only(f"cache{int(cache)}", teacher_ckpt, cache_teacher=cache)
        out = run(validate_recipe(recipe), tmp_path / f"run{int(cache)}", quiet=True)
        students.append(torch.load(out / "checkpoints" / "01-distill" / "student.pt", weights_only=True)["state_dict"])
        caches.append(_stage(out).get("teacher_cache"))
    assert caches[0] is None
    seen = 22 * 64  # an epoch: 22 full batches of digits' 1437 training images (the last 29 are dropped)
    assert caches[1]["hits"] + caches[1]["misses"] == 3 * seen
    assert seen <= caches[1]["misses"] <= 1437  # each image's logits computed once, at first sight
    for key, live in students[0].items():
        torch.testing.assert_close(students[1][key], live, atol=1e-5, rtol=1e-4, msg=key)


def test_dkd_shorthand_spells_out_ce_plus_dkd(teacher_ckpt):
    recipe = validate_recipe(_distill_only("short", teacher_ckpt, loss="dkd", temperature=2.0))
    terms = [t.model_dump() for t in recipe.stages[0].kd.loss_terms()]
    assert terms == [
        {"name": "ce", "weight": 1.0},
        {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 2.0, "warmup_epochs": 20.0},
    ]


PREFLIGHT = {
    "layer typo": (
        {"losses": [{"name": "attention", "pairs": [{"student": "layer1", "teacher": "layer1.0.conv3"}]}]},
        ["stages.1.kd.losses.0.pairs.0.teacher", "no module 'layer1.0.conv3'", "close matches: layer1.0.conv"],
    ),
    "wrong output rank": (
        {"losses": [{"name": "attention", "pairs": [{"student": "fc", "teacher": "layer1"}]}]},
        ["stages.1.kd.losses", "attention needs 4-D", "'fc' outputs shape (2, 10)"],
    ),
    "cache with fresh augmentation": (
        {"cache_teacher": True},
        ["stages.1.kd.cache_teacher", "augmented anew every epoch", "augment_views"],
    ),
}


@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_preflight_errors_are_one_line_and_write_nothing(case, tiny, write_recipe, tmp_path, capsys):
    fields, needles = PREFLIGHT[case]
    tiny["data"]["augment"] = True
    tiny["stages"][1]["kd"] = fields
    check_fails_cleanly(capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", *needles)


def test_cache_with_replayed_views_passes_preflight(tiny, write_recipe, capsys):
    tiny["data"]["augment"] = True
    tiny["stages"][1]["kd"] = {"cache_teacher": True, "augment_views": 4}
    assert main(["validate", str(write_recipe(tiny))]) == 0


def test_extra_teacher_checkpoint_that_does_not_fit(tiny, write_recipe, tmp_path, capsys):
    ckpt = tmp_path / "r20.pt"
    from compress.models import build_model

    torch.save(build_model("resnet20", 10, 3).state_dict(), ckpt)
    tiny["stages"][1]["kd"] = {"teachers": [{"model": "resnet32", "checkpoint": str(ckpt)}]}
    check_fails_cleanly(
        capsys,
        ["run", str(write_recipe(copy.deepcopy(tiny)))],
        tmp_path / "out",
        "stages.1.kd.teachers.0.checkpoint",
        "does not match",
    )

"""The shared training loop's schedule and precision choices."""

import pytest
import torch

from compress.training import OptimConfig, _lr_lambda, autocast_dtype


def test_cosine_with_warmup():
    f = _lr_lambda(OptimConfig(schedule="cosine", warmup_epochs=1), steps_per_epoch=10, epochs=5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up over epoch 1
    assert f(10) == pytest.approx(1.0)
    assert f(30) == pytest.approx(0.5, abs=0.01)  # halfway through the cosine
    assert f(49) < 0.01


def test_onecycle_peaks_at_30_percent_and_constant_is_flat():
    f = _lr_lambda(OptimConfig(schedule="onecycle"), steps_per_epoch=10, epochs=10)
    values = [f(s) for s in range(100)]
    assert max(range(100), key=values.__getitem__) == 30
    assert values[0] < 0.1 and values[-1] < 0.1
    g = _lr_lambda(OptimConfig(schedule="constant"), steps_per_epoch=10, epochs=10)
    assert {g(s) for s in range(100)} == {1.0}


def test_precision_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    expected = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None
    assert autocast_dtype("auto", cpu) is expected


def test_keep_best_restores_the_best_epoch(tmp_path):
    import json

    from compress.pipeline import run
    from compress.recipe import validate_recipe

    recipe = {
        "name": "best",
        "device": "cpu",
        "data": {"name": "digits"},
        "student": {"model": "digits_student"},
        "stages": [{"kind": "train", "epochs": 4, "optim": {"lr": 0.05, "keep": "best", "precision": "fp32"}}],
        "benchmark": {"batch_sizes": [1], "iters": 1, "warmup": 0, "devices": ["cpu"]},
    }
    out = run(validate_recipe(recipe), tmp_path / "run", quiet=True)
    report = json.loads((out / "report.json").read_text())
    history = report["stages"][0]["metrics"]["history"]
    best = max(h["test_acc"] for h in history)
    assert report["stages"][0]["metrics"]["test_acc"] == best
    # The report re-measures in fp32 without channels_last; allow a borderline image or two to flip.
    assert report["artifacts"][0]["accuracy"] == pytest.approx(best, abs=0.006)

"""The README's quickstart, end to end, meets the numbers the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "report.json").read_text())


def _arts(report):
    return {a["name"]: a for a in report["artifacts"]}


def _p50(art, bs=1):
    return next(r["p50_ms"] for r in art["latency"] if r["device"] == "cpu" and r["batch_size"] == bs)


def test_int8_student_accuracy(report):
    assert _arts(report)["model.int8.onnx"]["accuracy"] >= 0.95


def test_int8_student_size(report):
    arts = _arts(report)
    int8 = arts["model.int8.onnx"]["size_bytes"]
    assert int8 * 10 <= arts["teacher.onnx"]["size_bytes"]
    assert int8 < arts["model.onnx"]["size_bytes"]


def test_int8_student_is_faster_than_teacher_at_batch_1(report):
    arts = _arts(report)
    assert _p50(arts["model.int8.onnx"]) < _p50(arts["teacher.onnx"])
    assert _p50(arts["model.int8.onnx"]) < _p50(arts["teacher@train"])


def test_distillation_and_pruning_happened(report):
    stages = {s["kind"]: s["metrics"] for s in report["stages"]}
    assert stages["prune"]["params_after"] < stages["prune"]["params_before"] / 2
    assert stages["export"]["student"]["argmax_agreement"] == 1.0
    assert stages["distill"]["test_acc"] >= 0.9

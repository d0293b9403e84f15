"""Resume after `kill -9`: a resumed run reaches the same report as one that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.pipeline import run
from compress.recipe import validate_recipe
from tests.conftest import digits_recipe

RECIPE = digits_recipe("resume", 2, 24, 2)
ROOT = Path(__file__).resolve().parent.parent


def _stable(report: dict) -> dict:
    """Everything in a report that does not depend on the clock."""
    arts = {
        a["name"]: {k: a[k] for k in ("accuracy", "top5", "params", "nonzero_params", "macs", "size_bytes")}
        for a in report["artifacts"]
    }
    stages = [
        {k: v for k, v in s["metrics"].items() if k not in ("seconds", "speed")} | {"kind": s["kind"]}
        for s in report["stages"]
    ]
    for st in stages:
        for hist in st.get("history", []):
            hist.pop("seconds", None)
    return {"artifacts": arts, "stages": stages}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(validate_recipe(RECIPE), out, quiet=True)
    return out, json.loads((out / "report.json").read_text())


def _start(recipe_file: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "compress", "run", str(recipe_file), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(proc: subprocess.Popen, log: Path, needle: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and needle in log.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended before {needle!r} appeared; cannot test the kill")


def _kill_during(recipe_file: Path, out: Path, needle: str) -> None:
    """Start a real run in a child process and SIGKILL it as soon as train.log shows ``needle``."""
    proc = _start(recipe_file, out)
    try:
        _wait_for(proc, out / "train.log", needle)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("needle", ["epoch 5/24", "prune fine-tune", "measured teacher"])
def test_killed_run_resumes_to_the_same_report(needle, reference, tmp_path):
    ref_dir, ref_report = reference
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = tmp_path / "run"
    _kill_during(recipe_file, out, needle)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "running" and not (out / "report.json").exists()  # visibly incomplete
    assert (out / "resume").is_dir()
    assert main(["run", str(recipe_file), "--out", str(out), "--quiet"]) == 2  # not silently restarted
    assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert _stable(report) == _stable(ref_report)
    assert (out / "model.onnx").read_bytes() == (ref_dir / "model.onnx").read_bytes()
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert not (out / "resume").exists()
    assert "resumed after" in (out / "train.log").read_text()


def test_resume_refuses_a_different_recipe_a_finished_run_and_a_stranger(reference, tmp_path, capsys):
    ref_dir, _ = reference
    changed = json.loads(json.dumps(RECIPE))
    changed["stages"][1]["epochs"] = 5
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.resolved.yaml").write_text((ref_dir / "recipe.resolved.yaml").read_text())
    (half / "status.json").write_text('{"state": "running"}')
    cases = [
        (half, "stages.1.epochs: 24 -> 5"),
        (ref_dir, "already finished"),
        (tmp_path / "nowhere", "not a compress run directory"),
    ]
    for target, needle in cases:
        assert main(["run", str(recipe_file), "--resume", str(target), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in half.iterdir()) == ["recipe.resolved.yaml", "status.json"]  # untouched


def test_same_recipe_and_seed_give_identical_metrics_and_onnx_bytes(reference, tmp_path):
    """Determinism on CPU: a second fresh run reproduces every metric and every ONNX byte."""
    ref_dir, ref_report = reference
    again = tmp_path / "again"
    run(validate_recipe(RECIPE), again, quiet=True)
    assert _stable(json.loads((again / "report.json").read_text())) == _stable(ref_report)
    for name in ("model.onnx", "model.int8.onnx", "teacher.onnx"):
        assert (again / name).read_bytes() == (ref_dir / name).read_bytes(), name
    assert ref_report["recipe"]["seed"] == 0 and ref_report["environment"]["torch"]


def test_resume_refuses_a_run_that_is_still_going(tmp_path, capsys):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = tmp_path / "run"
    proc = _start(recipe_file, out)
    try:
        _wait_for(proc, out / "train.log", "epoch 3/24")
        assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"still being written by process {proc.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

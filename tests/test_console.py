"""What a run shows when stderr is not a terminal (CI, nohup, ``| tee``): the run directory first,
then one plain line per epoch as each ends, so a long stage never looks hung. And ``compress env``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from compress.cli import main
from tests.conftest import digits_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = digits_recipe("console", 2, 1)  # train teacher 2 epochs, distill 1, export, quantize
EPOCH = re.compile(r"^stage (\d) (.+): epoch (\d+)/(\d+) loss [\d.]+ train_acc [\d.]+ test_acc [\d.]+ \(.*elapsed\)$")


def _compress(*args: str) -> subprocess.Popen:
    """The CLI in a child whose stderr is a pipe; rich's variables that would force a terminal unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env |= {"PYTHONPATH": str(ROOT), "COLUMNS": "80"}  # 80 columns: long lines must not wrap
    return subprocess.Popen(
        [sys.executable, "-m", "compress", *args],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_piped_stderr_shows_the_run_dir_first_and_a_line_per_epoch_as_it_ends(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = tmp_path / "a-run-directory-with-a-long-name-that-does-not-fit-in-eighty-columns"
    proc = _compress("run", str(recipe), "--out", str(out))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line.rstrip("\n"))
            if EPOCH.match(seen[-1]):
                break  # the first epoch's line, read while the run goes on: written when it happened
        assert proc.poll() is None, "\n".join(seen)
    finally:
        proc.kill()  # interrupted in stage 1 (2 epochs): the resumed run below starts it again
        proc.wait()
    assert seen[0] == f"run directory: {out}", seen
    assert seen[1] == "stage 1/4: train", seen
    assert EPOCH.match(seen[-1]).groups() == ("1", "train teacher", "1", "2"), seen

    proc = _compress("run", str(recipe), "--resume", str(out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = err.splitlines()
    assert lines[0] == f"run directory: {out} (resuming)", err
    assert lines.index("stage 1/4: train") > 0 and lines[-1] == f"run directory: {out}", err
    epochs = [m.groups() for m in map(EPOCH.match, lines) if m]
    assert epochs[-2:] == [("1", "train teacher", "2", "2"), ("2", "distill (hinton)", "1", "1")], err
    assert lines.index("stage 1/4: train") < lines.index(next(ln for ln in lines if EPOCH.match(ln)))
    logged = [ln for ln in (out / "train.log").read_text().splitlines() if " epoch " in ln and "resumed" not in ln]
    assert len(logged) >= len(epochs), "every console epoch line is also in train.log"


def test_a_quiet_run_prints_nothing_but_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    quick = digits_recipe("quiet", 1, 1)
    quick["stages"] = quick["stages"][:1]
    recipe.write_text(yaml.safe_dump(quick, sort_keys=False))
    proc = _compress("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and err == "", err


def test_env_names_what_decides_the_numbers(capsys):
    assert main(["env", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("compress", "python", "torch", "onnxruntime", "cpu", "isa", "threads", "onnxruntime_providers", "gpu"):
        assert key in doc, key
    assert "CPUExecutionProvider" in doc["onnxruntime_providers"] and doc["threads"] >= 1

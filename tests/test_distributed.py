"""`torchrun --nproc_per_node 2 -m compress run`: real DDP with gloo on CPU, against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.deploy import Predictor
from compress.pipeline import run
from compress.recipe import validate_recipe
from tests.conftest import digits_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = digits_recipe("ddp", 3, 4, 2)
# KD + a FitNets hint (16 -> 64 channels: a 1x1 regressor that DDP does not manage, averaged by hand)
RECIPE["stages"][1]["kd"] = {
    "losses": [
        {"name": "hinton"},
        {"name": "fitnets", "weight": 0.1, "pairs": [{"student": "5", "teacher": "5"}]},
    ]
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo via torchrun on POSIX")
def test_two_processes_match_one(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    ddp_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "compress", "run", str(recipe_file), "--out", str(ddp_dir), "--quiet"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in (ddp_dir / "train.log").read_text()
    ddp = json.loads((ddp_dir / "report.json").read_text())
    assert json.loads((ddp_dir / "status.json").read_text())["state"] == "complete"

    single_dir = tmp_path / "single"
    run(validate_recipe(RECIPE), single_dir, quiet=True)
    single = json.loads((single_dir / "report.json").read_text())
    # Same global batches (each rank takes every other image of the same permutation, half the
    # batch size), gradients averaged: the same training up to BatchNorm seeing half-batches.
    for a, b in zip(ddp["artifacts"], single["artifacts"], strict=True):
        assert a["name"] == b["name"] and a["params"] == b["params"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.03), a["name"]
    epochs = [len(s["metrics"].get("history", [])) for s in ddp["stages"]]
    assert epochs == [3, 4, 2, 0, 0]
    assert Predictor(ddp_dir / "model.int8.onnx").info.class_names == tuple(str(i) for i in range(10))

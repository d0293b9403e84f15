"""Plugins: a third party's stage and model, installed as a distribution with entry points, are
found without any import list, validated, run, listed; a broken plugin is one line, exit 2.

The "installed" distribution is a real one on disk (a module plus a ``*.dist-info`` folder with
``entry_points.txt``, which is what ``pip install`` leaves), put on ``PYTHONPATH`` of a fresh
``compress`` process, so ``importlib.metadata`` finds it exactly as it would after ``pip install``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

PLUGIN = '''
"""A third-party plugin: one stage that halves the student's classifier bias, one model."""
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from compress.models import MODELS
from compress.stages import STAGES, Stage


@STAGES.register("halve_bias")
class HalveBias(Stage):
    kind: Literal["halve_bias"] = "halve_bias"
    factor: float = 0.5
    example: ClassVar[dict[str, Any]] = {"kind": "halve_bias"}

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def apply(self, ctx) -> dict[str, Any]:
        last = [m for m in ctx.student.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.bias.mul_(self.factor)
        return {"bias_norm": float(last.bias.norm())}


@MODELS.register("tiny_mlp")
def tiny_mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, num_classes))
'''


def _install(site: Path, module: str, source: str, entry_points: str) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def _compress(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "compress", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_an_installed_plugin_stage_and_model_are_discovered_and_run(tmp_path):
    site = tmp_path / "site"
    _install(
        site,
        "toy_plugin",
        PLUGIN,
        "[compress.stages]\nhalve_bias = toy_plugin\n\n[compress.models]\ntiny_mlp = toy_plugin\n",
    )
    listed = _compress(site, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "halve_bias" in listed.stdout and "tiny_mlp" in listed.stdout
    recipe = {
        "name": "plugin",
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "student": {"model": "tiny_mlp"},
        "stages": [{"kind": "train", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}}, {"kind": "halve_bias"}],
        "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    bad = _compress(site, "validate", str(path), "--set", "stages.1.factr=2", cwd=tmp_path)
    assert bad.returncode == 2 and "stages.1.factr" in bad.stderr and "did you mean 'factor'" in bad.stderr
    done = _compress(site, "run", str(path), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["train", "halve_bias"]
    assert report["stages"][1]["metrics"]["bias_norm"] > 0
    assert "student@halve_bias" in {a["name"] for a in report["artifacts"]}


def test_a_broken_plugin_is_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    _install(
        site, "broken_plugin", "raise ImportError('needs libfoo 2.0')\n", "[compress.stages]\nbroken = broken_plugin\n"
    )
    out = _compress(site, "list", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "broken_plugin" in lines[0] and "compress.stages" in lines[0] and "needs libfoo 2.0" in lines[0]

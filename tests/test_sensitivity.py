"""``compress analyze sensitivity`` on a really trained digits student: per-group sweep, plot, and
derived per-layer ratios that the prune stage accepts and that meet the MACs target."""

from __future__ import annotations

import json

import torch

from compress.checkpoint import load_weights, read_checkpoint
from compress.cli import main
from compress.models import build_model
from compress.pruning.structured import StructuredOptions, count, prune_step
from tests.conftest import ROOT


def test_sensitivity_sweep_plot_and_derived_ratios(digits_run, tmp_path, capsys):
    run_dir, _, _ = digits_run
    ckpt = run_dir / "checkpoints" / "02-distill" / "student.pt"
    out = tmp_path / "sens"
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    argv = ["analyze", "sensitivity", recipe, "--set", f"student.checkpoint={ckpt}", "--ratios", "0.3,0.6,0.9",
            "--images", "300", "--target-macs", "0.6", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sensitivity.json").read_text())
    assert (out / "sensitivity.png").stat().st_size > 10_000
    assert result["ratios"] == [0.3, 0.6, 0.9] and result["images"] == 300
    layers = result["layers"]
    assert "classifier" not in layers and len(layers) >= 2  # the classifier is never a candidate
    for layer in layers.values():
        assert all(0 <= a <= 1 for a in layer["acc"])
        assert layer["macs_kept"] == sorted(layer["macs_kept"], reverse=True)  # more pruning, fewer MACs
    # A trained network loses more accuracy when a group loses 90% of its channels than 30%.
    mean_drop = [sum(result["base_acc"] - lay["acc"][i] for lay in layers.values()) / len(layers) for i in (0, 2)]
    assert mean_drop[1] > mean_drop[0]
    derived = result["derived"]
    assert derived["reached"] and derived["macs_kept"] <= 0.6
    assert "ratios:" in printed
    # The derived ratios, given to the prune stage's options, give the model the derived MACs.
    model = build_model("digits_student", 10, 1).eval()
    state, _ = read_checkpoint(ckpt, "student", "t")
    load_weights(model, state, pruned=False, field="t")
    x = torch.zeros(2, 1, 8, 8)
    macs0, _ = count(model, x)
    # every prunable group is in the derived dict, so the stage's default ratio (0.5) changes nothing
    prune_step(model, x, StructuredOptions(ratios=derived["ratios"]), 0.5, 10)
    assert count(model, x)[0] / macs0 == derived["macs_kept"]


def test_sensitivity_bad_arguments_are_one_line_errors(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    assert main(["analyze", "sensitivity", recipe, "--ratios", "0.5,1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--ratios: every ratio must be in (0, 1)" in capsys.readouterr().err
    assert main(["analyze", "sensitivity", recipe, "--set", "student.checkpoint=nope.pt"]) == 2
    assert "student.checkpoint" in capsys.readouterr().err
    # --out is a file: refused before the sweep, the file untouched
    (tmp_path / "f").write_text("keep")
    assert main(["analyze", "sensitivity", recipe, "--out", str(tmp_path / "f"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compress: error: --out: cannot write to")
    assert (tmp_path / "f").read_text() == "keep"
    # a failure during the sweep (every layer ignored) leaves no folder behind
    argv = ["analyze", "sensitivity", recipe, "--set", "stages.2.ignore=['*']", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    assert "no prunable layer group" in capsys.readouterr().err and not (tmp_path / "o").exists()

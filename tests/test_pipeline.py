"""The pipeline on real (tiny) models and data: every stage, real ONNX files, real ORT sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress.checkpoint import load_weights, read_checkpoint
from compress.context import Context
from compress.data import DATASETS
from compress.deploy import Predictor
from compress.errors import StageFailed
from compress.importance import IMPORTANCES
from compress.models import build_model
from compress.pipeline import run
from compress.recipe import validate_recipe
from compress.stages import STAGES


def prerequisites(kind: str, have: frozenset[str] = frozenset({"teacher"})) -> list[dict]:
    """The example entries of earlier stages that provide what ``kind``'s example needs (beyond the
    recipe's teacher), found from the registry's ``needs``/``provides``: a new stage needs no edit here."""
    stage = STAGES.get(kind).model_validate(STAGES.get(kind).example)
    chain: list[dict] = []
    for need in sorted(stage.requirements() - have):
        provider = next((k for k, cls in STAGES.items() if need in cls.provides), None)
        assert provider is not None, f"stage {kind!r} needs {need!r}, which no registered stage provides"
        chain += prerequisites(provider, have) + [STAGES.get(provider).example]
        have |= STAGES.get(provider).provides
    return chain


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full tiny run shared by the assertions below (train → distill → prune → export → INT8)."""
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("run") / "tiny"
    run(validate_recipe(TINY), out, quiet=True)
    return out, json.loads((out / "report.json").read_text())


def test_run_dir_layout(tiny_run):
    out, report = tiny_run
    for name in (
        "recipe.resolved.yaml",
        "report.json",
        "report.md",
        "train.log",
        "model.onnx",
        "model.int8.onnx",
        "teacher.onnx",
        "status.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert {p.parent.name for p in (out / "checkpoints").glob("*/*.pt")} == {"01-train", "02-distill", "03-prune"}
    assert set(report) >= {"recipe", "environment", "stages", "artifacts"}
    assert [s["kind"] for s in report["stages"]] == ["train", "distill", "prune", "export", "quantize"]
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1


def test_every_artifact_is_measured(tiny_run):
    _, report = tiny_run
    names = [a["name"] for a in report["artifacts"]]
    assert names == [
        "teacher@train",
        "teacher.onnx",
        "student@distill",
        "student@prune",
        "model.onnx",
        "model.int8.onnx",
    ]
    for art in report["artifacts"]:
        assert 0.0 <= art["accuracy"] <= 1.0
        assert art["size_bytes"] > 0 and art["params"] > 0 and 0 < art["nonzero_params"] <= art["params"]
        assert art["macs"] > 0
        lat = art["latency"]
        assert {(r["device"], r["batch_size"]) for r in lat} == {("cpu", 1), ("cpu", 8)}
        for r in lat:
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0 and r["threads"] >= 1


def test_pruning_really_shrinks_the_student(tiny_run):
    out, report = tiny_run
    arts = {a["name"]: a for a in report["artifacts"]}
    before, after = arts["student@distill"], arts["student@prune"]
    assert after["params"] < 0.5 * before["params"]
    assert after["macs"] < 0.5 * before["macs"]
    assert after["size_bytes"] < 0.5 * before["size_bytes"]
    prune = report["stages"][2]["metrics"]
    assert prune["params_after"] == after["params"]


def test_onnx_matches_torch_and_int8_is_smaller(tiny_run):
    out, report = tiny_run
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    int8 = onnx.load(str(out / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    arts = {a["name"]: a for a in report["artifacts"]}
    assert arts["model.int8.onnx"]["size_bytes"] < 0.6 * arts["model.onnx"]["size_bytes"]
    assert arts["model.onnx"]["accuracy"] == pytest.approx(arts["student@prune"]["accuracy"], abs=0.011)
    # The pruned checkpoint reloads into a fresh resnet20 and agrees with the ONNX file.
    data = DATASETS.get("synthetic").model_validate(report["recipe"]["data"]).load()
    model = build_model("resnet20", data.num_classes, data.channels)
    state, pruned = read_checkpoint(out / "checkpoints" / "03-prune" / "student.pt", "student", "test")
    assert pruned
    load_weights(model, state, pruned=True, field="test")
    raw = data.test_x[:16]
    with torch.no_grad():
        ref = model.eval()(data.normalize(raw)).numpy()
    got = Predictor(out / "model.onnx").logits(raw.numpy(), layout="nchw")  # uint8 pixels, normalized in the graph
    assert np.abs(ref - got).max() < 1e-3
    # Dynamic batch axis: any batch size runs.
    assert Predictor(out / "model.int8.onnx").logits(raw[:5].numpy(), layout="nchw").shape == (5, data.num_classes)


@pytest.mark.parametrize("kind", STAGES.names())
def test_every_stage_declares_a_valid_example(kind):
    cls = STAGES.get(kind)
    assert cls.example.get("kind") == kind, f"stage {kind!r}: declare example = {{'kind': {kind!r}, ...}}"
    assert cls.model_validate(cls.example).kind == kind


@pytest.mark.parametrize("kind", STAGES.names())
def test_each_stage_alone(kind, tiny, tmp_path):
    """Each stage kind runs as the only model-changing stage of a recipe, with its defaults."""
    tiny["stages"] = prerequisites(kind) + [STAGES.get(kind).example]
    tiny["benchmark"]["torch_snapshots"] = False
    out = run(validate_recipe(tiny), tmp_path / "run", quiet=True)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][-1]["kind"] == kind
    assert all(a["accuracy"] >= 0 for a in report["artifacts"])


@pytest.mark.parametrize("method", IMPORTANCES.names())
@pytest.mark.parametrize("model", ["resnet20", "digits_student", "torchvision:mobilenet_v2"])
def test_prune_methods_and_architectures(method, model, tiny, tmp_path):
    channels = 1 if model.startswith("digits") else 3
    tiny["data"].update(channels=channels, image_size=8 if channels == 1 else 32, train_size=64, test_size=32)
    tiny["teacher"] = None
    tiny["student"] = {"model": model}
    tiny["stages"] = [{"kind": "prune", "method": method, "ratio": 0.5}, {"kind": "export"}]
    tiny["benchmark"].update(torch_snapshots=False, iters=1, warmup=0, batch_sizes=[1])
    out = run(validate_recipe(tiny), tmp_path / "run", quiet=True)
    report = json.loads((out / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    metrics = report["stages"][0]["metrics"]
    assert metrics["params_after"] < 0.6 * metrics["params_before"] and metrics["macs_after"] < metrics["macs_before"]
    assert arts["student@prune"]["params"] == metrics["params_after"]
    # fp32 weights of the unpruned model would take 4 bytes each; the exported file is far smaller.
    assert arts["model.onnx"]["size_bytes"] < 0.6 * 4 * metrics["params_before"]
    assert arts["model.onnx"]["accuracy"] == pytest.approx(arts["student@prune"]["accuracy"], abs=0.04)


def test_export_parity_failure_is_loud(tiny, tmp_path):
    # No mock: a tolerance below fp32 rounding makes the real ORT-vs-PyTorch difference fail the check.
    tiny["teacher"] = None
    tiny["stages"] = [{"kind": "export", "atol": 1e-12, "rtol": 0}]
    with pytest.raises(StageFailed, match="ONNX Runtime disagrees with PyTorch for the student"):
        run(validate_recipe(tiny), tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"
    assert not list((tmp_path / "run").glob("*.onnx")) and not list((tmp_path / "run").glob(".*.onnx"))


def test_nan_loss_stops_the_stage(tiny, tmp_path, monkeypatch):
    (tmp_path / "nan_models.py").write_text(
        "import torch, torch.nn as nn\n"
        "def exploding(num_classes):\n"
        "    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes))\n"
        "    nn.init.constant_(m[1].weight, float('inf'))\n"
        "    return m\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny["teacher"] = None
    tiny["student"] = {"model": "nan_models:exploding"}
    tiny["stages"] = [{"kind": "train", "epochs": 1, "optim": {"precision": "fp32"}}]
    with pytest.raises(StageFailed, match="loss became nan in epoch 1"):
        run(validate_recipe(tiny), tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"
    assert not list((tmp_path / "run").glob("*.onnx")) and not list((tmp_path / "run").glob(".*.onnx"))


def test_context_latest_prefers_newest():
    from compress.context import Artifact

    ctx = Context.__new__(Context)
    ctx.artifacts = []
    a = Artifact("a", "student", "onnx", "fp32", None, "x")  # type: ignore[arg-type]
    b = Artifact("b", "student", "onnx", "fp32", None, "y")  # type: ignore[arg-type]
    Context.add_artifact(ctx, a)
    Context.add_artifact(ctx, b)
    assert Context.latest(ctx, "student", "onnx") is b and Context.latest(ctx, "teacher", "onnx") is None

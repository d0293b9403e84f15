"""INT8 calibration methods and formats on a trained digits student: real files, real ORT sessions."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from compress.context import Artifact, Context
from compress.deploy import Predictor
from compress.onnx_utils import run as ort_run
from compress.onnx_utils import session
from compress.pipeline import load_data, run
from compress.recipe import validate_recipe
from compress.stages import STAGES

RECIPE = {
    "name": "q",
    "device": "cpu",
    "data": {"name": "digits"},
    "student": {"model": "digits_student"},
    "stages": [{"kind": "train", "epochs": 4, "lr": 0.05, "precision": "fp32"}, {"kind": "export"}],
    "benchmark": {"batch_sizes": [1], "iters": 1, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "run"
    recipe = validate_recipe(RECIPE)
    run(recipe, out, quiet=True)
    return recipe, out


def quantize(recipe, exported_dir, tmp_path, **fields):
    shutil.copy(exported_dir / "model.onnx", tmp_path / "model.onnx")
    ctx = Context(
        recipe=recipe,
        device=__import__("torch").device("cpu"),
        run_dir=tmp_path,
        data=load_data(recipe),
        models={},
        specs={},
    )
    ctx.add_artifact(Artifact("model.onnx", "student", "onnx", "fp32", tmp_path / "model.onnx", "export"))
    metrics = STAGES.get("quantize").model_validate({"kind": "quantize", **fields}).apply(ctx)
    return ctx, metrics


@pytest.mark.parametrize(
    "fields",
    [
        {"calibration": "minmax"},
        {"calibration": "entropy"},
        {"calibration": "percentile", "percentile": 99.99},
        {"format": "qoperator"},
        {"per_channel": False, "activation_type": "int8"},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_int8_model_agrees_with_fp32(fields, exported, tmp_path):
    recipe, out = exported
    ctx, metrics = quantize(recipe, out, tmp_path, **fields)
    int8 = ctx.latest("student", "onnx", "int8")
    assert int8 is not None and int8.path.is_file()
    assert metrics["int8_bytes"] < metrics["fp32_bytes"]
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert ("QuantizeLinear" in ops) if fields.get("format", "qdq") == "qdq" else ("QLinearConv" in ops)
    x, y = ctx.data.test_x.numpy(), ctx.data.test_y.numpy()
    ref = Predictor(tmp_path / "model.onnx").logits(x, layout="nchw").argmax(1)
    got = Predictor(int8.path).logits(x, layout="nchw").argmax(1)
    assert (ref == got).mean() >= 0.9
    assert (got == y).mean() >= (ref == y).mean() - 0.05


def test_calibration_reader_streams_batches(exported):
    from compress.stages.quantize import BatchReader

    recipe, _ = exported
    data = load_data(recipe)
    reader = BatchReader(data, "input", batches=3, batch_size=10)
    shapes = []
    while (batch := reader.get_next()) is not None:
        shapes.append(batch["input"].shape)
    assert shapes == [(10, 1, 8, 8)] * 3
    reader.rewind()
    assert np.array_equal(reader.get_next()["input"], BatchReader(data, "input", 3, 10).get_next()["input"])


def test_calibration_feeds_what_the_model_metadata_asks_for(exported):
    """The exported graph takes uint8 NHWC pixels; calibration must feed those, not normalized floats."""
    from compress.metadata import feeder
    from compress.stages.quantize import BatchReader

    recipe, out = exported
    data = load_data(recipe)
    sess = session(out / "model.onnx")
    reader = BatchReader(data, "images", 2, 10, feeder(sess, data))
    batch = reader.get_next()["images"]
    assert batch.dtype == np.uint8 and batch.shape == (10, 8, 8, 1)
    assert np.array_equal(batch, data.train_x[reader._index[:10]].permute(0, 2, 3, 1).numpy())
    assert ort_run(sess, batch).shape == (10, 10)

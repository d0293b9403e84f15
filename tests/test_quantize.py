"""INT8 calibration methods and formats on a trained digits student: real files, real ORT sessions."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from compress.context import Artifact, Context
from compress.deploy import Predictor
from compress.metadata import read as read_metadata
from compress.onnx_utils import run as ort_run
from compress.onnx_utils import session
from compress.pipeline import load_data, run
from compress.quantization.schemes import SCHEMES
from compress.recipe import validate_recipe
from compress.stages import STAGES

RECIPE = {
    "name": "q",
    "device": "cpu",
    "data": {"name": "digits"},
    "student": {"model": "digits_student"},
    "stages": [{"kind": "train", "epochs": 4, "optim": {"lr": 0.05, "precision": "fp32"}}, {"kind": "export"}],
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
        {"calibration": "distribution", "symmetric_activations": True},
        {"format": "qoperator"},
        {"per_channel": False},
        {"symmetric_activations": True},
        {"per_channel": False, "scheme": "s8s8_reduce_range"},
        {"symmetric_activations": True, "scheme": "s8s8_reduce_range"},
        {"op_types": ["Conv"], "calibration_chunk": 3},
        {"mode": "dynamic"},
        {"mode": "fp16"},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_quantized_model_agrees_with_fp32(fields, exported, tmp_path):
    recipe, out = exported
    ctx, metrics = quantize(recipe, out, tmp_path, **fields)
    mode = fields.get("mode", "static")
    precision = "fp16" if mode == "fp16" else "int8"
    q = ctx.latest("student", "onnx", precision)
    assert q is not None and q.path.is_file() and q.path.name == f"model.{precision}.onnx"
    graph = onnx.load(str(q.path)).graph
    ops = {n.op_type for n in graph.node}
    if mode == "static":
        assert ("QuantizeLinear" in ops) if fields.get("format", "qdq") == "qdq" else ("QLinearConv" in ops)
        assert metrics["int8_bytes"] < metrics["fp32_bytes"] / 2 or "op_types" in fields
    elif mode == "dynamic":  # the classifier's Gemm runs as an integer matmul; convolutions stay float
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "ConvInteger" not in ops
    else:
        floats = {i.data_type for i in graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
        assert floats == {onnx.TensorProto.FLOAT16}  # every float weight halved
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
        assert metrics["fp16_bytes"] < 0.6 * metrics["fp32_bytes"]
    assert metrics["speed"]["fp32_p50_ms_bs1"] > 0 and metrics["speed"]["speedup_bs1"] > 0  # timed vs FP32
    x, y = ctx.data.test_x.numpy(), ctx.data.test_y.numpy()
    ref = Predictor(tmp_path / "model.onnx").logits(x, layout="nchw").argmax(1)
    got = Predictor(q.path).logits(x, layout="nchw").argmax(1)
    assert (ref == got).mean() >= 0.9
    assert (got == y).mean() >= (ref == y).mean() - 0.05


@pytest.mark.parametrize("name", SCHEMES.names())
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_every_scheme_is_what_the_file_holds_and_agrees_with_fp32_where_exact(name, mode, exported, tmp_path, caplog):
    """Forcing a scheme runs it on any CPU (the non-VNNI choice included): the file's weights lie in
    the scheme's range, its metadata says which scheme and where it is exact, the stage warns where
    ORT's probe says it is not exact here, and the INT8 model agrees with FP32 — where not exact,
    because Predictor then loads it in ORT's precision mode."""
    from compress.quantization.schemes import probe

    scheme = SCHEMES.get(name)
    if mode == "dynamic" and scheme.activation != "uint8":
        pytest.skip("dynamic quantization has uint8 activations only")
    recipe, out = exported
    with caplog.at_level("INFO", logger="compress"):
        ctx, m = quantize(recipe, out, tmp_path, scheme=name, mode=mode)
    exact = probe(name, dynamic=mode == "dynamic").exact
    assert m["scheme"] == name and m["scheme_exact_here"] == exact
    path = ctx.latest("student", "onnx", "int8").path
    props = read_metadata(path)
    assert props["int8_scheme"] == name and props["int8_exact_with"] == scheme.exact_with
    weights = [
        onnx.numpy_helper.to_array(i)
        for i in onnx.load(str(path)).graph.initializer
        if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) >= 2
    ]
    assert weights and all(w.dtype == np.dtype(scheme.weight) for w in weights)
    lo, hi = scheme.weight_range
    assert min(int(w.min()) for w in weights) >= lo and max(int(w.max()) for w in weights) <= hi
    if scheme.reduce_range:  # 7 bits used, not fewer
        assert max(int(np.abs(w).max()) for w in weights) == 64
    assert ("NOT exact" in caplog.text) == (not exact)
    x, y = ctx.data.test_x.numpy(), ctx.data.test_y.numpy()
    ref = Predictor(tmp_path / "model.onnx").logits(x, layout="nchw").argmax(1)
    got = Predictor(path).logits(x, layout="nchw").argmax(1)
    assert (ref == got).mean() >= 0.9
    assert (got == y).mean() >= (ref == y).mean() - 0.05


def test_chunked_calibration_gives_the_same_ranges(exported, tmp_path):
    """MinMax over 16 batches held at once, or one batch at a time: the same scales, the same file."""
    recipe, out = exported
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    same = {"calibration": "minmax", "calibration_batches": 16}
    ctx_a, _ = quantize(recipe, out, tmp_path / "a", **same, calibration_chunk=16)
    ctx_b, _ = quantize(recipe, out, tmp_path / "b", **same, calibration_chunk=1)
    a, b = (onnx.load(str(c.latest("student", "onnx", "int8").path)).graph for c in (ctx_a, ctx_b))
    scales = lambda g: {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in g.initializer if "scale" in i.name}  # noqa: E731
    assert scales(a) and scales(a) == scales(b)


def test_stride_divides_the_batches():
    from compress.quantization.ptq import stride

    assert [stride(16, 8), stride(13, 8), stride(12, 8), stride(3, 8)] == [8, 1, 6, 3]


@pytest.fixture(scope="module")
def outlier(exported, tmp_path_factory):
    """The trained student made hard for per-tensor INT8 activations (MinMax ranges) without changing its function:
    one channel after the first ReLU-block scaled ×1000 (BN γ, β), the next conv's weights on it ÷1000.
    Its range squashes every other channel of that tensor to zero in uint8."""
    import torch

    from compress.checkpoint import load_weights, read_checkpoint, save_model
    from compress.models import build_model

    recipe, out = exported
    model = build_model("digits_student", 10, 1)
    state, pruned = read_checkpoint(next(out.rglob("student.pt")), "student", "t")
    load_weights(model, state, pruned=pruned, field="t")
    with torch.no_grad():
        model[4].weight[0] *= 1000
        model[4].bias[0] *= 1000
        model[7].weight[:, 0] /= 1000
    root = tmp_path_factory.mktemp("outlier")
    save_model(model, root / "outlier.pt", name="digits_student", kwargs={}, num_classes=10, in_channels=1)
    raw = {**RECIPE, "student": {"model": "digits_student", "checkpoint": str(root / "outlier.pt")}}
    raw["stages"] = [{"kind": "export"}]
    recipe = validate_recipe(raw)
    run(recipe, root / "run", quiet=True)
    return recipe, root / "run"


def test_accuracy_loop_keeps_nodes_in_float_until_the_budget_holds(outlier, tmp_path):
    recipe, out = outlier
    ctx, m = quantize(recipe, out, tmp_path, calibration="minmax", max_accuracy_drop=0.02, max_excluded=10)
    steps = m["accuracy_steps"]
    assert steps[0]["excluded"] == [] and steps[0]["drop"] > 0.2  # plain INT8 breaks on this model
    assert m["accuracy_budget_met"] and steps[-1]["drop"] <= 0.02 and m["excluded_nodes"] == steps[-1]["excluded"]
    assert all(s["drop"] > 0.02 for s in steps[:-1])  # it stopped at the first step within budget
    assert [len(s["excluded"]) for s in steps] == list(range(len(steps)))  # one node per step
    # The ranking finds the nodes around the ×1000 channel (second conv's output -> ReLU -> MaxPool ->
    # third conv's input) and nothing else: in isolation, per channel, that tensor is the one that breaks.
    graph = onnx.load(str(out / "model.onnx")).graph
    order = [n.name for n in graph.node]
    convs = [i for i, n in enumerate(graph.node) if n.op_type == "Conv"]
    assert set(m["excluded_nodes"]) <= set(order[convs[1] : convs[2] + 1]) and len(m["excluded_nodes"]) <= 4
    assert all(s["p50_ms_bs1"] > 0 for s in steps)
    int8 = ctx.latest("student", "onnx", "int8").path
    graph = onnx.load(str(int8)).graph
    assert "QuantizeLinear" in {n.op_type for n in graph.node}  # still an INT8 model, not all float
    x, y = ctx.data.test_x.numpy(), ctx.data.test_y.numpy()
    assert (Predictor(int8).logits(x, layout="nchw").argmax(1) == y).mean() == pytest.approx(m["int8_top1"])
    assert m["fp32_top1"] - m["int8_top1"] <= 0.02


def test_the_report_lists_every_step_of_the_accuracy_loop(outlier, tmp_path):
    """report.md and report.html show each step: the nodes moved to float, top-1, drop, latency, and the kept one."""
    import json

    _, out = outlier
    raw = {**RECIPE, "student": {"model": "digits_student", "checkpoint": str(out.parent / "outlier.pt")}}
    raw["stages"] = [
        {"kind": "export"},
        {"kind": "quantize", "calibration": "minmax", "max_accuracy_drop": 0.02, "max_excluded": 10},
    ]
    run(validate_recipe(raw), tmp_path / "run", quiet=True)
    m = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][1]["metrics"]
    md = (tmp_path / "run" / "report.md").read_text()
    html = (tmp_path / "run" / "report.html").read_text()
    table = md.split("## Accuracy-aware quantization")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == len(m["accuracy_steps"]) >= 2
    before: list[str] = []
    for i, (row, step) in enumerate(zip(rows, m["accuracy_steps"], strict=True)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == str(i) and cells[2] == str(len(step["excluded"]))
        added = [n for n in step["excluded"] if n not in before]
        assert cells[3] == (", ".join(f"`{n}`" for n in added) or "–")
        before = step["excluded"]
        assert cells[4] == f"{100 * step['top1']:.2f}%" and cells[6] == f"{step['p50_ms_bs1']:.3f}"
        assert cells[7] == ("✓" if step["excluded"] == m["excluded_nodes"] else "")
        assert cells[4] in html
    assert "Accuracy-aware quantization" in html


def test_accuracy_loop_says_when_the_budget_cannot_be_met(outlier, tmp_path, caplog):
    recipe, out = outlier
    with caplog.at_level("WARNING"):
        _, m = quantize(recipe, out, tmp_path, calibration="minmax", max_accuracy_drop=0.02, max_excluded=1)
    assert not m["accuracy_budget_met"] and len(m["excluded_nodes"]) <= 1
    assert m["int8_top1"] == max(s["top1"] for s in m["accuracy_steps"])  # the best it found
    assert "over max_accuracy_drop" in caplog.text


def test_a_slow_int8_file_names_the_float_ops_left_between_qdq(exported, tmp_path):
    from compress.quantization.mixed import float_islands
    from compress.stages.quantize import Quantize

    recipe, out = exported
    ctx, _ = quantize(recipe, out, tmp_path, op_types=["Conv"])  # Relu, MaxPool, ... left float
    islands = float_islands(ctx.latest("student", "onnx", "int8").path, tmp_path)
    assert islands and "Conv" not in islands
    why = Quantize(kind="quantize")._why_slow(islands, 0.1)
    assert any(op in why[0] for op in islands) and "per-op overhead" in why[-1]


def test_calibration_reader_streams_batches(exported):
    from compress.quantization.calibration import BatchReader

    recipe, _ = exported
    data = load_data(recipe)
    reader = BatchReader(data, "input", batches=3, batch_size=10)
    shapes = []
    while (batch := reader.get_next()) is not None:
        shapes.append(batch["input"].shape)
    assert shapes == [(10, 1, 8, 8)] * 3
    reader.rewind()
    assert np.array_equal(reader.get_next()["input"], BatchReader(data, "input", 3, 10).get_next()["input"])


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_calibration_set_smaller_than_asked_for(exported, tmp_path, method):
    """Fewer training images than batches x batch size: every batch the same size, all images used
    (ORT's histogram calibrators stack a chunk's batches and fail on a short last one)."""
    from compress.quantization.calibration import BatchReader

    recipe, out = exported
    data = load_data(recipe)
    n = len(data.train_x)
    reader = BatchReader(data, "input", batches=2, batch_size=n - 1)
    assert [b["input"].shape[0] for b in reader] == [n // 2] * 2 and reader.images == n // 2 * 2
    symmetric = {"symmetric_activations": True} if method == "distribution" else {}
    ctx, metrics = quantize(recipe, out, tmp_path, calibration=method, calibration_batches=2,
                            calibration_batch_size=n - 1, **symmetric)  # fmt: skip
    assert metrics["calibration_images"] == n // 2 * 2
    from compress.metadata import feeder

    sess = session(ctx.latest("student", "onnx", "int8").path)
    assert ort_run(sess, feeder(sess, data)(data.test_x[:4])).shape == (4, 10)


def test_calibration_feeds_what_the_model_metadata_asks_for(exported):
    """The exported graph takes uint8 NHWC pixels; calibration must feed those, not normalized floats."""
    from compress.metadata import feeder
    from compress.quantization.calibration import BatchReader

    recipe, out = exported
    data = load_data(recipe)
    sess = session(out / "model.onnx")
    reader = BatchReader(data, "images", 2, 10, feeder(sess, data))
    batch = reader.get_next()["images"]
    assert batch.dtype == np.uint8 and batch.shape == (10, 8, 8, 1)
    assert np.array_equal(batch, data.train_x[reader.indices[:10]].permute(0, 2, 3, 1).numpy())
    assert ort_run(sess, batch).shape == (10, 10)

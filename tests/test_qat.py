"""Quantization-aware training: fake-quantized fine-tuning (with KD), exported as QDQ ONNX that ONNX
Runtime runs in INT8 — on a real digits model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress.metadata import read as read_metadata
from compress.models import build_model
from compress.pipeline import run
from compress.recipe import validate_recipe
from compress.stages.qat import _PerCall, fake_quantized, one_module_per_call


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    recipe = {
        "name": "qat",
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {"model": "digits_teacher"},
        "student": {"model": "digits_student"},
        "stages": [
            {"kind": "train", "target": "teacher", "epochs": 3, "optim": {"lr": 0.05, "precision": "fp32"}},
            {"kind": "train", "epochs": 3, "optim": {"lr": 0.05, "precision": "fp32"}},
            {"kind": "export"},
            {"kind": "quantize", "calibration_batches": 4},
            # the scheme auto picks on x86 without VNNI, forced so every host tests it (auto: test_pipeline)
            {"kind": "qat", "epochs": 2, "kd": True, "optim": {"lr": 0.005}, "scheme": "u8s8_reduce_range"},
        ],
        "benchmark": {"batch_sizes": [1], "iters": 3, "warmup": 1, "devices": ["cpu"], "torch_snapshots": False},
    }
    out = run(validate_recipe(recipe), tmp_path_factory.mktemp("qat") / "run", quiet=True)
    return out, json.loads((out / "report.json").read_text())


def test_qat_exports_qdq_int8_that_onnx_runtime_runs(qat_run):
    out, report = qat_run
    arts = {a["name"]: a for a in report["artifacts"]}
    qat = arts["model.qat.onnx"]
    assert qat["precision"] == "int8" and (out / "model.qat.onnx").is_file()
    graph = onnx.load(str(out / "model.qat.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 3
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) == 3  # every convolution's weight stored as int8
    # 7-bit, as fake-quantized in training: ORT computes them exactly on any CPU, so parity holds
    # at the same tolerance on AVX2 and VNNI hosts
    peaks = [int(np.abs(onnx.numpy_helper.to_array(w)).max()) for w in int8_weights]
    assert max(peaks) == 64
    m = report["stages"][4]["metrics"]
    assert m["argmax_agreement"] >= 0.95 and m["relative_error"] < 0.1 and m["int8_bytes"] < 0.7 * m["fp32_bytes"]
    assert m["epochs"] == 2 and "QAT + KD" in read_metadata(out / "model.qat.onnx")["quantization"]
    assert m["scheme"] == "u8s8_reduce_range" and m["scheme_exact_here"]
    props = read_metadata(out / "model.qat.onnx")
    assert props["int8_scheme"] == "u8s8_reduce_range" and props["int8_exact_with"] == "any"


def test_qat_keeps_the_accuracy(qat_run):
    # 360 test digits: a few images either way is noise; QAT >= PTQ is shown on CIFAR-10
    # (benchmarks/quant_peers.py), here it must not lose more than 3 points to either.
    _, report = qat_run
    acc = {a["name"]: a["accuracy"] for a in report["artifacts"]}
    assert acc["model.qat.onnx"] >= max(acc["model.int8.onnx"], acc["model.onnx"]) - 0.03


def test_a_module_called_twice_becomes_one_copy_per_call():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    one_module_per_call(model, x)
    assert isinstance(model.layer1[0].relu, _PerCall) and len(model.layer1[0].relu.calls) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    prepared = fake_quantized(model, x)  # torchao's quantizer accepts it (a shared ReLU made it fail)
    assert any("fake_quant" in n or "activation_post_process" in n for n, _ in prepared.named_modules())
